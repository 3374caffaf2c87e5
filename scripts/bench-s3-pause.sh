#!/usr/bin/env bash
# The image worker while S3 stops answering (issue "circuit breakers and load shedding", item 3): a
# steady BENCH_RATE (2) products/s with one distinct photo each, for BENCH_TOTAL_SECONDS (40);
# the S3 server (scripts/s3.sh, port 8333) is paused with SIGSTOP from second 10 to 20. Prints POST →
# image ready p50/p99 for the products created before, during and after the pause, and how many failed.
# Release build. The photo: BENCH_PHOTO, else the 4000×2250 JPEG that ships with the webp crate's sources
# (in the cargo registry of any machine that built the workspace).
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalog-image-worker --bin catalogctl
scripts/broker.sh restart bench 19192 >/dev/null
scripts/s3.sh start 8333 >/dev/null
weed_pid=$(cat .run/s3/weed.pid)
bench_cleanup_extra() { kill -CONT "$weed_pid" 2>/dev/null || true; }
photo="${BENCH_PHOTO:-$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/webp-0.3.1/assets/lake.jpg 2>/dev/null | head -1)}"
[ -f "$photo" ] || { echo "set BENCH_PHOTO to a JPEG" >&2; exit 1; }
cp "$photo" "$tmp/photo.jpg"
serve_distinct_photos "$tmp/photo.jpg" 18199
# One record per producer batch, as when the figures in docs/BENCHMARKS.md were taken (before the
# patched broker let `just dev` batch), so that new runs compare with them.
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES=1 DB_NAME=catalog_bench DB_SCHEMA=bench_s3pause \
    CACHE_KEY_PREFIX=benchs3: LOG_FORMAT=json RUST_LOG=error IMAGE_STORE=s3 S3_ENDPOINT=http://127.0.0.1:8333 \
    S3_BUCKET=images AWS_ACCESS_KEY_ID=catalog AWS_SECRET_ACCESS_KEY=catalog-secret \
    IMAGE_FETCH_ALLOW_NETWORKS=127.0.0.1/32 IMAGE_KEY_PREFIX="benchs3-$RANDOM/"
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & pids+=($!)
"$bin/catalog-image-worker" 2>"$tmp/worker.log" & pids+=($!)
API_ADDR=127.0.0.1:18099 "$bin/catalog-api" 2>"$tmp/api.log" & pids+=($!)
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18099/healthz >/dev/null && break; sleep 0.1; done
python3 - "$weed_pid" "${BENCH_RATE:-2}" "${BENCH_TOTAL_SECONDS:-40}" <<'PY'
import json, os, signal, sys, threading, time, urllib.request
weed, rate, total = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
base = "http://127.0.0.1:18099"
def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
user = call("POST", "/users", {"name": "Bench", "email": f"s3p-{time.time_ns()}@example.com"})
auth = {"Authorization": "Bearer " + user["api_key"]}
start = time.monotonic()
created = []  # (phase, id, t_post)
def pauser():
    time.sleep(10); os.kill(weed, signal.SIGSTOP)
    time.sleep(10); os.kill(weed, signal.SIGCONT)
threading.Thread(target=pauser, daemon=True).start()
ready, failed = {}, {}
lock = threading.Lock()
def watch():
    # Polls every product created so far until each has an outcome (runs while products are created).
    deadline = start + total + 120
    while time.monotonic() < deadline:
        with lock:
            todo = [(ph, pid, t) for ph, pid, t in created if pid not in ready and pid not in failed]
            finished = not todo and time.monotonic() - start >= total
        if finished:
            return
        for phase, pid, t in todo:
            status = call("GET", f"/products/{pid}")["images"][0]["status"]
            if status == "ready":
                ready[pid] = time.monotonic() - t
            elif status == "failed":
                failed[pid] = phase
        time.sleep(0.02)
watcher = threading.Thread(target=watch)
watcher.start()
n = 0
while time.monotonic() - start < total:
    t = time.monotonic()
    phase = "before" if t - start < 10 else ("during" if t - start < 20 else "after")
    p = call("POST", "/products", {"product_name": f"P{n}", "product_price": "1.00",
                                   "product_images": [f"http://127.0.0.1:18199/p/{time.time_ns()}-{n}.jpg"]}, auth)
    with lock:
        created.append((phase, p["id"], t))
    n += 1
    time.sleep(max(0, start + n / rate - time.monotonic()))
watcher.join()
def q(xs, f):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * f))] if xs else float("nan")
print(f"| products created (S3 paused 10–20 s) | count | ready | failed | POST → ready p50 ms | p99 ms |")
print("|---|---|---|---|---|---|")
for phase in ("before", "during", "after"):
    mine = [pid for ph, pid, _ in created if ph == phase]
    lat = [ready[p] * 1000 for p in mine if p in ready]
    print(f"| {phase} the pause | {len(mine)} | {len(lat)} | {sum(1 for p in mine if p in failed)} | {q(lat, .5):.0f} | {q(lat, .99):.0f} |")
PY
