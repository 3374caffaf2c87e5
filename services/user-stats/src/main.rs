//! `catalog-user-stats`: the example downstream consumer.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = user_stats::Config::parse();
    platform::telemetry::init(&config.log);
    user_stats::run(config, platform::shutdown::signal()).await?;
    Ok(())
}
