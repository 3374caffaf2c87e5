#!/usr/bin/env bash
# Latency budget (issue "latency budget"), release build, one machine, the same broker and database as the
# other benchmarks:
#   1. BENCH_PRODUCTS (100) sequential products without images: POST answered, POST → visible in the
#      list (which never waits for the projection);
#   2. BENCH_IMAGES (30) sequential products with one distinct 3000×2000 JPEG each: POST → image ready;
#   3. a steady BENCH_RATE (200) products/s for BENCH_STEADY_SECONDS (10): POST → readable
#      (GET ?min_version=2, which wakes when the projector commits);
#   4. the per-hop breakdown from the services' logs (projector: delivery and apply per batch; worker:
#      delivery, download, store check, CPU wait, render, store, result per job/image);
#   5. idle CPU of the API, projector and worker together over BENCH_IDLE_SECONDS (10) without traffic.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
N="${BENCH_PRODUCTS:-100}"
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalog-image-worker --bin catalogctl
cargo build --release --quiet -p benches --bin bench-photo
scripts/broker.sh restart bench 19192 >/dev/null
scripts/s3.sh start 8333 >/dev/null
"$bin/bench-photo" "$tmp/photo.jpg"
serve_distinct_photos "$tmp/photo.jpg" 18198
# One record per producer batch, as when the figures in docs/BENCHMARKS.md were taken (before the
# patched broker let `just dev` batch), so that new runs compare with them.
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES=1 DB_NAME=catalog_bench DB_SCHEMA=bench_latency \
    CACHE_KEY_PREFIX=benchl: LOG_FORMAT=json RUST_LOG=warn,projector=debug,image_worker=info \
    IMAGE_STORE=s3 S3_ENDPOINT=http://127.0.0.1:8333 S3_BUCKET=images AWS_ACCESS_KEY_ID=catalog \
    AWS_SECRET_ACCESS_KEY=catalog-secret IMAGE_FETCH_ALLOW_NETWORKS=127.0.0.1/32 IMAGE_KEY_PREFIX="benchl-$RANDOM/"
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & projector=$!; pids+=($projector)
"$bin/catalog-image-worker" 2>"$tmp/worker.log" & worker=$!; pids+=($worker)
API_ADDR=127.0.0.1:18097 "$bin/catalog-api" 2>"$tmp/api.log" & api=$!; pids+=($api)
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18097/healthz >/dev/null && break; sleep 0.1; done
python3 - "$N" "${BENCH_IMAGES:-30}" "${BENCH_RATE:-200}" "${BENCH_STEADY_SECONDS:-10}" <<'PY'
import json, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
base = "http://127.0.0.1:18097"
def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
def q(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * f))] if xs else float("nan")
user = call("POST", "/users", {"name": "Bench", "email": f"lat-{time.time_ns()}@example.com"})
auth = {"Authorization": "Bearer " + user["api_key"]}
posts, visible = [], []
for n in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    created = call("POST", "/products", {"product_name": f"P{n}", "product_price": "1.00"}, auth)
    t1 = time.perf_counter()
    while True:
        page = call("GET", f"/products?user_id={user['id']}&name=P{n}&limit=250")
        if any(p["id"] == created["id"] for p in page["items"]):
            break
        time.sleep(0.001)
    t2 = time.perf_counter()
    posts.append((t1 - t0) * 1000)
    visible.append((t2 - t0) * 1000)
ready = []
for n in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    created = call("POST", "/products", {"product_name": f"I{n}", "product_price": "1.00",
                   "product_images": [f"http://127.0.0.1:18198/photo/{time.time_ns()}.jpg"]}, auth)
    while call("GET", f"/products/{created['id']}")["images"][0]["status"] == "pending":
        time.sleep(0.002)
    ready.append((time.perf_counter() - t0) * 1000)
rate, seconds = float(sys.argv[3]), float(sys.argv[4])
readable, lock = [], threading.Lock()
def one(n):
    t0 = time.perf_counter()
    created = call("POST", "/products", {"product_name": f"S{n}", "product_price": "1.00"}, auth)
    call("GET", f"/products/{created['id']}?min_version=2")
    with lock:
        readable.append((time.perf_counter() - t0) * 1000)
start = time.perf_counter()
with ThreadPoolExecutor(max_workers=32) as pool:
    n = 0
    while time.perf_counter() - start < seconds:
        pool.submit(one, n); n += 1
        time.sleep(max(0, start + n / rate - time.perf_counter()))
achieved = len(readable) / (time.perf_counter() - start)
print(f"| path | p50 ms | p99 ms |")
print("|---|---|---|")
print(f"| POST /products answered ({len(posts)} sequential) | {q(posts, .5):.1f} | {q(posts, .99):.1f} |")
print(f"| POST → visible in the list ({len(posts)} sequential) | {q(visible, .5):.1f} | {q(visible, .99):.1f} |")
print(f"| POST → image ready, one 3000×2000 JPEG ({len(ready)} sequential) | {q(ready, .5):.1f} | {q(ready, .99):.1f} |")
print(f"| POST → readable (min_version) at {rate:.0f}/s offered, {achieved:.0f}/s done | {q(readable, .5):.1f} | {q(readable, .99):.1f} |")
PY
echo
python3 - "$tmp/projector.log" "$tmp/worker.log" <<'PY'
import json, sys
def fields(path, message):
    out = []
    for line in open(path):
        try:
            j = json.loads(line)
        except ValueError:
            continue
        f = j.get("fields", {})
        if f.get("message") == message:
            out.append(f)
    return out
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")
rows = [
    ("projector", "batch projected", "hop.delivery_ms", "produce → batch in hand (oldest event)"),
    ("projector", "batch projected", "hop.apply_ms", "apply + commit a batch"),
    ("worker", "job received", "hop.delivery_ms", "produce → job in hand"),
    ("worker", "image processed", "hop.download_ms", "download"),
    ("worker", "image processed", "hop.store_check_ms", "store: variants already there?"),
    ("worker", "image processed", "hop.cpu_wait_ms", "header check, wait for memory and a CPU slot"),
    ("worker", "image processed", "hop.render_ms", "decode + 4 variants + encode"),
    ("worker", "image processed", "hop.store_ms", "store 4 variants"),
    ("worker", "job answered", "hop.result_ms", "append ImagesProcessed + publish"),
]
print("| hop (from the services' logs) | samples | p50 ms | p99 ms |")
print("|---|---|---|---|")
for who, message, key, label in rows:
    xs = [float(f[key]) for f in fields(sys.argv[1] if who == "projector" else sys.argv[2], message) if key in f]
    print(f"| {who}: {label} | {len(xs)} | {q(xs, .5):.1f} | {q(xs, .99):.1f} |")
PY
# Idle cost: CPU ticks of the three services over the idle window, as a share of one core.
sleep 3
ticks() { for p in "$api" "$projector" "$worker"; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{s += $1} END {print s}'; }
idle="${BENCH_IDLE_SECONDS:-10}"
before=$(ticks); sleep "$idle"; after=$(ticks)
hz=$(getconf CLK_TCK)
echo
echo "idle CPU of API + projector + worker over ${idle} s: $(awk -v t="$((after - before))" -v hz="$hz" -v s="$idle" 'BEGIN { printf "%.2f", 100 * t / hz / s }') % of one core"
