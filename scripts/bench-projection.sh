#!/usr/bin/env bash
# Projection benchmark (issue "projection at the speed of the log"): the projector from offset 0 against a
# bare librdkafka consumer reading the same topics from the same broker, with Redis and with Redis
# stopped (a Redis URL nothing listens on), then a side-by-side replay (`catalogctl replay`) over the
# same log while a reader measures its longest wait. BENCH_EVENTS events (default 100000) on a private
# in-memory broker. Prints a markdown table.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"

EVENTS="${BENCH_EVENTS:-100000}"
scripts/check-services.sh
cargo build --release --quiet -p benches --bin projection-ceiling
cargo build --release --quiet --bin catalogctl --bin catalog-projector
scripts/broker.sh restart bench 19192 >/dev/null
brokers=127.0.0.1:19192
prefix="benchp$RANDOM."
export DB_NAME=catalog_bench LOG_FORMAT=json RUST_LOG=warn

# Records per producer batch: by default what `just dev` uses on this broker (10000 on the patched Tansu,
# 1 on a stock one, which cannot resume a fetch inside a multi-record batch); BENCH_PRODUCER_BATCH=N
# overrides it.
BENCH_PRODUCER_BATCH="${BENCH_PRODUCER_BATCH:-$(scripts/broker.sh batch-messages bench)}"
KAFKA_PRODUCER_BATCH_MESSAGES="$BENCH_PRODUCER_BATCH" "$bin/projection-ceiling" generate "$brokers" "$prefix" "$EVENTS"
with_redis=$("$bin/projection-ceiling" measure "$brokers" "$prefix" bench_projection redis://127.0.0.1:6379)
# Nothing listens on port 1: every invalidation fails (the projector keeps them and goes on).
no_redis=$("$bin/projection-ceiling" measure "$brokers" "$prefix" bench_projection redis://127.0.0.1:1)

# Replay: a live projection at the end of the log, then a side-by-side rebuild and switch while one
# reader queries products in a loop and reports its longest wait.
export KAFKA_BROKERS=$brokers KAFKA_TOPIC_PREFIX=$prefix DB_SCHEMA=bench_replay PROJECTOR_GROUP_ID=bench-live \
    CACHE_KEY_PREFIX=benchr:
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & projector=$!; pids+=($projector)
until [ "$("$bin/catalogctl" lag --image-worker-group none --user-stats-group none 2>/dev/null \
    | awk '$1 == "bench-live" { lag += $6 } END { print lag + 0 }')" = 0 ] \
    && psql -qtAX -h 127.0.0.1 -U postgres -d catalog_bench -c "SELECT count(*) FROM bench_replay.projection_offsets" | grep -qv '^0$'; do
    sleep 1
done
"$bin/projection-ceiling" reader bench_replay "$tmp/stop" >"$tmp/reader.txt" 2>/dev/null &
reader=$!
replay_started=$(date +%s.%N)
"$bin/catalogctl" replay 2>/dev/null >"$tmp/replay.txt"
replay_s=$(echo "$(date +%s.%N) - $replay_started" | bc)
touch "$tmp/stop"
wait $reader || true
kill $projector 2>/dev/null || true
psql -qtAX -h 127.0.0.1 -U postgres -d catalog_bench -c "DROP SCHEMA bench_replay CASCADE" >/dev/null 2>&1

read -r bare proj ratio <<<"$with_redis"
read -r bare2 proj2 ratio2 <<<"$no_redis"
echo
echo "| run | bare consumer ev/s | projector ev/s | ratio |"
echo "|---|---|---|---|"
echo "| $EVENTS events (producer batch $BENCH_PRODUCER_BATCH), Redis up | $bare | $proj | $ratio |"
echo "| $EVENTS events (producer batch $BENCH_PRODUCER_BATCH), Redis unreachable | $bare2 | $proj2 | $ratio2 |"
echo
echo "replay (side by side + switch) of $EVENTS events: ${replay_s} s; $(cat "$tmp/replay.txt")"
echo "longest single read during the replay and switch: $(cat "$tmp/reader.txt") ms"
