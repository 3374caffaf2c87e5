#!/usr/bin/env bash
# vipsthumbnail doing the worker's JPEG sizes (1024 and 256 px, q82/q80) on the benchmark photo that
# `cargo bench --bench image_pipeline` wrote, timed by hyperfine. Installs libvips-tools and hyperfine
# (Debian) when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
photo="${CARGO_TARGET_DIR:-$root/target}/bench-photo.jpg"
[ -f "$photo" ] || { echo "run: cargo bench -p benches --bench image_pipeline (writes $photo)" >&2; exit 1; }
if ! command -v vipsthumbnail >/dev/null || ! command -v hyperfine >/dev/null; then
    apt-get install -y -qq libvips-tools hyperfine >/dev/null
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# One decode per size, as vipsthumbnail works (it shrinks on load, which is its big advantage).
hyperfine --warmup 3 --runs 20 --export-markdown "$out/vips.md" \
    "vipsthumbnail $photo --size 1024 -o $out/large.jpg[Q=82,strip] && vipsthumbnail $photo --size 256 -o $out/thumb.jpg[Q=80,strip]"
cat "$out/vips.md"
