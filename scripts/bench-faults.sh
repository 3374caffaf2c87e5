#!/usr/bin/env bash
# Slow dependencies cost one timeout, not one per request (issue "circuit breakers and load shedding"):
# GET /products/:id at the same concurrency with Redis healthy, with Redis disabled (REDIS_URL empty) and
# with Redis hung (a private redis-server paused by SIGSTOP, connections open; measured after its first
# second). Prints a markdown table and hung/disabled (target >= 0.9). Needs wrk and redis-server.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
redis_pid=""
bench_cleanup_extra() {
    if [ -n "$redis_pid" ]; then kill -CONT "$redis_pid" 2>/dev/null || true; kill "$redis_pid" 2>/dev/null || true; fi
}

command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalogctl
scripts/broker.sh restart bench 19192 >/dev/null
redis_port=16390
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$tmp/redis.log" 2>&1 &
redis_pid=$!

# One record per producer batch, as when the figures in docs/BENCHMARKS.md were taken (before the
# patched broker let `just dev` batch), so that new runs compare with them.
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES=1 DB_NAME=catalog_bench DB_SCHEMA=bench_faults \
    CACHE_KEY_PREFIX=benchf: LOG_FORMAT=json RUST_LOG=error REDIS_URL="redis://127.0.0.1:$redis_port"
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & pids+=($!)
API_ADDR=127.0.0.1:18095 "$bin/catalog-api" 2>"$tmp/api-redis.log" & pids+=($!)
API_ADDR=127.0.0.1:18096 REDIS_URL= "$bin/catalog-api" 2>"$tmp/api-nocache.log" & pids+=($!)
for port in 18095 18096; do
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
done
signup=$(curl -fs -X POST http://127.0.0.1:18095/users -H 'Content-Type: application/json' \
    -d "{\"name\":\"Bench\",\"email\":\"bench-$RANDOM$RANDOM@example.com\"}")
key=$(echo "$signup" | sed 's/.*"api_key":"\([^"]*\)".*/\1/')
id=$(curl -fs -X POST http://127.0.0.1:18095/products -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d '{"product_name":"Walnut desk","product_price":"349.90"}' | sed 's/.*"id":"\([^"]*\)".*/\1/')
curl -fs "http://127.0.0.1:18095/products/$id" >/dev/null   # projected and cached

healthy=$(run_wrk "http://127.0.0.1:18095/products/$id")
disabled=$(run_wrk "http://127.0.0.1:18096/products/$id")
kill -STOP "$redis_pid"
# The first second of the hang pays the timeouts that open the circuit; measure after it.
curl -s -o /dev/null "http://127.0.0.1:18095/products/$id"; sleep 1
hung=$(run_wrk "http://127.0.0.1:18095/products/$id")
kill -CONT "$redis_pid"

echo "| Redis ($C connections, ${D} s) | req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|"
for row in "healthy:$healthy" "disabled (REDIS_URL empty):$disabled" "hung (SIGSTOP), after the first second:$hung"; do
    read -r rps p50 p99 _ <<<"${row#*:}"
    echo "| ${row%%:*} | $rps | $p50 | $p99 |"
done
read -r hung_rps _ <<<"$hung"
read -r disabled_rps _ <<<"$disabled"
awk -v h="$hung_rps" -v d="$disabled_rps" 'BEGIN { printf "\nhung / disabled = %.2f (target >= 0.9)\n", h/d }'
