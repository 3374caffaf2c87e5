# Catalog: run `just` to list recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

# One target directory for every checkout and CI run on this machine: build once, reuse.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", home_directory() / ".cache/catalog/target")
test_broker_port := "19092"
s3_port := "8333"

default:
    @just --list

# Run the whole system locally: broker, migrations, API (http://127.0.0.1:8080) and projector.
dev:
    scripts/dev.sh

# Run every test against real PostgreSQL, Redis and a fresh in-memory broker.
test:
    scripts/check-services.sh
    scripts/broker.sh ensure >/dev/null
    scripts/broker.sh restart test {{test_broker_port}}
    scripts/s3.sh start {{s3_port}}
    scripts/ensure-chromium.sh
    cargo build --workspace --tests --quiet
    export TEST_KAFKA_BROKERS=127.0.0.1:{{test_broker_port}} TEST_S3_ENDPOINT=http://127.0.0.1:{{s3_port}}; \
    if command -v cargo-nextest >/dev/null 2>&1; then \
        cargo nextest run --workspace --no-fail-fast; \
    else \
        cargo test --workspace --no-fail-fast; \
    fi
    # The contract against everything the suite emitted: AsyncAPI parses, every message conforms.
    scripts/contract.sh 127.0.0.1:{{test_broker_port}}

# The fault suite: the whole system as real processes on private PostgreSQL, Redis, broker and S3, under
# load, while the API, projector and worker are SIGKILLed, PostgreSQL restarts, Redis stops and hangs, S3
# and the broker stop; prints a summary table and fails if an acknowledged write is lost or doubled.
chaos:
    scripts/broker.sh ensure >/dev/null
    scripts/s3.sh ensure >/dev/null
    cargo build --workspace --bins --tests --quiet
    cargo test --quiet -p tests --test it -- --ignored --nocapture --test-threads 1 chaos::

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Apply migrations to the configured database (DB_* variables).
migrate:
    cargo run --quiet --bin catalogctl -- migrate

# Criterion benchmarks, then vipsthumbnail on the same photo for comparison (see docs/BENCHMARKS.md).
bench:
    cargo bench -p benches
    scripts/bench-images.sh
    scripts/bench-read.sh
    scripts/bench-write.sh
    scripts/bench-faults.sh
    scripts/bench-latency.sh
    scripts/bench-projection.sh
    scripts/bench-sustained.sh
    scripts/bench-s3-pause.sh
    scripts/bench-hostile.sh

# List the image pipeline's dead-letter topic (add --product ID / --error-class CLASS to filter).
dlq-list *args:
    cargo run --quiet --bin catalogctl -- dlq list {{args}}

# Re-drive dead letters whose images are still failed (--all, --product ID or --error-class CLASS).
dlq-redrive *args:
    cargo run --quiet --bin catalogctl -- dlq redrive {{args}}

# Stop the brokers and the S3 server started by `just dev` and `just test`.
stop:
    scripts/broker.sh stop dev
    scripts/broker.sh stop test
    scripts/s3.sh stop
