//! Configuration pieces shared by the services, read from environment variables with defaults.
//!
//! Each service's own config struct flattens these (`#[command(flatten)]`), so one variable means the
//! same thing in every process. Secrets are kept out of `Debug` output.

use std::fmt;
use std::time::Duration;

/// PostgreSQL connection settings.
#[derive(Clone, clap::Args)]
pub struct DbConfig {
    /// PostgreSQL host.
    #[arg(long = "db-host", env = "DB_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// PostgreSQL port.
    #[arg(long = "db-port", env = "DB_PORT", default_value_t = 5432)]
    pub port: u16,
    /// PostgreSQL user.
    #[arg(long = "db-user", env = "DB_USER", default_value = "postgres")]
    pub user: String,
    /// PostgreSQL password (empty for trust authentication). Never logged.
    #[arg(
        long = "db-password",
        env = "DB_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub password: String,
    /// Database name; `catalogctl migrate` creates it when missing.
    #[arg(long = "db-name", env = "DB_NAME", default_value = "catalog")]
    pub name: String,
    /// Schema holding the catalog's tables (tests use one schema each).
    #[arg(long = "db-schema", env = "DB_SCHEMA", default_value = "public", value_parser = parse_identifier)]
    pub schema: String,
    /// Maximum connections in the pool.
    #[arg(long = "db-pool-size", env = "DB_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,
    /// How long to wait for a connection (pool checkout or connect), in milliseconds.
    #[arg(long = "db-timeout-ms", env = "DB_TIMEOUT_MS", default_value_t = 5000)]
    pub timeout_ms: u64,
}

impl DbConfig {
    /// Connection and checkout timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("name", &self.name)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Kafka connection and topic settings.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Prefix put before every topic name (tests use one prefix each).
    #[arg(
        long = "kafka-topic-prefix",
        env = "KAFKA_TOPIC_PREFIX",
        default_value = ""
    )]
    pub topic_prefix: String,
    /// Partitions of each event topic when this process creates it.
    #[arg(
        long = "kafka-topic-partitions",
        env = "KAFKA_TOPIC_PARTITIONS",
        default_value_t = 6
    )]
    pub topic_partitions: i32,
    /// Replication factor of each event topic when this process creates it.
    #[arg(
        long = "kafka-topic-replication",
        env = "KAFKA_TOPIC_REPLICATION",
        default_value_t = 1
    )]
    pub topic_replication: i32,
    /// Most messages a producer packs into one record batch. Keep the default. Only a stock Tansu 0.6
    /// broker needs 1: it skips the rest of a batch when a consumer starts inside one (the patched
    /// build that `just dev` and the tests use does not; README "Infrastructure").
    #[arg(
        long = "kafka-producer-batch-messages",
        env = "KAFKA_PRODUCER_BATCH_MESSAGES",
        default_value_t = 10_000
    )]
    pub producer_batch_messages: u32,
    /// Create missing topics at start-up (the broker must not auto-create them).
    #[arg(
        long = "kafka-create-topics",
        env = "KAFKA_CREATE_TOPICS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub create_topics: bool,
    /// A consumer whose group membership has not been settled (joined, assigned, steady) for this
    /// long, in milliseconds, is replaced by a new instance that joins afresh. Three session
    /// timeouts by default: long enough for any healthy rebalance, short enough that a member left
    /// out after a broker stall is back within a minute.
    #[arg(
        long = "kafka-rejoin-after-ms",
        env = "KAFKA_REJOIN_AFTER_MS",
        default_value_t = 30_000
    )]
    pub rejoin_after_ms: u64,
    /// Longest a consumer's fetch waits at the broker for new messages, in milliseconds
    /// (`fetch.wait.max.ms`). Apache Kafka answers a fetch as soon as data arrives, so there this only
    /// sets how often an idle consumer asks; a broker that holds every fetch for the full wait (Tansu
    /// 0.6 does, measured) makes it the floor of every consumer's latency. 10 ms costs an idle consumer
    /// 100 small requests a second.
    #[arg(
        long = "kafka-fetch-wait-max-ms",
        env = "KAFKA_FETCH_WAIT_MAX_MS",
        default_value_t = 10
    )]
    pub fetch_wait_max_ms: u32,
}

impl KafkaConfig {
    /// See `rejoin_after_ms`.
    pub fn rejoin_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.rejoin_after_ms)
    }

    /// The event topic names for this configuration.
    pub fn topics(&self) -> Topics {
        Topics {
            users: format!("{}catalog.users", self.topic_prefix),
            products: format!("{}catalog.products", self.topic_prefix),
        }
    }
}

/// Names of the event topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Events of user streams.
    pub users: String,
    /// Events of product streams.
    pub products: String,
}

impl Topics {
    /// The topic that holds streams of `aggregate_type`.
    pub fn for_aggregate(&self, aggregate_type: events::AggregateType) -> &str {
        match aggregate_type {
            events::AggregateType::User => &self.users,
            events::AggregateType::Product => &self.products,
        }
    }

    /// Every event topic.
    pub fn all(&self) -> [&str; 2] {
        [&self.users, &self.products]
    }
}

/// Log output settings.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// `pretty` for people, `json` for log shippers.
    #[arg(long = "log-format", env = "LOG_FORMAT", default_value = "pretty", value_parser = ["pretty", "json"])]
    pub format: String,
}

/// Accepts a lower-case SQL identifier, the only kind we interpolate into SQL.
fn parse_identifier(value: &str) -> Result<String, String> {
    let mut chars = value.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && value.len() <= 63;
    if ok {
        Ok(value.to_owned())
    } else {
        Err("must be a lower-case identifier ([a-z_][a-z0-9_]*, at most 63 characters)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(parse_identifier("catalog_test_1").is_ok());
        assert!(parse_identifier("public").is_ok());
        assert!(parse_identifier("1abc").is_err());
        assert!(parse_identifier("a;drop").is_err());
        assert!(parse_identifier("Upper").is_err());
        assert!(parse_identifier("").is_err());
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            db: DbConfig,
        }
        let cli = <Cli as clap::Parser>::parse_from(["x", "--db-password", "hunter2"]);
        let shown = format!("{:?}", cli.db);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
