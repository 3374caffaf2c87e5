#!/usr/bin/env bash
# `just dev`: the whole system on this machine: broker (Tansu, in memory), migrations, API, projector and
# image worker (variants stored as local files under .run/images, served by the API under /images/ so
# their URLs open in a browser).
# Ctrl-C stops the services; the broker keeps running (scripts/broker.sh stop dev stops it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/check-services.sh"

export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export DB_NAME="${DB_NAME:-catalog}"
export API_ADDR="${API_ADDR:-127.0.0.1:8080}"
export IMAGE_STORE="${IMAGE_STORE:-local}"
export IMAGE_LOCAL_DIR="${IMAGE_LOCAL_DIR:-$root/.run/images}"
if [ "$IMAGE_STORE" = local ]; then
    export API_LOCAL_IMAGES_DIR="${API_LOCAL_IMAGES_DIR:-$IMAGE_LOCAL_DIR}"
    export IMAGE_PUBLIC_BASE_URL="${IMAGE_PUBLIC_BASE_URL:-http://$API_ADDR}"
fi
port="${KAFKA_BROKERS##*:}"

cargo build --bins --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

fresh=0
if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    "$root/scripts/broker.sh" start dev "$port"
    fresh=1
fi
if [ "$fresh" = 1 ]; then
    # The broker keeps its log in memory: a new broker is an empty log, so the projection built from the
    # previous one is dropped too (a projection must never be ahead of its log).
    "$bin/catalogctl" migrate --reset
else
    "$bin/catalogctl" migrate
fi
"$bin/catalogctl" topics
# librdkafka's batching on the patched broker; one record per batch on a stock tansu (scripts/broker.sh).
export KAFKA_PRODUCER_BATCH_MESSAGES="${KAFKA_PRODUCER_BATCH_MESSAGES:-$("$root/scripts/broker.sh" batch-messages dev)}"
echo "producer batches of up to $KAFKA_PRODUCER_BATCH_MESSAGES messages"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$bin/catalog-projector" & pids+=($!)
"$bin/catalog-image-worker" & pids+=($!)
"$bin/catalog-api" & pids+=($!)
for _ in $(seq 1 100); do
    if curl -fsS "http://$API_ADDR/healthz" >/dev/null 2>&1; then break; fi
    sleep 0.1
done
echo
echo "catalog API ready: http://$API_ADDR   (Ctrl-C to stop)"
echo
wait -n "${pids[@]}"
