//! The image worker's configuration: environment variables with defaults, one doc line each.

use std::time::Duration;

use platform::config::{DbConfig, KafkaConfig, LogConfig};

use crate::fetch::Cidr;
use crate::storage::StoreConfig;

/// Everything the image worker needs to start.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "catalog-image-worker", about = "Processes product images")]
pub struct Config {
    /// Consumer group of the job consumer (the retry consumer uses `<group>-retry`).
    #[arg(
        long,
        env = "IMAGE_WORKER_GROUP_ID",
        default_value = "catalog-image-worker"
    )]
    pub group_id: String,
    /// Delay before each retry, in milliseconds, comma separated; one retry topic per entry. After the
    /// last, the image goes to the dead-letter topic.
    #[arg(
        long,
        env = "IMAGE_RETRY_DELAYS_MS",
        default_value = "5000,30000,300000",
        value_delimiter = ','
    )]
    pub retry_delays_ms: Vec<u64>,
    /// Time to connect to an image server, in milliseconds.
    #[arg(long, env = "IMAGE_FETCH_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub fetch_connect_timeout_ms: u64,
    /// Time for a whole download, redirects included, in milliseconds.
    #[arg(long, env = "IMAGE_FETCH_TIMEOUT_MS", default_value_t = 5_000)]
    pub fetch_timeout_ms: u64,
    /// Most redirects followed.
    /// Failed or timed-out downloads in a row from one origin (scheme, host and port) after which
    /// downloads from it are skipped (jobs go to the retry ladder at once, class
    /// `origin_unavailable`) until the cool-down has passed.
    #[arg(long, env = "IMAGE_ORIGIN_BREAKER_FAILURES", default_value_t = 5)]
    pub origin_breaker_failures: u32,
    /// How long an origin's open circuit skips downloads before one probes it, in milliseconds.
    #[arg(
        long,
        env = "IMAGE_ORIGIN_BREAKER_COOL_DOWN_MS",
        default_value_t = 5_000
    )]
    pub origin_breaker_cool_down_ms: u64,
    #[arg(long, env = "IMAGE_FETCH_MAX_REDIRECTS", default_value_t = 3)]
    pub fetch_max_redirects: usize,
    /// Largest source image accepted, in bytes (enforced while streaming).
    #[arg(long, env = "IMAGE_FETCH_MAX_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub fetch_max_bytes: usize,
    /// Internal networks image URLs may reach anyway, comma separated CIDRs (empty: none).
    #[arg(
        long,
        env = "IMAGE_FETCH_ALLOW_NETWORKS",
        default_value = "",
        value_delimiter = ','
    )]
    pub fetch_allow_networks: Vec<String>,
    /// Most pixels (width × height) a source image may declare.
    #[arg(long, env = "IMAGE_MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Memory the worker may use, in MiB: images wait for their share (downloads and decoding are
    /// budgeted from their headers before anything is allocated), and an image that alone needs more
    /// than the decoding share fails with `too_many_pixels`.
    #[arg(long, env = "IMAGE_MEMORY_LIMIT_MB", default_value_t = 1024)]
    pub memory_limit_mb: u32,
    /// Address of the metrics listener (`GET /metrics`, Prometheus text format); empty: none.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9102")]
    pub metrics_addr: String,
    /// Images decoded and encoded at once (CPU-bound; 0 = number of cores).
    #[arg(long, env = "IMAGE_CPU_WORKERS", default_value_t = 0)]
    pub cpu_workers: usize,
    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// PostgreSQL settings: the event store that results are appended through (the one authority
    /// over each product stream's sequence).
    #[command(flatten)]
    pub db: DbConfig,
    /// Image store settings.
    #[command(flatten)]
    pub store: StoreConfig,
    /// Log settings.
    #[command(flatten)]
    pub log: LogConfig,
}

impl Config {
    /// Retry delays.
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect()
    }

    /// Parsed allow-list; the error names the variable.
    pub fn allow_networks(&self) -> Result<Vec<Cidr>, String> {
        self.fetch_allow_networks
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.parse()
                    .map_err(|e| format!("IMAGE_FETCH_ALLOW_NETWORKS: {e}"))
            })
            .collect()
    }
}

/// Topic names of the image pipeline.
#[derive(Debug, Clone)]
pub struct PipelineTopics {
    /// Where `ImagesRequested` arrive and `ImagesProcessed` go.
    pub products: String,
    /// One retry topic per delay, in order.
    pub retries: Vec<String>,
    /// The dead-letter topic.
    pub dead_letters: String,
}

impl PipelineTopics {
    /// Names for `kafka` with `retry_count` retry topics.
    pub fn new(kafka: &KafkaConfig, retry_count: usize) -> Self {
        let p = &kafka.topic_prefix;
        Self {
            products: kafka.topics().products,
            retries: (1..=retry_count)
                .map(|n| format!("{p}catalog.images.retry.{n}"))
                .collect(),
            dead_letters: format!("{p}catalog.images.dlq"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Config::command().debug_assert();
    }
}
