#!/usr/bin/env bash
# The image worker's peak memory on hostile images (issue "hardening", item 2): the corpus of
# benches/hostile.rs at 39 MP (16-bit RGBA PNG with an EXIF rotation, progressive and CMYK JPEGs, a
# full-screen GIF, a lossless WebP, a GIF frame far beyond its screen, zero-width GIFs, a PNG header
# declaring 268 MP, a cut-off JPEG), BENCH_COPIES (4) distinct copies of each, ten images per product,
# every product posted at once, with IMAGE_CPU_WORKERS=2 (both cores busy). Run once with the default
# IMAGE_MEMORY_LIMIT_MB=1024 and once with the budget out of the way (1 TiB) for comparison. Prints per
# run: peak RSS of the worker (VmHWM), seconds until every image had an outcome, and outcomes that
# differ from the expected ones (none expected). Release build.
source "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
scripts/check-services.sh
cargo build --release --quiet --bin catalog-api --bin catalog-projector --bin catalog-image-worker --bin catalogctl
cargo build --release --quiet -p benches --bin hostile-corpus
scripts/broker.sh restart bench 19192 >/dev/null
copies="${BENCH_COPIES:-4}"
"$bin/hostile-corpus" "$tmp/corpus" "${BENCH_MEGAPIXELS:-39}" "$copies" >"$tmp/corpus.txt"
echo "corpus: $(wc -l <"$tmp/corpus.txt") files, $(du -sh "$tmp/corpus" | cut -f1)"
(cd "$tmp/corpus" && exec python3 -m http.server 18198 --bind 127.0.0.1 >"$tmp/images.log" 2>&1) & pids+=($!)
export KAFKA_BROKERS=127.0.0.1:19192 DB_NAME=catalog_bench DB_SCHEMA=bench_hostile \
    CACHE_KEY_PREFIX=benchhostile: LOG_FORMAT=json RUST_LOG=warn IMAGE_FETCH_ALLOW_NETWORKS=127.0.0.1/32 \
    IMAGE_CPU_WORKERS=2 IMAGE_LOCAL_DIR="$tmp/store" IMAGE_RETRY_DELAYS_MS=200
"$bin/catalogctl" migrate --reset >/dev/null
"$bin/catalog-projector" 2>"$tmp/projector.log" & pids+=($!)
API_ADDR=127.0.0.1:18098 "$bin/catalog-api" 2>"$tmp/api.log" & pids+=($!)
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18098/healthz >/dev/null && break; sleep 0.1; done

echo
echo "| IMAGE_MEMORY_LIMIT_MB | images | worker peak RSS MiB | seconds to all outcomes | unexpected outcomes |"
echo "|---|---|---|---|---|"
for limit in 1024 1048576; do
    rm -rf "$tmp/store"
    IMAGE_MEMORY_LIMIT_MB=$limit "$bin/catalog-image-worker" 2>"$tmp/worker-$limit.log" &
    worker=$!
    pids+=($worker)
    sleep 1
    python3 - "$worker" "$limit" "$tmp/corpus.txt" <<'PY'
import json, sys, time, urllib.request
worker, limit, listing = int(sys.argv[1]), sys.argv[2], sys.argv[3]
base = "http://127.0.0.1:18098"
def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
files = [line.split() for line in open(listing)]
expect = {name: outcome for name, _, outcome in files}
user = call("POST", "/users", {"name": "Bench", "email": f"hostile-{time.time_ns()}@example.com"})
auth = {"Authorization": "Bearer " + user["api_key"]}
run = time.time_ns()
names = [name for name, _, _ in files]
start = time.monotonic()
products = []
for i in range(0, len(names), 10):
    chunk = names[i:i + 10]
    urls = [f"http://127.0.0.1:18198/{n}?run={run}" for n in chunk]
    p = call("POST", "/products", {"product_name": f"Hostile {i}", "product_price": "1.00",
                                   "product_images": urls}, auth)
    products.append((p["id"], chunk))
def rss(field):
    for line in open(f"/proc/{worker}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
outcomes = {}
while time.monotonic() - start < 600:
    outcomes = {}
    for pid, chunk in products:
        images = call("GET", f"/products/{pid}")["images"]
        for name, image in zip(chunk, images):
            status = image["status"]
            outcomes[name] = status if status != "failed" else f"failed:{image.get('error_class')}"
    if all(o != "pending" for o in outcomes.values()):
        break
    time.sleep(0.2)
took = time.monotonic() - start
wrong = [f"{n}: {o} (expected {expect[n]})" for n, o in outcomes.items() if o != expect[n]]
print(f"| {limit} | {len(names)} | {rss('VmHWM'):.0f} | {took:.1f} | {len(wrong)} |")
for w in wrong:
    print("    " + w, file=sys.stderr)
PY
    kill "$worker"; wait "$worker" 2>/dev/null || true
done
