# Shared by the HTTP benchmarks (sourced): settings, a scratch directory, cleanup of the processes
# they start, and wrk's summary as "req/s p50_ms p99_ms non_2xx".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
C="${BENCH_CONNECTIONS:-32}"
D="${BENCH_SECONDS:-10}"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release"
tmp="$(mktemp -d)"
pids=()
cleanup() {
    if declare -F bench_cleanup_extra >/dev/null; then bench_cleanup_extra; fi
    # BENCH_KEEP_LOGS=DIR keeps the services' logs of the run.
    if [ -n "${BENCH_KEEP_LOGS:-}" ]; then mkdir -p "$BENCH_KEEP_LOGS"; cp "$tmp"/*.log "$BENCH_KEEP_LOGS"/ 2>/dev/null || true; fi
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

to_ms() { # wrk prints 812.00us / 1.20ms / 1.01s
    awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.2f", n }'
}

# wrk ARGS... → "req/s p50_ms p99_ms non_2xx" (always with --latency, C connections, D seconds)
run_wrk() {
    wrk -t2 -c"$C" -d"${D}s" --latency "$@" >"$tmp/wrk.txt"
    local rps p50 p99 bad
    rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$tmp/wrk.txt")
    p50=$(awk '$1=="50%" {print $2}' "$tmp/wrk.txt")
    p99=$(awk '$1=="99%" {print $2}' "$tmp/wrk.txt")
    bad=$(awk '/Non-2xx/ {print $5}' "$tmp/wrk.txt")
    echo "$rps $(to_ms "$p50") $(to_ms "$p99") ${bad:-0}"
}

# serve_distinct_photos PHOTO PORT: serves PHOTO on 127.0.0.1:PORT with the request path appended after the
# JPEG end marker, so every URL is new content (the image store de-duplicates identical sources).
serve_distinct_photos() {
    python3 - "$1" "$2" >"$tmp/images.log" 2>&1 <<'PY' &
import http.server, sys
photo = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = photo + self.path.encode()
        self.send_response(200); self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
PY
    pids+=($!)
}
