//! Logging: one `tracing` subscriber per process, filtered by `RUST_LOG`, pretty or JSON by `LOG_FORMAT`.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber. Call once, first thing in `main`.
///
/// `RUST_LOG` selects what is logged (default `info`); `LOG_FORMAT=json` writes one JSON object per line
/// with the span fields (request id, topic, offset, …) on every record.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.format == "json" {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}
