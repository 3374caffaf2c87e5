//! `catalog-projector`: parse config, start telemetry, project until SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = projector::Config::parse();
    platform::telemetry::init(&config.log);
    projector::run(config, platform::shutdown::signal()).await?;
    Ok(())
}
