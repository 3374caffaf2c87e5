#!/usr/bin/env bash
# Write-path benchmark (issue "products change", item 6): POST /products and PATCH /products/{id} at the
# same concurrency, next to two ceilings measured in the same run on the same machine:
#   - broker: a bare idempotent rdkafka producer (acks=all) appending the same two events per "request",
#     each acknowledged before the next, as a POST does (benches/bin/produce_ceiling.rs);
#   - database: pgbench inserting the same command row into api_commands.
# Prints a markdown table and the ratios. Needs wrk and pgbench (installed from Debian when missing).
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"

for tool in wrk pgbench; do
    command -v "$tool" >/dev/null || apt-get install -y -qq wrk postgresql-client >/dev/null
done
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalogctl
cargo build --release --quiet -p benches --bin produce-ceiling
scripts/broker.sh restart bench 19192 >/dev/null

# BENCH_API_BIN=PATH runs another build of the API (an A/B of two commits on the same machine), with
# BENCH_CTL_BIN=PATH, the catalogctl of the same commit, when their migrations differ.
ctl="${BENCH_CTL_BIN:-$bin/catalogctl}"
# Records per producer batch, for the API and the ceiling alike: by default what `just dev` uses on this
# broker (the services' default, 10000, on the patched Tansu; 1 on a stock one, whose consumers lose the
# rest of a batch they start inside); BENCH_PRODUCER_BATCH=1 measures one record per batch.
BENCH_PRODUCER_BATCH="${BENCH_PRODUCER_BATCH:-$(scripts/broker.sh batch-messages bench)}"
echo "producer batches of up to $BENCH_PRODUCER_BATCH messages" >&2
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES="$BENCH_PRODUCER_BATCH" DB_NAME=catalog_bench DB_SCHEMA=bench_write \
    CACHE_KEY_PREFIX=benchw: LOG_FORMAT=json RUST_LOG=warn
"$ctl" migrate --reset >/dev/null
"$ctl" topics >/dev/null
API_ADDR=127.0.0.1:18090 "${BENCH_API_BIN:-$bin/catalog-api}" 2>"$tmp/api.log" & pids+=($!)
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18090/healthz >/dev/null && break; sleep 0.1; done

signup=$(curl -fs -X POST http://127.0.0.1:18090/users -H 'Content-Type: application/json' \
    -d "{\"name\":\"Bench\",\"email\":\"bench-$RANDOM$RANDOM@example.com\"}")
user=$(echo "$signup" | sed 's/.*"id":"\([^"]*\)".*/\1/')
key=$(echo "$signup" | sed 's/.*"api_key":"\([^"]*\)".*/\1/')
body="{\"user_id\":\"$user\",\"product_name\":\"Walnut desk\",\"product_description\":\"Solid walnut, 140 x 70 cm, oiled.\",\"product_price\":\"349.90\",\"product_images\":[]}"
# Products to edit: PATCHes spread over them (no If-Match), each changing the description.
ids=()
for _ in $(seq 1 200); do
    ids+=("$(curl -fs -X POST http://127.0.0.1:18090/products -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d "$body" \
        | sed 's/.*"id":"\([^"]*\)".*/\1/')")
done
{
    echo "local key = \"$key\""
    echo "local ids = {"; printf '"%s",\n' "${ids[@]}"; echo "}"
    cat <<'LUA'
local n = 0
request = function()
  n = n + 1
  local id = ids[math.random(#ids)]
  local body = '{"product_description":"edit ' .. n .. '-' .. math.random(1000000000) .. '"}'
  return wrk.format("PATCH", "/products/" .. id, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}, body)
end
LUA
} >"$tmp/patch.lua"
cat >"$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '$body'
LUA

post=$(run_wrk -s "$tmp/post.lua" http://127.0.0.1:18090/products)
patch=$(run_wrk -s "$tmp/patch.lua" http://127.0.0.1:18090)

# Broker ceiling: the same event bytes, two acknowledged appends per request, same concurrency.
psql -h 127.0.0.1 -U postgres -d catalog_bench -Atc "SELECT envelope FROM bench_write.event_store ORDER BY recorded_at LIMIT 1" >"$tmp/event.json"
"$ctl" topics >/dev/null
broker=$("$bin/produce-ceiling" 127.0.0.1:19192 catalog.products "$tmp/event.json" "$C" "$D")

# Database ceiling: the command row a POST records, inserted by pgbench at the same concurrency.
response=$(psql -h 127.0.0.1 -U postgres -d catalog_bench -Atc "SELECT response FROM bench_write.api_commands WHERE route = 'POST /products' LIMIT 1")
cat >"$tmp/insert.sql" <<SQL
INSERT INTO bench_write.api_commands (id, route, request_hash, response, aggregate_id)
VALUES (gen_random_uuid(), 'POST /products', '\\x00', '$response', gen_random_uuid());
SQL
(cd "$tmp" && pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$C" -j 2 -T "$D" -f "$tmp/insert.sql" \
    --log --log-prefix="$tmp/pgb" catalog_bench >"$tmp/pgbench.txt" 2>&1)
tps=$(awk '/^tps/ {printf "%.0f", $3; exit}' "$tmp/pgbench.txt")
cat "$tmp"/pgb* | awk '{print $3/1000}' | sort -n >"$tmp/lat.txt"
lines=$(wc -l <"$tmp/lat.txt")
p50=$(awk -v n="$lines" 'NR==int(n*0.5)+1 {printf "%.2f", $1}' "$tmp/lat.txt")
p99=$(awk -v n="$lines" 'NR==int(n*0.99)+1 {printf "%.2f", $1}' "$tmp/lat.txt")
db="$tps $p50 $p99"

read -r post_rps post_p50 post_p99 post_bad <<<"$post"
read -r patch_rps patch_p50 patch_p99 patch_bad <<<"$patch"
read -r broker_rps broker_p50 broker_p99 <<<"$broker"
read -r db_rps db_p50 db_p99 <<<"$db"
lower=$(( broker_rps < db_rps ? broker_rps : db_rps ))
echo "| what ($C connections, ${D} s) | req/s | p50 ms | p99 ms | non-2xx |"
echo "|---|---|---|---|---|"
echo "| POST /products | $post_rps | $post_p50 | $post_p99 | $post_bad |"
echo "| PATCH /products/{id} | $patch_rps | $patch_p50 | $patch_p99 | $patch_bad |"
echo "| broker ceiling: bare producer, 2 acknowledged appends per request | $broker_rps | $broker_p50 | $broker_p99 | |"
echo "| database ceiling: pgbench INSERT of the command row | $db_rps | $db_p50 | $db_p99 | |"
awk -v a="$post_rps" -v b="$patch_rps" -v l="$lower" -v ap50="$post_p50" -v ap99="$post_p99" -v bp50="$patch_p50" -v bp99="$patch_p99" 'BEGIN {
  printf "\nPOST / lower ceiling = %.2f (target >= 0.5); PATCH / lower ceiling = %.2f (target >= 0.5)\n", a/l, b/l
  printf "POST p99/p50 = %.2f; PATCH p99/p50 = %.2f (target <= 3)\n", ap99/ap50, bp99/bp50 }'
