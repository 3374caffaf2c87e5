//! `catalog-image-worker`: parse config, start telemetry, process images until SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = image_worker::Config::parse();
    platform::telemetry::init(&config.log);
    image_worker::run(config, platform::shutdown::signal()).await?;
    Ok(())
}
