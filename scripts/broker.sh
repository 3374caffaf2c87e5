#!/usr/bin/env bash
# The Kafka-protocol broker for development and tests: Tansu (see docs in README "Infrastructure").
#
#   scripts/broker.sh ensure              install tansu if no copy can be found (idempotent)
#   scripts/broker.sh start NAME PORT     start a broker named NAME on 127.0.0.1:PORT unless one listens
#   scripts/broker.sh restart NAME PORT   stop NAME (and any tansu on PORT) if running, start it fresh (empty)
#   scripts/broker.sh stop NAME           stop NAME
#
# State (pid, log) lives in .run/NAME/ under the repository. Storage is in memory: a restart is empty.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TANSU_VERSION=0.6.0

find_tansu() {
    if command -v tansu >/dev/null 2>&1; then command -v tansu; return; fi
    local candidate
    for candidate in "$root/../shared/bin/tansu" "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
    return 1
}

ensure() {
    if find_tansu >/dev/null; then return; fi
    echo "broker: no tansu found; installing tansu $TANSU_VERSION with cargo (about 30 minutes on 2 cores)" >&2
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql,postgres >&2
    find_tansu >/dev/null
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    local name=$1 port=$2 dir="$root/.run/$1"
    if listening "$port"; then echo "broker: $name already listening on 127.0.0.1:$port"; return; fi
    ensure
    local bin; bin="$(find_tansu)"
    mkdir -p "$dir"
    # Minimal environment: tansu reads a .env in its working directory and many variables.
    (cd "$dir" && exec env -i PATH="/usr/bin:/bin" HOME="$HOME" RUST_LOG=warn \
        "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "memory://tansu/" \
        >"$dir/broker.log" 2>&1) &
    echo $! >"$dir/broker.pid"
    for _ in $(seq 1 100); do
        if listening "$port"; then echo "broker: $name started on 127.0.0.1:$port (pid $(cat "$dir/broker.pid"))"; return; fi
        sleep 0.1
    done
    echo "broker: $name did not start; see $dir/broker.log" >&2
    tail -20 "$dir/broker.log" >&2 || true
    return 1
}

stop() {
    local name=$1 pidfile="$root/.run/$1/broker.pid"
    [ -f "$pidfile" ] || return 0
    local pid; pid="$(cat "$pidfile")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# A tansu on PORT that this checkout did not start (another checkout's `just test`, say): a restart
# promises an empty broker, so it is stopped too.
stop_port() {
    local port=$1 pid
    pid="$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o '"tansu",pid=[0-9]*' | grep -o '[0-9]*$' | head -1 || true)"
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
    ensure) ensure; find_tansu ;;
    start) start "$2" "$3" ;;
    restart) stop "$2"; stop_port "$3"; start "$2" "$3" ;;
    stop) stop "$2" ;;
    *) echo "usage: $0 ensure | start NAME PORT | restart NAME PORT | stop NAME" >&2; exit 2 ;;
esac
