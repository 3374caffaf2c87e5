#!/usr/bin/env bash
# The Kafka-protocol broker for development and tests: Tansu (see docs in README "Infrastructure").
#
#   scripts/broker.sh ensure              build the patched tansu the tests need unless built (idempotent)
#   scripts/broker.sh start NAME PORT     start a broker named NAME on 127.0.0.1:PORT unless one listens
#   scripts/broker.sh restart NAME PORT   stop NAME (and any tansu on PORT) if running, start it fresh (empty)
#   scripts/broker.sh stop NAME           stop NAME
#   scripts/broker.sh batch-messages NAME the producer batch size (KAFKA_PRODUCER_BATCH_MESSAGES) safe for
#                                         the broker NAME runs: librdkafka's 10000 on the patched build,
#                                         1 on a stock tansu or a broker this script did not start
#
# State (pid, log) lives in .run/NAME/ under the repository. Storage is in memory: a restart is empty.
#
# The broker is tansu 0.6.0 from crates.io with our patches (scripts/tansu/<crate>.patch: its group
# coordinator keeps a dead group leader for good, it cannot describe groups, and it mishandles
# multi-record batches in fetch and ListOffsets; README "Infrastructure") built once per machine into
# ~/.cache/catalog/tansu/<patch hash>/ (about 10 minutes on 2 cores). Tests need that build; `just dev`
# and benchmarks use it when it is there and otherwise a stock tansu (on PATH or ../shared/bin/tansu),
# so a first `just dev` does not wait for a compile. TANSU_BIN overrides both.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TANSU_VERSION=0.6.0

# Bump when the build itself changes (features, command), so a machine builds anew.
BUILD_RECIPE=1
patches_hash() { { echo "recipe $BUILD_RECIPE"; cat "$root"/scripts/tansu/*.patch; } | sha256sum | cut -c1-16; }
patched_bin() { echo "${CATALOG_CACHE:-$HOME/.cache/catalog}/tansu/$TANSU_VERSION-$(patches_hash)/bin/tansu"; }

# The stock release: a tansu on PATH, else the machine's prebuilt copy, else one installed by cargo.
stock_tansu() {
    if command -v tansu >/dev/null 2>&1; then command -v tansu; return; fi
    local candidate
    for candidate in "$root/../shared/bin/tansu" "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
    return 1
}

find_tansu() {
    if [ -n "${TANSU_BIN:-}" ]; then echo "$TANSU_BIN"; return; fi
    local patched; patched="$(patched_bin)"
    if [ -x "$patched" ]; then echo "$patched"; return; fi
    stock_tansu
}

# crates.io's checksum of a crate file, from the sparse index (what cargo itself checks).
index_checksum() {
    local name=$1 version=$2
    curl -sSf --retry 3 "https://index.crates.io/${name:0:2}/${name:2:2}/$name" |
        python3 -c 'import json,sys; v=sys.argv[1]; print(next(e["cksum"] for e in map(json.loads, sys.stdin) if e["vers"]==v))' "$version"
}

fetch_crate() {
    local name=$1 dir=$2 file="$2/$1-$TANSU_VERSION.crate"
    curl -sSfL --retry 3 -o "$file" "https://static.crates.io/crates/$name/$name-$TANSU_VERSION.crate"
    local want; want="$(index_checksum "$name" "$TANSU_VERSION")"
    echo "$want  $file" | sha256sum -c --quiet - >&2
    tar xzf "$file" -C "$dir"
}

# Build tansu with each patched crate (scripts/tansu/<crate>.patch): tansu's own published Cargo.lock
# pins every other dependency; only the patched crates' entries change (a path instead of the registry).
build_patched() {
    local bin; bin="$(patched_bin)"
    local tool
    for tool in curl python3 git cargo cc sha256sum; do
        command -v "$tool" >/dev/null || { echo "broker: building the test broker needs $tool" >&2; return 1; }
    done
    mkdir -p "$(dirname "$bin")"
    local work; work="$(mktemp -d "$(dirname "$(dirname "$bin")")/build.XXXXXX")"
    echo "broker: building tansu $TANSU_VERSION with scripts/tansu/*.patch into $(dirname "$bin") (about 10 minutes on 2 cores, once per machine)" >&2
    fetch_crate tansu "$work"
    printf '\n[patch.crates-io]\n' >>"$work/tansu-$TANSU_VERSION/Cargo.toml"
    local patch crate
    for patch in "$root"/scripts/tansu/*.patch; do
        crate="$(basename "$patch" .patch)"
        fetch_crate "$crate" "$work"
        (cd "$work/$crate-$TANSU_VERSION" && GIT_CEILING_DIRECTORIES="$work" git apply "$patch")
        printf '%s = { path = "../%s-%s" }\n' "$crate" "$crate" "$TANSU_VERSION" \
            >>"$work/tansu-$TANSU_VERSION/Cargo.toml"
    done
    # `memory://` (the tests' storage) needs the dynostore feature; nothing else is needed.
    (cd "$work/tansu-$TANSU_VERSION" &&
        env -u CARGO_TARGET_DIR cargo build --release --quiet --no-default-features --features dynostore \
            --target-dir "$work/target" >&2)
    cp "$work/target/release/tansu" "$bin.tmp.$$"
    mv "$bin.tmp.$$" "$bin"
    rm -rf "$work"
}

# One build per machine even when several test processes ask at once: the others wait for it.
ensure() {
    if [ -n "${TANSU_BIN:-}" ] || [ -x "$(patched_bin)" ]; then return; fi
    local lock; lock="$(dirname "$(dirname "$(patched_bin)")")"
    mkdir -p "$lock"
    (
        flock 9
        if [ ! -x "$(patched_bin)" ]; then build_patched; fi
    ) 9>"$lock.lock"
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    local name=$1 port=$2 dir="$root/.run/$1"
    if listening "$port"; then echo "broker: $name already listening on 127.0.0.1:$port"; return; fi
    local bin; bin="$(find_tansu)" || { ensure; bin="$(find_tansu)"; }
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

# Stock Tansu 0.6 answers a fetch that starts inside a multi-record batch from the next batch, so
# consumers resuming there lose the rest of it; our patch fixes that (tansu-storage.patch). A broker
# that is not known to be the patched build (by the binary its process runs) gets one record per batch.
batch_messages() {
    local pidfile="$root/.run/$1/broker.pid" exe=""
    if [ -f "$pidfile" ]; then exe="$(readlink -f "/proc/$(cat "$pidfile")/exe" 2>/dev/null || true)"; fi
    if [ -n "$exe" ] && [ "$exe" = "$(readlink -f "$(patched_bin)")" ]; then
        echo 10000
    else
        echo 1
    fi
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
    batch-messages) batch_messages "$2" ;;
    *) echo "usage: $0 ensure | start NAME PORT | restart NAME PORT | stop NAME | batch-messages NAME" >&2; exit 2 ;;
esac
