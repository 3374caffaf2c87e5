//! Per-image cost of the worker's CPU work: decode + four variants + encode, for a 3000×2000 photo.
//!
//! The source is generated (smooth gradients plus fine noise, like a photo, so encoders cannot cheat
//! on flat colour) and also written to `target/bench-photo.jpg`, where `scripts/bench-images.sh` runs
//! `vipsthumbnail` on the same file at the same sizes for the ratio in docs/BENCHMARKS.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use image_worker::process::{self, DEFAULT_VARIANTS, DecodeLimits, Format, VariantSpec};

fn pipeline(c: &mut Criterion) {
    let source = benches::photo();
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let _ = std::fs::write(format!("{target}/bench-photo.jpg"), &source);
    let limits = DecodeLimits::default();

    let mut group = c.benchmark_group("image 3000x2000 jpeg");
    group.sample_size(20);
    group.bench_function("decode + 4 variants + encode (worker)", |b| {
        b.iter(|| process::render(black_box(&source), limits, &DEFAULT_VARIANTS).unwrap())
    });
    let jpeg_only = [
        VariantSpec {
            name: "thumb",
            max_side: 256,
            format: Format::Jpeg,
            quality: 80,
        },
        VariantSpec {
            name: "large",
            max_side: 1024,
            format: Format::Jpeg,
            quality: 82,
        },
    ];
    group.bench_function("decode + 2 JPEG variants (vipsthumbnail's job)", |b| {
        b.iter(|| process::render(black_box(&source), limits, &jpeg_only).unwrap())
    });
    group.finish();

    // Size/quality trade-off of the large variant, printed once for docs/BENCHMARKS.md.
    for (format, quality) in [
        (Format::Webp, 70),
        (Format::Webp, 80),
        (Format::Webp, 90),
        (Format::Jpeg, 75),
        (Format::Jpeg, 82),
        (Format::Jpeg, 90),
    ] {
        let spec = VariantSpec {
            name: "large",
            max_side: 1024,
            format,
            quality,
        };
        let out = process::render(&source, limits, &[spec]).unwrap();
        println!(
            "large {:>4} q{quality}: {:>7} bytes",
            format.name(),
            out[0].bytes.len()
        );
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
