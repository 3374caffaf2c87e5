#!/usr/bin/env bash
# Write → read latency (issue "latency budget"): N sequential products, each POSTed and then polled on the
# list (which never waits for the projection) until it appears; prints p50/p99 of POST and of
# POST → visible. Release build, the same broker and database as the other benchmarks.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
N="${BENCH_PRODUCTS:-100}"
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalogctl
scripts/broker.sh restart bench 19192 >/dev/null
export KAFKA_BROKERS=127.0.0.1:19192 KAFKA_PRODUCER_BATCH_MESSAGES=1 DB_NAME=catalog_bench DB_SCHEMA=bench_latency \
    CACHE_KEY_PREFIX=benchl: LOG_FORMAT=json RUST_LOG=error
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & pids+=($!)
API_ADDR=127.0.0.1:18097 "$bin/catalog-api" 2>"$tmp/api.log" & pids+=($!)
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18097/healthz >/dev/null && break; sleep 0.1; done
python3 - "$N" <<'PY'
import json, sys, time, urllib.request
base = "http://127.0.0.1:18097"
def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
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
def q(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * f))]
print(f"| hop ({len(posts)} sequential products) | p50 ms | p99 ms |")
print("|---|---|---|")
print(f"| POST /products answered | {q(posts, .5):.1f} | {q(posts, .99):.1f} |")
print(f"| POST → visible in the list | {q(visible, .5):.1f} | {q(visible, .99):.1f} |")
PY
