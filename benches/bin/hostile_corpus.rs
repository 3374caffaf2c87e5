//! Writes the hostile-image corpus (`benches::hostile`) into DIR, its largest images at about
//! MEGAPIXELS million pixels (default 39, just under the worker's 40 MP limit), and prints one line
//! per file: name, bytes, expected outcome.
//!
//! With COPIES > 1, writes that many copies of each file (`c<N>-<name>`), each with different bytes
//! (data after the end of a PNG, JPEG or WebP, a changed palette entry in a GIF), so the worker's store, which de-duplicates sources by hash, processes every one.
//!
//! Usage: hostile-corpus DIR [MEGAPIXELS] [COPIES]

use benches::hostile::{Expect, corpus};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        anyhow::bail!("usage: hostile-corpus DIR [MEGAPIXELS] [COPIES]");
    };
    let megapixels: f64 = args.next().map_or(Ok(39.0), |m| m.parse())?;
    let copies: u8 = args.next().map_or(Ok(1), |m| m.parse())?;
    std::fs::create_dir_all(&dir)?;
    for input in corpus(megapixels) {
        let expect = match input.expect {
            Expect::Ready => "ready".to_owned(),
            Expect::Fails(class) => format!("failed:{class}"),
        };
        for copy in 0..copies {
            let (name, bytes) = if copies == 1 {
                (input.name.to_owned(), input.bytes.clone())
            } else {
                (
                    format!("c{copy}-{}", input.name),
                    variant(input.name, &input.bytes, copy),
                )
            };
            std::fs::write(format!("{dir}/{name}"), &bytes)?;
            println!("{name} {} {expect}", bytes.len());
        }
    }
    Ok(())
}

/// `bytes` made different for `copy` without changing what the file is.
fn variant(name: &str, bytes: &[u8], copy: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if name.ends_with(".gif") {
        // The second entry of the global colour table (header 6 + screen 7 + first entry 3).
        if let Some(b) = out.get_mut(16) {
            *b = copy;
        }
    } else {
        out.extend_from_slice(format!("copy {copy}").as_bytes());
    }
    out
}
