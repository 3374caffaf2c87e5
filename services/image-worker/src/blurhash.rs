//! BlurHash (<https://github.com/woltapp/blurhash>): a picture as a few cosine components in a short
//! base-83 string that clients paint, blurred, before the image itself arrives.
//!
//! Written here from the published algorithm (a few dozen lines; no dependency). The decoder exists
//! for the tests: what is encoded must paint the picture back.

use std::f64::consts::PI;

const DIGITS: &[u8; 83] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~";

fn srgb_to_linear(value: u8) -> f64 {
    let v = f64::from(value) / 255.0;
    if v <= 0.04045 {
        v / 12.92
    } else {
        ((v + 0.055) / 1.055).powf(2.4)
    }
}

fn linear_to_srgb(value: f64) -> u32 {
    let v = value.clamp(0.0, 1.0);
    let srgb = if v <= 0.003_130_8 {
        v * 12.92
    } else {
        1.055 * v.powf(1.0 / 2.4) - 0.055
    };
    // In [0, 255.5]: the cast cannot overflow or go negative.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rounded = (srgb * 255.0 + 0.5) as u32;
    rounded.min(255)
}

fn sign_pow(value: f64, exponent: f64) -> f64 {
    value.abs().powf(exponent).copysign(value)
}

fn push_base83(out: &mut String, value: u32, length: u32) {
    for i in 1..=length {
        let digit = (value / 83u32.pow(length - i)) % 83;
        out.push(char::from(DIGITS[digit as usize]));
    }
}

/// The BlurHash of `rgba` (`width` × `height` pixels, 4 bytes each) with `x` × `y` components
/// (each 1–9). `None` for an empty picture or out-of-range components.
pub fn encode(x: u32, y: u32, width: u32, height: u32, rgba: &[u8]) -> Option<String> {
    let pixels = usize::try_from(u64::from(width) * u64::from(height)).ok()?;
    if !(1..=9).contains(&x) || !(1..=9).contains(&y) || pixels == 0 || rgba.len() < pixels * 4 {
        return None;
    }
    let linear: Vec<[f64; 3]> = rgba
        .chunks_exact(4)
        .take(pixels)
        .map(|p| {
            [
                srgb_to_linear(p[0]),
                srgb_to_linear(p[1]),
                srgb_to_linear(p[2]),
            ]
        })
        .collect();
    let (w, h) = (f64::from(width), f64::from(height));
    let mut factors = Vec::with_capacity((x * y) as usize);
    for j in 0..y {
        for i in 0..x {
            let normalisation = if i == 0 && j == 0 { 1.0 } else { 2.0 };
            let mut sum = [0.0f64; 3];
            for py in 0..height {
                let cy = (PI * f64::from(j) * f64::from(py) / h).cos();
                for px in 0..width {
                    let basis = normalisation * (PI * f64::from(i) * f64::from(px) / w).cos() * cy;
                    let p = linear[(py * width + px) as usize];
                    for c in 0..3 {
                        sum[c] += basis * p[c];
                    }
                }
            }
            let scale = 1.0 / (w * h);
            factors.push(sum.map(|s| s * scale));
        }
    }
    let (dc, ac) = factors.split_first().expect("at least one component");
    let mut hash = String::with_capacity(4 + 2 * factors.len());
    push_base83(&mut hash, (x - 1) + (y - 1) * 9, 1);
    let maximum = if ac.is_empty() {
        push_base83(&mut hash, 0, 1);
        1.0
    } else {
        let actual = ac
            .iter()
            .flat_map(|c| c.iter().map(|v| v.abs()))
            .fold(0.0f64, f64::max);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let quantised = (actual * 166.0 - 0.5).floor().clamp(0.0, 82.0) as u32;
        push_base83(&mut hash, quantised, 1);
        f64::from(quantised + 1) / 166.0
    };
    let dc_value =
        (linear_to_srgb(dc[0]) << 16) + (linear_to_srgb(dc[1]) << 8) + linear_to_srgb(dc[2]);
    push_base83(&mut hash, dc_value, 4);
    for component in ac {
        let quant = |v: f64| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let q = (sign_pow(v / maximum, 0.5) * 9.0 + 9.5)
                .floor()
                .clamp(0.0, 18.0) as u32;
            q
        };
        let value = quant(component[0]) * 19 * 19 + quant(component[1]) * 19 + quant(component[2]);
        push_base83(&mut hash, value, 2);
    }
    Some(hash)
}

/// The average colour a hash carries (its DC component), in sRGB (tests).
#[cfg(test)]
pub(crate) fn average(hash: &str) -> Option<[u8; 3]> {
    let dc = hash.get(2..6)?.bytes().try_fold(0u32, |acc, b| {
        let digit = DIGITS.iter().position(|d| *d == b)?;
        Some(acc * 83 + u32::try_from(digit).ok()?)
    })?;
    Some([(dc >> 16) as u8, (dc >> 8) as u8, dc as u8])
}

/// Paints `hash` as `width` × `height` RGBA pixels (tests).
#[cfg(test)]
pub(crate) fn decode(hash: &str, width: u32, height: u32) -> Option<Vec<u8>> {
    let value = |s: &str| {
        s.bytes().try_fold(0u32, |acc, b| {
            let digit = DIGITS.iter().position(|d| *d == b)?;
            Some(acc * 83 + u32::try_from(digit).ok()?)
        })
    };
    let flag = value(hash.get(0..1)?)?;
    let (x, y) = (flag % 9 + 1, flag / 9 + 1);
    if hash.len() != (4 + 2 * x * y) as usize {
        return None;
    }
    let maximum = f64::from(value(hash.get(1..2)?)? + 1) / 166.0;
    let dc = value(hash.get(2..6)?)?;
    let srgb = |v: u32| srgb_to_linear(u8::try_from(v & 255).expect("masked"));
    let mut colours = vec![[srgb(dc >> 16), srgb(dc >> 8), srgb(dc)]];
    for k in 1..(x * y) as usize {
        let v = value(hash.get(4 + 2 * k..6 + 2 * k)?)?;
        let q = [v / 361, (v / 19) % 19, v % 19];
        colours.push(q.map(|q| sign_pow((f64::from(q) - 9.0) / 9.0, 2.0) * maximum));
    }
    let mut out = Vec::with_capacity((width * height * 4) as usize);
    for py in 0..height {
        for px in 0..width {
            let mut sum = [0.0f64; 3];
            for j in 0..y {
                for i in 0..x {
                    let basis = (PI * f64::from(px) * f64::from(i) / f64::from(width)).cos()
                        * (PI * f64::from(py) * f64::from(j) / f64::from(height)).cos();
                    let colour = colours[(i + j * x) as usize];
                    for c in 0..3 {
                        sum[c] += colour[c] * basis;
                    }
                }
            }
            for s in sum {
                out.push(u8::try_from(linear_to_srgb(s)).expect("at most 255"));
            }
            out.push(255);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_colour_keeps_its_colour_and_paints_back() {
        let rgba: Vec<u8> = (0..16 * 12).flat_map(|_| [200u8, 30, 30, 255]).collect();
        let hash = encode(4, 3, 16, 12, &rgba).unwrap();
        assert_eq!(hash.len(), 28);
        assert!(hash.starts_with('L'), "size flag of 4×3: {hash}");
        assert_eq!(average(&hash), Some([200, 30, 30]));
        // BlurHash's basis is cos(π·i·x/w) over whole pixels: summed over a flat picture it
        // vanishes for even frequencies (whole periods) and not for odd ones, so components with an
        // index of 2 are the zero value 9·19² + 9·19 + 9 = 3429 = "fQ" and the others are not.
        let ac: Vec<&[u8]> = hash.as_bytes()[6..].chunks(2).collect();
        for j in 0..3 {
            for i in 0..4 {
                if i + j == 0 {
                    continue;
                }
                let zero = i == 2 || j == 2;
                assert_eq!(ac[j * 4 + i - 1] == b"fQ", zero, "({i}, {j}) of {hash}");
            }
        }
        // Painted, it averages to the picture's colour (BlurHash's corners overshoot a little).
        let painted = decode(&hash, 16, 12).unwrap();
        for (c, want) in [200u32, 30, 30].into_iter().enumerate() {
            let sum: u32 = painted.chunks(4).map(|px| u32::from(px[c])).sum();
            let mean = sum / (16 * 12);
            assert!(mean.abs_diff(want) <= 8, "channel {c}: {mean} vs {want}");
        }
    }

    #[test]
    fn a_one_component_hash_is_the_mean_of_the_linear_colours() {
        let rgba = [
            255, 0, 0, 255, 0, 255, 0, 255, //
            0, 0, 255, 255, 255, 255, 255, 255,
        ];
        let hash = encode(1, 1, 2, 2, &rgba).unwrap();
        // 1×1: size flag 0, maximum 0, then the mean colour in sRGB of the linear mean.
        assert_eq!(hash.len(), 6);
        assert_eq!(&hash[..2], "00");
        let painted = decode(&hash, 1, 1).unwrap();
        // Linear mean of (1,0,0),(0,1,0),(0,0,1),(1,1,1) is 0.5 per channel → sRGB 188.
        assert_eq!(&painted[..3], &[188, 188, 188]);
    }

    #[test]
    fn gradients_keep_their_direction_and_bad_input_is_refused() {
        let rgba: Vec<u8> = (0..12)
            .flat_map(|_| (0..16u8).flat_map(|x| [x * 16, x * 16, x * 16, 255]))
            .collect();
        let hash = encode(4, 3, 16, 12, &rgba).unwrap();
        let painted = decode(&hash, 8, 1).unwrap();
        assert!(painted[0] + 100 < painted[7 * 4], "{painted:?}");
        assert_eq!(encode(0, 3, 16, 12, &rgba), None);
        assert_eq!(encode(4, 10, 16, 12, &rgba), None);
        assert_eq!(encode(4, 3, 16, 13, &rgba), None);
        assert_eq!(encode(4, 3, 0, 0, &[]), None);
    }
}
