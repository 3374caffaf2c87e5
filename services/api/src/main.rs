//! `catalog-api`: parse config, start telemetry, serve until SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = api::Config::parse();
    platform::telemetry::init(&config.log);
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on API_ADDR={}: {e}", config.addr))?;
    tracing::info!("open http://{}", listener.local_addr()?);
    api::run(config, listener, platform::shutdown::signal()).await?;
    Ok(())
}
