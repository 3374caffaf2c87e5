//! Writes the benchmarks' 3000×2000 photo (`benches::photo`) to PATH and, given OUTDIR, the worker's
//! four variants of it there (`<variant>-<size>.<ext>`), for comparisons with other tools.
//!
//! Usage: bench-photo PATH [OUTDIR]

use image_worker::process::{self, DEFAULT_VARIANTS, DecodeLimits};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        anyhow::bail!("usage: bench-photo PATH [OUTDIR]");
    };
    let photo = benches::photo();
    std::fs::write(&path, &photo)?;
    if let Some(dir) = args.next() {
        let rendered = process::render(&photo, DecodeLimits::default(), &DEFAULT_VARIANTS)
            .map_err(|f| anyhow::anyhow!("{}: {}", f.class, f.message))?;
        for e in rendered {
            let file = format!(
                "{dir}/worker-{}-{}.{}",
                e.spec.name,
                e.spec.max_side,
                e.spec.format.extension()
            );
            std::fs::write(file, e.bytes)?;
        }
    }
    Ok(())
}
