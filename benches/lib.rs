//! Holds the criterion benchmarks (`cargo bench -p benches`).

use std::io::Cursor;

pub mod hostile;

/// A deterministic 3000×2000 photo-like JPEG (quality 90): smooth gradients plus fine noise, like a
/// photo, so encoders cannot cheat on flat colour. The image benchmarks all use it.
pub fn photo() -> Vec<u8> {
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
        .expect("a JPEG encodes into memory");
    out
}
