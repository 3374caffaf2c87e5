#!/usr/bin/env bash
# The worker's four variants against vipsthumbnail producing the same four outputs from the same photo
# (the benchmarks' generated 3000×2000 JPEG): vipsthumbnail timed by hyperfine (one invocation per
# output, as the tool works, plus a 16×16 input for its fixed start-up cost), then bytes, PSNR and SSIM
# of every output against the source downscaled with Lanczos3 (benches/bin/image_quality.rs). The
# worker's own time is criterion's (`cargo bench -p benches --bench image_pipeline`, run by `just bench`
# before this). Installs libvips-tools and hyperfine (Debian) when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
if ! command -v vipsthumbnail >/dev/null || ! command -v hyperfine >/dev/null; then
    apt-get install -y -qq libvips-tools hyperfine >/dev/null
fi
cargo build --release --quiet -p benches --bin bench-photo --bin image-quality
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
photo="$out/photo.jpg"
"$target/release/bench-photo" "$photo" "$out"
vips crop "$photo" "$out/tiny.jpg" 0 0 16 16
hyperfine -N --warmup 3 --runs 20 --export-markdown "$out/vips.md" \
    "vipsthumbnail $photo --size 1024 -o $out/vips-large-1024.jpg[Q=82,strip]" \
    "vipsthumbnail $photo --size 1024 -o $out/vips-large-1024.webp[Q=80,strip]" \
    "vipsthumbnail $photo --size 256 -o $out/vips-thumb-256.jpg[Q=80,strip]" \
    "vipsthumbnail $photo --size 256 -o $out/vips-thumb-256.webp[Q=75,strip]" \
    "vipsthumbnail $out/tiny.jpg --size 8 -o $out/tiny-out.jpg" >/dev/null
cat "$out/vips.md"
echo
"$target/release/image-quality" "$photo" \
    "$out"/worker-large-1024.jpg "$out"/vips-large-1024.jpg \
    "$out"/worker-large-1024.webp "$out"/vips-large-1024.webp \
    "$out"/worker-thumb-256.jpg "$out"/vips-thumb-256.jpg \
    "$out"/worker-thumb-256.webp "$out"/vips-thumb-256.webp
