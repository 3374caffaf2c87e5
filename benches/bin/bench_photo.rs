//! Writes the benchmarks' 3000×2000 photo (`benches::photo`) to the path given.
//!
//! Usage: bench-photo PATH

fn main() -> anyhow::Result<()> {
    let Some(path) = std::env::args().nth(1) else {
        anyhow::bail!("usage: bench-photo PATH");
    };
    std::fs::write(path, benches::photo())?;
    Ok(())
}
