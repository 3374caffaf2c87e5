//! Hostile images: inputs made to have a decoder allocate as much as it can, or to trip it up. The
//! decoding-memory test (`tests/decode_memory.rs`, small sizes) and the worker's memory benchmark
//! (`scripts/bench-hostile.sh` via `hostile-corpus`, full sizes) are built from the same list.

use std::io::Cursor;

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgba};

/// What the worker must make of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Variants are produced.
    Ready,
    /// The image fails for good with this `error_class`.
    Fails(&'static str),
}

/// One hostile input.
#[derive(Debug, Clone)]
pub struct Hostile {
    /// File name (with extension).
    pub name: &'static str,
    /// The file.
    pub bytes: Vec<u8>,
    /// The outcome the worker must reach.
    pub expect: Expect,
}

/// The corpus with its largest images at about `megapixels` million pixels (the worker's default
/// limit is 40). Images that must be refused are the same at every size.
pub fn corpus(megapixels: f64) -> Vec<Hostile> {
    // 3:2 sides for the given pixel count.
    let side = |mp: f64| {
        let h = ((mp * 1e6) / 1.5).sqrt();
        ((h * 1.5) as u32, h as u32)
    };
    let (w, h) = side(megapixels);
    let (sw, sh) = side(megapixels / 2.0);
    let (qw, qh) = side(megapixels / 4.0);
    vec![
        Hostile {
            name: "png16-rgba-rotated.png",
            bytes: with_exif_orientation(png16_rgba(w, h), 6),
            expect: Expect::Ready,
        },
        Hostile {
            name: "jpeg-progressive.jpg",
            bytes: jpeg(w, h, true, false),
            expect: Expect::Ready,
        },
        Hostile {
            name: "jpeg-cmyk.jpg",
            bytes: jpeg(sw, sh, false, true),
            expect: Expect::Ready,
        },
        Hostile {
            name: "gif-full-screen.gif",
            bytes: gif(sw as u16, sh as u16, sw as u16, sh as u16),
            expect: Expect::Ready,
        },
        Hostile {
            name: "webp-lossless.webp",
            bytes: webp(qw, qh),
            expect: Expect::Ready,
        },
        Hostile {
            name: "gif-frame-beyond-screen.gif",
            bytes: gif(10, 10, 8000, 8000),
            expect: Expect::Fails("too_many_pixels"),
        },
        Hostile {
            name: "gif-zero-width-screen.gif",
            bytes: gif(0, 10, 0, 10),
            expect: Expect::Fails("corrupt"),
        },
        Hostile {
            name: "gif-zero-width-frame.gif",
            bytes: gif(10, 10, 0, 10),
            expect: Expect::Fails("corrupt"),
        },
        Hostile {
            name: "png-bomb-header.png",
            bytes: png_header_only(16_384, 16_384),
            expect: Expect::Fails("too_many_pixels"),
        },
        Hostile {
            name: "jpeg-truncated.jpg",
            bytes: {
                let whole = jpeg(qw, qh, false, false);
                whole[..whole.len() / 2].to_vec()
            },
            expect: Expect::Fails("corrupt"),
        },
    ]
}

/// A smooth pattern with some texture, so encoders do real work.
fn pattern(x: u32, y: u32) -> [u8; 4] {
    let v = ((x / 7) ^ (y / 5)) as u8;
    [v, (x % 251) as u8, (y % 241) as u8, 255 - (v / 2)]
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), format)
        .expect("an image encodes into memory");
    out
}

/// A 16-bit RGBA PNG: 8 bytes a pixel once decoded.
fn png16_rgba(w: u32, h: u32) -> Vec<u8> {
    let img: ImageBuffer<Rgba<u16>, Vec<u16>> = ImageBuffer::from_fn(w, h, |x, y| {
        let p = pattern(x, y);
        Rgba(p.map(|c| u16::from(c) * 257))
    });
    encode(DynamicImage::ImageRgba16(img), ImageFormat::Png)
}

fn webp(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| Rgba(pattern(x, y)));
    encode(DynamicImage::ImageRgba8(img), ImageFormat::WebP)
}

/// A JPEG, progressive (coefficients kept for the whole image while decoding) or CMYK (decoded the
/// long way, not shrunk on load) when asked.
fn jpeg(w: u32, h: u32, progressive: bool, cmyk: bool) -> Vec<u8> {
    let channels = if cmyk { 4 } else { 3 };
    let mut pixels = Vec::with_capacity(w as usize * h as usize * channels);
    for y in 0..h {
        for x in 0..w {
            pixels.extend_from_slice(&pattern(x, y)[..channels]);
        }
    }
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 85);
    encoder.set_progressive(progressive);
    let color = if cmyk {
        jpeg_encoder::ColorType::Cmyk
    } else {
        jpeg_encoder::ColorType::Rgb
    };
    encoder
        .encode(&pixels, w as u16, h as u16, color)
        .expect("a JPEG encodes into memory");
    out
}

/// A GIF with a `screen_w`×`screen_h` logical screen and one `frame_w`×`frame_h` frame of one
/// colour (LZW makes a few kilobytes of it, however large the frame).
fn gif(screen_w: u16, screen_h: u16, frame_w: u16, frame_h: u16) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let palette = [0x20, 0x40, 0x60, 0xFF, 0xFF, 0xFF];
        let mut encoder = gif::Encoder::new(&mut out, screen_w, screen_h, &palette)
            .expect("a GIF header encodes into memory");
        let pixels = vec![0u8; usize::from(frame_w) * usize::from(frame_h)];
        let mut frame = gif::Frame::from_indexed_pixels(frame_w, frame_h, pixels, None);
        frame.left = 0;
        frame.top = 0;
        encoder
            .write_frame(&frame)
            .expect("a GIF frame encodes into memory");
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// Inserts an `eXIf` chunk with the given orientation after a PNG's header chunk.
fn with_exif_orientation(png: Vec<u8>, orientation: u16) -> Vec<u8> {
    let mut exif = b"MM\0\x2A\0\0\0\x08\0\x01".to_vec();
    exif.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]);
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    // Signature (8) + IHDR (4 + 4 + 13 + 4).
    let at = 8 + 25;
    let mut out = png[..at].to_vec();
    out.extend_from_slice(&chunk(b"eXIf", &exif));
    out.extend_from_slice(&png[at..]);
    out
}

/// A PNG that declares `w`×`h` RGB pixels and holds almost no data: refused on its header.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    out.extend_from_slice(&chunk(b"IHDR", &ihdr));
    // A zlib stream of a few zero bytes.
    out.extend_from_slice(&chunk(
        b"IDAT",
        &[0x78, 0x9C, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    ));
    out.extend_from_slice(&chunk(b"IEND", &[]));
    out
}
