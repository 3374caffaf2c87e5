//! Size and quality of image variants against a reference: for each file, the bytes, and the PSNR and
//! mean SSIM (luma, 8×8 windows) of its pixels against the source photo downscaled to the same size
//! (Lanczos3, from the full-resolution decode). Higher is better for both; SSIM 1.0 is identical.
//!
//! Usage: image-quality SOURCE.jpg VARIANT...

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

fn luma(rgb: &[u8]) -> Vec<f64> {
    rgb.chunks_exact(3)
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
}

fn ssim(a: &[f64], b: &[f64], w: usize, h: usize) -> f64 {
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0f64;
    let mut windows = 0.0f64;
    for by in (0..h.saturating_sub(7)).step_by(4) {
        for bx in (0..w.saturating_sub(7)).step_by(4) {
            let (mut ma, mut mb) = (0.0, 0.0);
            for y in by..by + 8 {
                for x in bx..bx + 8 {
                    ma += a[y * w + x];
                    mb += b[y * w + x];
                }
            }
            ma /= 64.0;
            mb /= 64.0;
            let (mut va, mut vb, mut cov) = (0.0, 0.0, 0.0);
            for y in by..by + 8 {
                for x in bx..bx + 8 {
                    let (da, db) = (a[y * w + x] - ma, b[y * w + x] - mb);
                    va += da * da;
                    vb += db * db;
                    cov += da * db;
                }
            }
            va /= 63.0;
            vb /= 63.0;
            cov /= 63.0;
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            windows += 1.0;
        }
    }
    total / windows.max(1.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((source, variants)) = args.split_first() else {
        anyhow::bail!("usage: image-quality SOURCE VARIANT...");
    };
    let full = image::open(source)?.into_rgb8();
    let (fw, fh) = full.dimensions();
    let src = Image::from_vec_u8(fw, fh, full.into_raw(), PixelType::U8x3)?;
    println!("| file | size | bytes | PSNR dB | SSIM |");
    println!("|---|---|---|---|---|");
    for path in variants {
        let bytes = std::fs::metadata(path)?.len();
        let v = image::open(path)?.into_rgb8();
        let (w, h) = v.dimensions();
        let mut reference = Image::new(w, h, PixelType::U8x3);
        Resizer::new().resize(
            &src,
            &mut reference,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )?;
        let p = psnr(v.as_raw(), reference.buffer());
        let s = ssim(
            &luma(v.as_raw()),
            &luma(reference.buffer()),
            w as usize,
            h as usize,
        );
        let name = std::path::Path::new(path)
            .file_name()
            .map_or_else(|| path.clone(), |n| n.to_string_lossy().into_owned());
        println!("| {name} | {w}×{h} | {bytes} | {p:.2} | {s:.4} |");
    }
    Ok(())
}
