//! Image processing, pure CPU and synchronous: sniff, decode with limits, orient, resize, encode.
//!
//! Callers run it off the async runtime (see `worker`). Decoding goes through the `image` crate with
//! pixel and allocation limits checked on the header, so a decompression bomb is refused before any
//! pixel buffer is allocated. Re-encoding drops all metadata (EXIF, ICC, XMP) after the EXIF
//! orientation has been applied to the pixels.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::job::Failure;

/// Output encoding of a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lossy WebP (libwebp).
    Webp,
    /// Baseline JPEG.
    Jpeg,
}

impl Format {
    /// Name used in events and keys.
    pub fn name(self) -> &'static str {
        match self {
            Format::Webp => "webp",
            Format::Jpeg => "jpeg",
        }
    }

    /// File extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Webp => "webp",
            Format::Jpeg => "jpg",
        }
    }

    /// MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Webp => "image/webp",
            Format::Jpeg => "image/jpeg",
        }
    }
}

/// One rendition to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantSpec {
    /// Name in events (`thumb`, `large`).
    pub name: &'static str,
    /// Longest side in pixels; smaller sources are never upscaled.
    pub max_side: u32,
    /// Encoding.
    pub format: Format,
    /// Encoder quality, 0–100.
    pub quality: u8,
}

impl VariantSpec {
    /// A stable identifier of the settings, part of the content-addressed key: changing a setting
    /// changes the key, so old and new renditions never collide.
    pub fn settings_id(&self) -> String {
        // JPEG variants name their encoding too (4:2:0 chroma since it changed), so renditions made
        // with the earlier encoder are never mistaken for current ones.
        let encoding = match self.format {
            Format::Jpeg => "-420",
            Format::Webp => "",
        };
        format!(
            "{}-{}-{}-q{}{encoding}",
            self.name,
            self.max_side,
            self.format.name(),
            self.quality
        )
    }
}

/// The variants produced for every image (docs/BENCHMARKS.md has the size/time numbers behind them).
pub const DEFAULT_VARIANTS: [VariantSpec; 4] = [
    VariantSpec {
        name: "thumb",
        max_side: 256,
        format: Format::Webp,
        quality: 75,
    },
    VariantSpec {
        name: "thumb",
        max_side: 256,
        format: Format::Jpeg,
        quality: 80,
    },
    VariantSpec {
        name: "large",
        max_side: 1024,
        format: Format::Webp,
        quality: 80,
    },
    VariantSpec {
        name: "large",
        max_side: 1024,
        format: Format::Jpeg,
        quality: 82,
    },
];

/// Decoding limits.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest width or height accepted.
    pub max_side: u32,
    /// Most pixels (width × height) accepted.
    pub max_pixels: u64,
    /// Most bytes the decoder may allocate.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_side: 16_384,
            max_pixels: 40_000_000,
            max_alloc: 512 * 1024 * 1024,
        }
    }
}

/// One encoded rendition.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// What it is.
    pub spec: VariantSpec,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded file.
    pub bytes: Vec<u8>,
}

/// The format of `bytes`, judged from the bytes (never from headers or the URL).
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, Failure> {
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif)) => {
            Ok(f)
        }
        Ok(other) => Err(Failure::permanent(
            "not_an_image",
            format!("{other:?} images are not accepted (JPEG, PNG, WebP, GIF are)"),
        )),
        Err(_) => Err(Failure::permanent(
            "not_an_image",
            "the body is not a JPEG, PNG, WebP or GIF image",
        )),
    }
}

/// A decoder of `bytes` (already sniffed as `format`) with `limits` applied to its header.
fn decoder(
    bytes: &[u8],
    format: ImageFormat,
    limits: DecodeLimits,
) -> Result<impl ImageDecoder + '_, Failure> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l);
    let decoder = reader.into_decoder().map_err(decode_failure)?;
    let (w, h) = decoder.dimensions();
    check_frame(w, h, limits)?;
    Ok(decoder)
}

/// A frame (or a whole image) of `w`×`h` pixels is decodable within `limits`.
fn check_frame(w: u32, h: u32, limits: DecodeLimits) -> Result<(), Failure> {
    if w == 0 || h == 0 {
        return Err(Failure::permanent(
            "corrupt",
            format!("the image declares a {w}×{h} frame (no pixels)"),
        ));
    }
    if w > limits.max_side || h > limits.max_side {
        return Err(Failure::permanent(
            "too_many_pixels",
            format!(
                "a {w}×{h} frame is more than {} pixels on a side",
                limits.max_side
            ),
        ));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(Failure::permanent(
            "too_many_pixels",
            format!("{w}×{h} is more than {} pixels", limits.max_pixels),
        ));
    }
    Ok(())
}

/// The frames of a GIF (width and height of each), read from its block structure without decoding
/// any pixels. A GIF's logical screen says nothing about its frames: a 10×10 screen may hold a
/// 16000×16000 frame, which the decoder would allocate in full.
fn gif_frames(bytes: &[u8]) -> Result<Vec<(u32, u32)>, Failure> {
    let corrupt = |what: &str| Failure::permanent("corrupt", format!("malformed GIF: {what}"));
    let byte = |at: usize| bytes.get(at).copied().ok_or_else(|| corrupt("cut short"));
    let word = |at: usize| -> Result<u32, Failure> {
        Ok(u32::from(u16::from_le_bytes([byte(at)?, byte(at + 1)?])))
    };
    // Skips a run of data sub-blocks (length byte, data, …, zero), returning the position after it.
    let sub_blocks = |mut at: usize| -> Result<usize, Failure> {
        loop {
            let len = usize::from(byte(at)?);
            at += 1 + len;
            if len == 0 {
                return Ok(at);
            }
        }
    };
    let table = |flags: u8| {
        if flags & 0x80 != 0 {
            3usize << ((flags & 0x07) + 1)
        } else {
            0
        }
    };
    let mut at = 13 + table(byte(10)?);
    let mut frames = Vec::new();
    loop {
        match byte(at)? {
            0x21 => at = sub_blocks(at + 2)?,
            0x2C => {
                frames.push((word(at + 5)?, word(at + 7)?));
                // Descriptor (10 bytes), local colour table, LZW code size, image data.
                at = sub_blocks(at + 10 + table(byte(at + 9)?) + 1)?;
            }
            0x3B => return Ok(frames),
            other => return Err(corrupt(&format!("unknown block 0x{other:02X}"))),
        }
    }
}

/// What rendering an image will take, read from its header (and a GIF's block structure) alone, so
/// the worker can wait for memory before allocating any of it.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The format, sniffed from the bytes.
    pub format: ImageFormat,
    /// Stored width in pixels (before EXIF orientation).
    pub width: u32,
    /// Stored height in pixels.
    pub height: u32,
    /// EXIF orientation, applied to the variants.
    pub orientation: Orientation,
    /// An upper bound of the bytes `render` holds at once for this image (decoded pixels, their
    /// 8-bit copy, decoder state, resize buffers, variants), beside the source bytes themselves.
    pub peak_bytes: u64,
}

impl Plan {
    /// Width and height as displayed (after EXIF orientation).
    pub fn display_size(&self) -> (u32, u32) {
        if swaps_sides(self.orientation) {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Checks `bytes` (complete, decodable header, every frame within `limits`) and estimates the memory
/// rendering `specs` from it needs. Nothing is decoded.
pub fn plan(bytes: &[u8], limits: DecodeLimits, specs: &[VariantSpec]) -> Result<Plan, Failure> {
    let format = sniff(bytes)?;
    complete_as(bytes, format)?;
    let mut extra_frame = 0u64;
    if format == ImageFormat::Gif {
        let frames = gif_frames(bytes)?;
        if frames.is_empty() {
            return Err(Failure::permanent("corrupt", "the GIF holds no frame"));
        }
        for &(w, h) in &frames {
            check_frame(w, h, limits)?;
        }
        // Only the first frame is decoded; when it differs from the screen it gets a buffer of
        // its own (RGBA).
        let (w, h) = frames[0];
        extra_frame = u64::from(w) * u64::from(h) * 4;
    }
    let mut decoder = decoder(bytes, format, limits)?;
    let (width, height) = decoder.dimensions();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let pixels = u64::from(width) * u64::from(height);
    let native = decoder.total_bytes();
    let rgb = pixels * 3;
    let decoding = match format {
        // Full-size output (the scaled decode is smaller), the 8-bit copy, and a progressive scan's
        // coefficients (two bytes per sample, kept for the whole image).
        ImageFormat::Jpeg => {
            native
                + rgb
                + if progressive_jpeg(bytes) {
                    pixels * 6
                } else {
                    0
                }
        }
        // The screen, the first frame's own buffer, the 8-bit copy.
        ImageFormat::Gif => native + extra_frame + rgb,
        // WebP decoders keep a frame of their own (ARGB for lossless, YUV for lossy).
        ImageFormat::WebP => native + pixels * 4 + rgb,
        _ => native + rgb,
    };
    // Per variant size: the resize's intermediate pass (target width × source height or the other
    // way round), the resized and the oriented copy, and the encoders' working buffers.
    let mut sides: Vec<u32> = specs.iter().map(|s| s.max_side).collect();
    sides.sort_unstable();
    sides.dedup();
    let variants: u64 = sides
        .iter()
        .map(|&side| {
            let (w, h) = fit(width, height, side);
            let (w, h) = (u64::from(w), u64::from(h));
            let pass = (w * u64::from(height)).max(u64::from(width) * h) * 3;
            pass + w * h * 3 * 4
        })
        .sum();
    const SLACK: u64 = 8 << 20;
    Ok(Plan {
        format,
        width,
        height,
        orientation,
        peak_bytes: decoding + variants + SLACK,
    })
}

/// Whether a JPEG's frame is progressive (SOF2): such a frame is decoded from coefficients kept for
/// the whole image.
fn progressive_jpeg(bytes: &[u8]) -> bool {
    let mut at = 2;
    while let (Some(&0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) {
        match marker {
            0xC2 | 0xC6 | 0xCA | 0xCE => return true,
            0xC0 | 0xC1 | 0xC3 | 0xDA => return false,
            0xFF => at += 1,
            _ => {
                let Some(len) = bytes.get(at + 2..at + 4) else {
                    return false;
                };
                at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
            }
        }
    }
    false
}

fn decode_failure(e: image::ImageError) -> Failure {
    match e {
        image::ImageError::Limits(l) => Failure::permanent("too_many_pixels", l.to_string()),
        other => Failure::permanent("corrupt", format!("cannot decode the image: {other}")),
    }
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Width and height as displayed (after EXIF orientation), read from the header only.
/// A cut-off source is refused here too, so variants stored earlier are never reused for it.
pub fn display_size(bytes: &[u8], limits: DecodeLimits) -> Result<(u32, u32), Failure> {
    Ok(plan(bytes, limits, &[])?.display_size())
}

/// Size of a variant of a `width`×`height` image whose longest side may be at most `max_side`:
/// scaled down keeping the aspect ratio, never up.
pub fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= max_side {
        return (width, height);
    }
    let scale = f64::from(max_side) / f64::from(longest);
    let w = (f64::from(width) * scale).round().max(1.0) as u32;
    let h = (f64::from(height) * scale).round().max(1.0) as u32;
    (w.min(max_side), h.min(max_side))
}

/// Decodes a JPEG at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that still gives at least
/// `min_side` pixels on its longest side (shrink-on-load: the IDCT produces fewer pixels, so a
/// 3000×2000 photo wanted at 1024 px decodes as 1500×1000, at a fraction of the cost). `None` when
/// this decoder cannot give RGB for it (CMYK, 16-bit): the caller decodes it the usual way.
fn decode_jpeg_scaled(bytes: &[u8], min_side: u32) -> Result<Option<DynamicImage>, Failure> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder
        .read_info()
        .map_err(|e| Failure::permanent("corrupt", format!("cannot decode the image: {e}")))?;
    let Some(info) = decoder.info() else {
        return Ok(None);
    };
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    // Ask for the size whose longest side is `min_side`; the decoder picks the smallest scale that
    // is at least that big.
    let longest = w.max(h).max(1);
    let want = |side: u32| {
        u16::try_from((u64::from(side) * u64::from(min_side)).div_ceil(u64::from(longest)))
            .unwrap_or(u16::MAX)
            .max(1)
    };
    if min_side < longest {
        decoder
            .scale(want(w), want(h))
            .map_err(|e| Failure::permanent("corrupt", format!("cannot decode the image: {e}")))?;
    }
    let pixels = decoder
        .decode()
        .map_err(|e| Failure::permanent("corrupt", format!("cannot decode the image: {e}")))?;
    let Some(info) = decoder.info() else {
        return Ok(None);
    };
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    Ok(match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => {
            image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
        }
        jpeg_decoder::PixelFormat::L8 => {
            image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
        }
        _ => None,
    })
}

/// Refuses input that ends before its format's end marker: decoders fill a cut-off image with grey and
/// call it a success, which would store half-grey variants under the source's hash for good. A JPEG
/// must have an end-of-image marker after its first scan, a PNG its `IEND` chunk, a GIF its trailer
/// byte after the image data, a WebP as many bytes as its RIFF header announces. Bytes after the end
/// (some tools append data) are allowed.
pub fn check_complete(bytes: &[u8]) -> Result<(), Failure> {
    complete_as(bytes, sniff(bytes)?)
}

/// [`check_complete`] for bytes already sniffed as `format`.
fn complete_as(bytes: &[u8], format: ImageFormat) -> Result<(), Failure> {
    let cut = |what: &str| {
        Err(Failure::permanent(
            "corrupt",
            format!("the image is truncated (no {what})"),
        ))
    };
    match format {
        ImageFormat::Jpeg => {
            // Walk the marker segments to the first scan (skipping embedded thumbnails, whose own
            // markers sit inside APP segments), then look for EOI in the entropy-coded data, where
            // 0xFF is always followed by 0x00 or a marker.
            let mut at = 2;
            let scan = loop {
                let (Some(&0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) else {
                    return cut("start of scan");
                };
                match marker {
                    0xFF => at += 1,
                    0xDA => break at,
                    0xD0..=0xD7 | 0x01 => at += 2,
                    _ => {
                        let Some(len) = bytes.get(at + 2..at + 4) else {
                            return cut("start of scan");
                        };
                        at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                    }
                }
            };
            if bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]) {
                Ok(())
            } else {
                cut("end-of-image marker")
            }
        }
        ImageFormat::Png => {
            // The IEND chunk's type and its CRC (4 bytes after it).
            match bytes.windows(4).rposition(|w| w == b"IEND") {
                Some(at) if bytes.len() >= at + 8 => Ok(()),
                _ => cut("IEND chunk"),
            }
        }
        ImageFormat::WebP => {
            let announced = bytes
                .get(4..8)
                .map(|n| u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize + 8);
            match announced {
                Some(n) if bytes.len() >= n => Ok(()),
                _ => cut("end of the RIFF container"),
            }
        }
        ImageFormat::Gif => {
            if bytes.len() > 13 && bytes.contains(&0x3B) && bytes.last() == Some(&0x3B) {
                Ok(())
            } else {
                cut("GIF trailer")
            }
        }
        _ => Ok(()),
    }
}

/// Decodes `bytes` and produces every variant in `specs`.
///
/// Memory: the decoded pixels are turned into 8-bit RGB at once (the decoder's own buffer, 16 bits a
/// sample for some PNGs, is dropped before anything else is allocated), and variants are resized from
/// the stored pixels and only then oriented, so a rotation copies a variant, never the whole image.
/// `plan` states the bound.
pub fn render(
    bytes: &[u8],
    limits: DecodeLimits,
    specs: &[VariantSpec],
) -> Result<Vec<Encoded>, Failure> {
    let plan = plan(bytes, limits, specs)?;
    render_planned(bytes, limits, &plan, specs)
}

/// The variant placeholders are computed from: the first thumbnail of [`DEFAULT_VARIANTS`].
pub fn placeholder_source() -> usize {
    DEFAULT_VARIANTS
        .iter()
        .position(|s| s.name == "thumb")
        .expect("a thumbnail is among the default variants")
}

/// A BlurHash of an encoded thumbnail (JPEG or WebP): 4×3 components for landscape pictures, 3×4 for
/// portrait ones, from the picture shrunk to at most 32 pixels a side (the hash keeps only its
/// lowest frequencies). Computed from the stored bytes, so a re-run that finds the variants stored
/// gets the same string. `None` if the thumbnail does not decode.
pub fn placeholder(thumbnail: &[u8]) -> Option<String> {
    let image = image::load_from_memory(thumbnail).ok()?;
    let small = image.thumbnail(32, 32).into_rgba8();
    let (w, h) = small.dimensions();
    let (x, y) = if w >= h { (4, 3) } else { (3, 4) };
    crate::blurhash::encode(x, y, w, h, small.as_raw())
}

/// `render` for an image already checked by `plan`.
pub fn render_planned(
    bytes: &[u8],
    limits: DecodeLimits,
    plan: &Plan,
    specs: &[VariantSpec],
) -> Result<Vec<Encoded>, Failure> {
    // The header (limits, orientation) always goes through `image`; a JPEG's pixels are then decoded
    // shrunk on load to what the largest variant needs.
    let largest = specs.iter().map(|s| s.max_side).max().unwrap_or(u32::MAX);
    let scaled = if plan.format == ImageFormat::Jpeg {
        decode_jpeg_scaled(bytes, largest)?
    } else {
        None
    };
    let image = match scaled {
        Some(image) => image,
        None => DynamicImage::from_decoder(decoder(bytes, plan.format, limits)?)
            .map_err(decode_failure)?,
    };
    let rgb = image.into_rgb8();
    let (width, height) = rgb.dimensions();
    let source = Image::from_vec_u8(width, height, rgb.into_raw(), PixelType::U8x3)
        .map_err(|e| Failure::permanent("decode", e.to_string()))?;
    let mut resizer = Resizer::new();
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    let mut out = Vec::with_capacity(specs.len());
    // Oriented variant pixels per longest side. Sizes follow from the full stored size (the pixels
    // may have been decoded at a smaller scale).
    let mut resized: Vec<(u32, image::RgbImage)> = Vec::new();
    for spec in specs {
        if !resized.iter().any(|(side, _)| *side == spec.max_side) {
            let (w, h) = fit(plan.width, plan.height, spec.max_side);
            let mut target = Image::new(w, h, PixelType::U8x3);
            if (w, h) == (width, height) {
                target.buffer_mut().copy_from_slice(source.buffer());
            } else {
                resizer
                    .resize(&source, &mut target, &options)
                    .map_err(|e| Failure::permanent("decode", e.to_string()))?;
            }
            let stored = image::RgbImage::from_raw(w, h, target.into_vec())
                .expect("a resize target holds w × h × 3 bytes");
            let mut oriented = DynamicImage::ImageRgb8(stored);
            oriented.apply_orientation(plan.orientation);
            resized.push((spec.max_side, oriented.into_rgb8()));
        }
        let pixels = &resized
            .iter()
            .find(|(side, _)| *side == spec.max_side)
            .expect("just resized")
            .1;
        let (w, h) = pixels.dimensions();
        let bytes = encode(pixels.as_raw(), w, h, *spec)?;
        out.push(Encoded {
            spec: *spec,
            width: w,
            height: h,
            bytes,
        });
    }
    Ok(out)
}

fn encode(rgb: &[u8], width: u32, height: u32, spec: VariantSpec) -> Result<Vec<u8>, Failure> {
    match spec.format {
        Format::Webp => Ok(webp::Encoder::from_rgb(rgb, width, height)
            .encode(f32::from(spec.quality))
            .to_vec()),
        Format::Jpeg => {
            // 4:2:0 chroma, as libjpeg-based tools write it: the same quality in fewer bytes than
            // full-resolution chroma (docs/BENCHMARKS.md). Optimised Huffman tables would save a few
            // more per cent, but zune-jpeg (the image crate's decoder) misreads this encoder's
            // optimised tables, so they stay off.
            let (w, h) = (
                u16::try_from(width).map_err(|_| Failure::permanent("decode", "too wide"))?,
                u16::try_from(height).map_err(|_| Failure::permanent("decode", "too tall"))?,
            );
            let mut out = Vec::new();
            let mut encoder = jpeg_encoder::Encoder::new(&mut out, spec.quality);
            encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
            encoder
                .encode(rgb, w, h, jpeg_encoder::ColorType::Rgb)
                .map_err(|e| Failure::permanent("decode", format!("cannot encode JPEG: {e}")))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn placeholders_are_blurhashes_of_the_thumbnail() {
        let thumb_spec = DEFAULT_VARIANTS[placeholder_source()];
        let solid = |w: u32, h: u32| {
            let rgb = image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]));
            encode(rgb.as_raw(), w, h, thumb_spec).unwrap()
        };
        let thumb = solid(256, 192);
        let landscape = placeholder(&thumb).unwrap();
        // Size flag, maximum, DC (4 chars), then 2 chars per AC component: 4×3 → 28 characters.
        assert_eq!(landscape.len(), 4 + 2 * (4 * 3 - 1) + 2);
        assert!(landscape.starts_with('L'), "4×3 components: {landscape}");
        let portrait = placeholder(&solid(192, 256)).unwrap();
        assert!(portrait.starts_with('T'), "3×4 components: {portrait}");
        // It carries the thumbnail's colour (as encoded: lossy WebP shifts it a little).
        let stored = image::load_from_memory(&thumb).unwrap().into_rgb8();
        let mean: Vec<u8> = (0..3)
            .map(|c| {
                let sum: u64 = stored.pixels().map(|p| u64::from(p[c])).sum();
                u8::try_from(sum / u64::from(stored.width() * stored.height())).unwrap()
            })
            .collect();
        let average = crate::blurhash::average(&landscape).unwrap();
        for (got, want) in average.iter().zip(&mean) {
            assert!(got.abs_diff(*want) <= 2, "{average:?} vs {mean:?}");
        }
        // The same bytes always give the same string; garbage gives none.
        assert_eq!(placeholder(&solid(256, 192)).unwrap(), landscape);
        assert_eq!(placeholder(b"not an image"), None);
        // A left-to-right gradient is mostly horizontal frequency.
        let gradient = image::RgbImage::from_fn(256, 192, |x, _| {
            let v = u8::try_from(x).unwrap();
            image::Rgb([v, v, v])
        });
        let hash = placeholder(&encode(gradient.as_raw(), 256, 192, thumb_spec).unwrap()).unwrap();
        let left = crate::blurhash::decode(&hash, 8, 1).unwrap();
        assert!(
            left[0] + 100 < left[7 * 4],
            "dark left, light right: {left:?}"
        );
    }

    #[test]
    fn variants_fit_without_upscaling() {
        assert_eq!(fit(3000, 2000, 1024), (1024, 683));
        assert_eq!(fit(2000, 3000, 256), (171, 256));
        assert_eq!(fit(200, 100, 1024), (200, 100));
        assert_eq!(fit(5000, 1, 256), (256, 1));
    }

    #[test]
    fn every_variant_is_produced_and_decodable() {
        let source = png(1200, 800);
        let out = render(&source, DecodeLimits::default(), &DEFAULT_VARIANTS).unwrap();
        assert_eq!(out.len(), 4);
        for e in &out {
            let decoded = image::load_from_memory(&e.bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (e.width, e.height));
            assert_eq!(e.width.max(e.height), e.spec.max_side.min(1200));
        }
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| {
            let v = ((x as f32 / 37.0).sin() * 60.0 + (y as f32 / 23.0).cos() * 60.0 + 128.0) as u8;
            image::Rgb([v, v / 2 + (x % 7) as u8, 255 - v])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), 92)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn a_jpeg_shrunk_on_load_gives_the_same_sizes_and_nearly_the_same_pixels() {
        // Odd sides: the DCT-scaled decode (1/2 here) is not an exact half.
        let source = jpeg(2301, 1533);
        let spec = [VariantSpec {
            name: "large",
            max_side: 1024,
            format: Format::Jpeg,
            quality: 95,
        }];
        let shrunk = render(&source, DecodeLimits::default(), &spec).unwrap();
        assert_eq!((shrunk[0].width, shrunk[0].height), fit(2301, 1533, 1024));
        assert_eq!(
            display_size(&source, DecodeLimits::default()).unwrap(),
            (2301, 1533)
        );
        // The same variant from a full decode (a PNG of the same pixels takes the usual path).
        let full_pixels = image::load_from_memory(&source).unwrap();
        let mut png_bytes = Vec::new();
        full_pixels
            .write_to(&mut Cursor::new(&mut png_bytes), ImageFormat::Png)
            .unwrap();
        let full = render(&png_bytes, DecodeLimits::default(), &spec).unwrap();
        let a = image::load_from_memory(&shrunk[0].bytes)
            .unwrap()
            .into_rgb8();
        let b = image::load_from_memory(&full[0].bytes).unwrap().into_rgb8();
        assert_eq!(a.dimensions(), b.dimensions());
        let diff: f64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.as_raw().len() as f64;
        assert!(diff < 2.0, "mean difference {diff:.2} of 255");
    }

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let img = image::RgbImage::from_fn(320, 240, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
        });
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), format)
            .unwrap();
        out
    }

    #[test]
    fn a_truncated_image_of_any_format_fails_as_corrupt_never_as_a_grey_ready_one() {
        let mut sources = vec![("jpeg", jpeg(320, 240))];
        for (name, format) in [
            ("png", ImageFormat::Png),
            ("gif", ImageFormat::Gif),
            ("webp", ImageFormat::WebP),
        ] {
            sources.push((name, encoded(format)));
        }
        for (name, whole) in sources {
            assert!(
                render(&whole, DecodeLimits::default(), &DEFAULT_VARIANTS).is_ok(),
                "the whole {name} renders"
            );
            // Data appended after the end is tolerated.
            let mut trailed = whole.clone();
            trailed.extend_from_slice(b"trailing bytes");
            if name != "gif" && name != "webp" {
                assert!(check_complete(&trailed).is_ok(), "{name} with a trailer");
            }
            for cut in [whole.len() / 2, whole.len() - 1] {
                let Err(failure) =
                    render(&whole[..cut], DecodeLimits::default(), &DEFAULT_VARIANTS)
                else {
                    panic!("{name} cut at {cut} of {} rendered", whole.len());
                };
                assert_eq!(failure.class, "corrupt", "{name}: {}", failure.message);
                assert!(!failure.retryable);
            }
        }
    }

    #[test]
    fn non_images_and_oversized_headers_are_refused() {
        assert_eq!(
            sniff(b"<html>hello</html>").unwrap_err().class,
            "not_an_image"
        );
        let limits = DecodeLimits {
            max_pixels: 1000,
            ..DecodeLimits::default()
        };
        assert_eq!(
            render(&png(100, 100), limits, &DEFAULT_VARIANTS)
                .unwrap_err()
                .class,
            "too_many_pixels"
        );
    }
}
