//! The projector's configuration: environment variables with defaults, one doc line each.

use std::time::Duration;

use platform::cache::CacheConfig;
use platform::config::{DbConfig, KafkaConfig, LogConfig};

/// Everything the projector process needs to start.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "catalog-projector",
    about = "Projects catalog events into PostgreSQL"
)]
pub struct Config {
    /// Consumer group; every projector process of one deployment shares it, and its offsets in
    /// `projection_offsets` are kept under this name.
    #[arg(long, env = "PROJECTOR_GROUP_ID", default_value = "catalog-projector")]
    pub group_id: String,
    /// Most events applied in one PostgreSQL transaction.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Longest wait for more events once a batch has its first one, in milliseconds. 0: a batch is what
    /// the consumer already holds (under load that is already a full batch; idle, no event waits).
    #[arg(long, env = "PROJECTOR_BATCH_WAIT_MS", default_value_t = 0)]
    pub batch_wait_ms: u64,
    /// Transactions applied at once, each on its own connection, over disjoint sets of partitions (a
    /// product's events all live in one partition, so lanes never touch the same rows). 1: one at a time.
    /// Raise it when PostgreSQL has cores and disk to spare; on a 2-core machine that also runs the
    /// database and the broker it only adds contention (docs/BENCHMARKS.md).
    #[arg(long, env = "PROJECTOR_PARALLELISM", default_value_t = 1)]
    pub parallelism: usize,
    /// Address of the metrics listener (`GET /metrics`, Prometheus text format); empty: none.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9101")]
    pub metrics_addr: String,
    /// Apply pending SQL migrations at start-up.
    #[arg(long, env = "RUN_MIGRATIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub run_migrations: bool,
    /// PostgreSQL settings.
    #[command(flatten)]
    pub db: DbConfig,
    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Cache settings (the projector invalidates entries of the products it changed).
    #[command(flatten)]
    pub cache: CacheConfig,
    /// Log settings.
    #[command(flatten)]
    pub log: LogConfig,
}

impl Config {
    /// Batch wait.
    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
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
