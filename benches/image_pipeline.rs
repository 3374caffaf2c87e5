//! Per-image cost of the worker's CPU work: decode + four variants + encode, for a 3000×2000 photo.
//!
//! The source is generated (smooth gradients plus fine noise, like a photo, so encoders cannot cheat
//! on flat colour) and also written to `target/bench-photo.jpg`, where `scripts/bench-images.sh` runs
//! `vipsthumbnail` on the same file at the same sizes for the ratio in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{Criterion, criterion_group, criterion_main};
use image_worker::process::{self, DEFAULT_VARIANTS, DecodeLimits, Format, VariantSpec};

/// A deterministic 3000×2000 photo-like JPEG (quality 90).
fn photo() -> Vec<u8> {
    let (w, h) = (3000u32, 2000u32);
    let mut state = 0x2545_f491u32;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 24) as i32 - 12;
        let fx = x as f32 / w as f32;
        let fy = y as f32 / h as f32;
        let r = 120.0 + 90.0 * (fx * 6.0).sin() * (fy * 3.0).cos();
        let g = 110.0 + 80.0 * (fy * 5.0 + fx * 2.0).sin();
        let b = 130.0 + 70.0 * ((fx + fy) * 4.0).cos();
        let c = |v: f32| (v as i32 + noise).clamp(0, 255) as u8;
        image::Rgb([c(r), c(g), c(b)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), 90)
        .encode_image(&img)
        .unwrap();
    out
}

fn pipeline(c: &mut Criterion) {
    let source = photo();
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
