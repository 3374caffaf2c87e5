#!/usr/bin/env bash
# Sustained writes (issue "projection at the speed of the log"): BENCH_SUSTAINED_SECONDS (60) of POST
# /products at the API's maximum rate (wrk, C connections), every other request a read-your-writes
# GET /products/{id}?min_version=2 of a product this thread just created. Prints the POST rate, how many
# of those GETs answered 503, and the projector's lag (events and seconds of events) when the load stops.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
S="${BENCH_SUSTAINED_SECONDS:-60}"
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalogctl
scripts/broker.sh restart bench 19192 >/dev/null
# One record per producer batch, as when the figures in docs/BENCHMARKS.md were taken (before the
# patched broker let `just dev` batch), so that new runs compare with them.
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES=1 DB_NAME=catalog_bench DB_SCHEMA=bench_sustained \
    CACHE_KEY_PREFIX=benchs: LOG_FORMAT=json RUST_LOG=warn PROJECTOR_GROUP_ID=bench-sustained
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalogctl" topics >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & pids+=($!)
API_ADDR=127.0.0.1:18098 "$bin/catalog-api" 2>"$tmp/api.log" & pids+=($!)
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18098/healthz >/dev/null && break; sleep 0.1; done
signup=$(curl -fs -X POST http://127.0.0.1:18098/users -H 'Content-Type: application/json' \
    -d "{\"name\":\"Bench\",\"email\":\"sustained-$RANDOM$RANDOM@example.com\"}")
user=$(echo "$signup" | sed 's/.*"id":"\([^"]*\)".*/\1/')
key=$(echo "$signup" | sed 's/.*"api_key":"\([^"]*\)".*/\1/')
cat >"$tmp/mixed.lua" <<LUA
local key = "$key"
local body = '{"user_id":"$user","product_name":"Walnut desk","product_description":"Solid walnut.","product_price":"349.90","product_images":[]}'
local created = {}
local post_next = true
gets, get_503, posts = 0, 0, 0
threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function() gets, get_503, posts = 0, 0, 0 end
request = function()
  if post_next or #created == 0 then
    post_next = false
    return wrk.format("POST", "/products", {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}, body)
  end
  post_next = true
  local id = table.remove(created, 1)
  return wrk.format("GET", "/products/" .. id .. "?min_version=2", {["Authorization"] = "Bearer " .. key})
end
response = function(status, headers, rbody)
  local id = string.match(rbody, '"id":"([0-9a-f-]+)"')
  if status == 201 and id then
    posts = posts + 1
    table.insert(created, id)
  elseif status == 200 then
    gets = gets + 1
  elseif status == 503 then
    get_503 = get_503 + 1
  end
end
done = function(summary, latency, requests)
  local g, b, p = 0, 0, 0
  for _, t in ipairs(threads) do
    g = g + t:get("gets"); b = b + t:get("get_503"); p = p + t:get("posts")
  end
  io.write(string.format("TOTALS %d %d %d\n", p, g, b))
end
LUA
started=$(date +%s.%N)
wrk -t2 -c"$C" -d"${S}s" -s "$tmp/mixed.lua" http://127.0.0.1:18098 >"$tmp/wrk.txt"
ended=$(date +%s.%N)
lag=$("$bin/catalogctl" lag --image-worker-group none --user-stats-group none 2>/dev/null \
    | awk '$1 == "bench-sustained" { lag += $6 } END { print lag + 0 }')
read -r _ posts gets bad < <(grep '^TOTALS' "$tmp/wrk.txt")
elapsed=$(echo "$ended - $started" | bc)
# Each POST appends two events; the lag in seconds is the lag in events over the rate they arrived at.
events_per_s=$(echo "scale=1; 2 * $posts / $elapsed" | bc)
lag_s=$(echo "scale=3; $lag / $events_per_s" | bc)
echo
echo "| $S s of POST at full rate (c=$C) | value |"
echo "|---|---|"
echo "| POST /products answered 201 | $posts ($(echo "scale=0; $posts / $elapsed" | bc)/s) |"
echo "| read-your-writes GETs (min_version=2) answered 200 | $gets |"
echo "| of those answered 503 | $bad |"
echo "| projector lag when the load stopped | $lag events = ${lag_s} s of events |"
