#!/usr/bin/env bash
# Read-path benchmark (issue #4): GET /products/:id with the cache (a), without it (b), the HTTP stack's
# ceiling serving a static body of the same size (c), raw Redis GET (d) and raw PostgreSQL primary-key
# select (e), all at the same concurrency on this machine, in one run. Prints a markdown table and the
# ratios a/c, b/e, a/b. Needs wrk, redis-benchmark and pgbench (installed from Debian when missing).
# One hot product flatters the uncached path (concurrent misses of one product share one PostgreSQL
# read), so a' and b are also measured over BENCH_READ_PRODUCTS (300) products read at random: the
# per-request cost of a Redis hit against a PostgreSQL read.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"

for tool in wrk redis-benchmark pgbench; do
    command -v "$tool" >/dev/null || apt-get install -y -qq wrk redis-tools postgresql-client >/dev/null
done
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalogctl
cargo build --release --quiet -p benches --bin static-json
scripts/broker.sh restart bench 19192 >/dev/null

# One record per producer batch, as when the figures in docs/BENCHMARKS.md were taken (before the
# patched broker let `just dev` batch), so that new runs compare with them.
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES=1 DB_NAME=catalog_bench DB_SCHEMA=bench \
    CACHE_KEY_PREFIX=bench: LOG_FORMAT=json RUST_LOG=warn
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & pids+=($!)
API_ADDR=127.0.0.1:18080 CACHE_LOCAL_TTL_MS=250 "$bin/catalog-api" 2>"$tmp/api-cache.log" & pids+=($!)
API_ADDR=127.0.0.1:18083 "$bin/catalog-api" 2>"$tmp/api-redis.log" & pids+=($!)
API_ADDR=127.0.0.1:18081 REDIS_URL= "$bin/catalog-api" 2>"$tmp/api-nocache.log" & pids+=($!)
for port in 18080 18081 18083; do
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
done

signup=$(curl -fs -X POST http://127.0.0.1:18080/users -H 'Content-Type: application/json' \
    -d "{\"name\":\"Bench\",\"email\":\"bench-$RANDOM$RANDOM@example.com\"}")
user=$(echo "$signup" | sed 's/.*"id":"\([^"]*\)".*/\1/')
key=$(echo "$signup" | sed 's/.*"api_key":"\([^"]*\)".*/\1/')
product=$(curl -fs -X POST http://127.0.0.1:18080/products -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d "{\"user_id\":\"$user\",\"product_name\":\"Walnut desk\",\"product_description\":\"Solid walnut, 140 x 70 cm, oiled.\",\"product_price\":\"349.90\",\"product_images\":[\"https://images.example.com/desk-front.jpg\",\"https://images.example.com/desk-side.jpg\"]}")
id=$(echo "$product" | sed 's/.*"id":"\([^"]*\)".*/\1/')
curl -fs "http://127.0.0.1:18081/products/$id" >"$tmp/body.json"
"$bin/static-json" "$tmp/body.json" 127.0.0.1:18082 2>/dev/null & pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:18082/products/$id" >/dev/null && break; sleep 0.1; done
curl -fs "http://127.0.0.1:18080/products/$id" >/dev/null   # warm the cache entry
size=$(wc -c <"$tmp/body.json")


curl -fs "http://127.0.0.1:18083/products/$id" >/dev/null
# Each HTTP variant runs twice, in opposite orders, and the two runs are averaged: on a shared 2-core
# machine the first runs of a session were measurably slower than later ones.
declare -A url=([a]="http://127.0.0.1:18080/products/$id" [a2]="http://127.0.0.1:18083/products/$id"
    [b]="http://127.0.0.1:18081/products/$id" [c]="http://127.0.0.1:18082/products/$id")
declare -A first second
for v in a a2 b c; do first[$v]=$(run_wrk "${url[$v]}"); done
for v in c b a2 a; do second[$v]=$(run_wrk "${url[$v]}"); done

# The spread: many products, each read at random (no two concurrent reads share anything).
spread=("$id")
for _ in $(seq 2 "${BENCH_READ_PRODUCTS:-300}"); do
    spread+=("$(curl -fs -X POST http://127.0.0.1:18080/products -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        -d "{\"user_id\":\"$user\",\"product_name\":\"Walnut desk\",\"product_description\":\"Solid walnut, 140 x 70 cm, oiled.\",\"product_price\":\"349.90\",\"product_images\":[\"https://images.example.com/desk-front.jpg\",\"https://images.example.com/desk-side.jpg\"]}" \
        | sed 's/.*"id":"\([^"]*\)".*/\1/')")
done
sleep 1
for pid in "${spread[@]}"; do curl -fs "http://127.0.0.1:18083/products/$pid?min_version=2" >/dev/null; done
{ echo "local ids = {"; printf '"%s",\n' "${spread[@]}"; echo "}"
  echo 'request = function() return wrk.format("GET", "/products/" .. ids[math.random(#ids)]) end'; } >"$tmp/spread.lua"
a2s1=$(run_wrk -s "$tmp/spread.lua" http://127.0.0.1:18083)
bs1=$(run_wrk -s "$tmp/spread.lua" http://127.0.0.1:18081)
bs2=$(run_wrk -s "$tmp/spread.lua" http://127.0.0.1:18081)
a2s2=$(run_wrk -s "$tmp/spread.lua" http://127.0.0.1:18083)
mean() { awk -v x="$1" -v y="$2" 'BEGIN { split(x, p, " "); split(y, q, " "); printf "%.0f %.2f %.2f", (p[1]+q[1])/2, (p[2]+q[2])/2, (p[3]+q[3])/2 }'; }
a=$(mean "${first[a]}" "${second[a]}")
a2s=$(mean "$a2s1" "$a2s2")
bs=$(mean "$bs1" "$bs2")
a2=$(mean "${first[a2]}" "${second[a2]}")
b=$(mean "${first[b]}" "${second[b]}")
c=$(mean "${first[c]}" "${second[c]}")
redis-benchmark -h 127.0.0.1 -p 6379 -c "$C" -n $((C * 5000)) -t get -d "$size" --csv >"$tmp/redis.csv" 2>/dev/null
d=$(awk -F'"' 'NR==2 {print $4" "$12" "$16}' "$tmp/redis.csv")
echo "SELECT id, user_id, product_name, product_description, product_price, product_images, images, compressed_product_images, version, created_at, updated_at FROM products WHERE id = '$id';" >"$tmp/q.sql"
(cd "$tmp" && PGOPTIONS='-c search_path=bench' pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$C" -j 2 -T "$D" \
    -f "$tmp/q.sql" --log --log-prefix="$tmp/pgb" catalog_bench >"$tmp/pgbench.txt" 2>&1)
tps=$(awk '/^tps/ {print $3; exit}' "$tmp/pgbench.txt")
cat "$tmp"/pgb* | awk '{print $3/1000}' | sort -n >"$tmp/lat.txt"
n=$(wc -l <"$tmp/lat.txt")
p50=$(awk -v n="$n" 'NR==int(n*0.50)+1 {printf "%.2f", $1}' "$tmp/lat.txt")
p99=$(awk -v n="$n" 'NR==int(n*0.99)+1 {printf "%.2f", $1}' "$tmp/lat.txt")
e="$tps $p50 $p99"

echo
echo "Body: $size bytes; concurrency $C; 2 × $D s per HTTP variant (averaged); $(nproc) cores; $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "| run | requests/s | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|"
row() { read -r r p5 p9 <<<"$2"; printf '| %s | %.0f | %s | %s |\n' "$1" "$r" "$p5" "$p9"; }
row "(a) GET /products/:id, cached: in-process tier (250 ms) + Redis (wrk)" "$a"
row "(a') GET /products/:id, cached: Redis only (wrk)" "$a2"
row "(b) GET /products/:id, cache disabled (wrk)" "$b"
row "(c) static JSON, same stack and size (wrk)" "$c"
row "(a's) Redis only, ${#spread[@]} products at random (wrk)" "$a2s"
row "(bs) cache disabled, ${#spread[@]} products at random (wrk)" "$bs"
row "(d) redis-benchmark -t get" "$d"
row "(e) pgbench, select by primary key" "$e"
ratio() { awk -v x="$(echo "$1" | cut -d' ' -f1)" -v y="$(echo "$2" | cut -d' ' -f1)" 'BEGIN { printf "%.2f", x / y }'; }
echo
echo "a/c = $(ratio "$a" "$c") (target ≥ 0.8)   b/e = $(ratio "$b" "$e") (target ≥ 0.7)   a/b = $(ratio "$a" "$b") (target ≥ 3)"
echo "a'/c = $(ratio "$a2" "$c")   a'/b = $(ratio "$a2" "$b")   b/c = $(ratio "$b" "$c")"
echo "a's/bs = $(ratio "$a2s" "$bs") (Redis hit vs PostgreSQL read, many products; target ≥ 1.2)"
