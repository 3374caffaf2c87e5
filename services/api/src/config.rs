//! The API's configuration: environment variables with defaults, one doc line each.

use std::net::SocketAddr;
use std::time::Duration;

use platform::cache::CacheConfig;
use platform::config::{DbConfig, KafkaConfig, LogConfig};

/// Everything the API process needs to start.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "catalog-api", about = "The catalog HTTP API")]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Apply pending SQL migrations at start-up.
    #[arg(long, env = "RUN_MIGRATIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub run_migrations: bool,
    /// Largest accepted request body, in bytes (larger answers 413).
    #[arg(long, env = "API_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Longest a client may take to send a request's headers, in milliseconds; also how long an idle
    /// keep-alive connection is kept. A connection that is slower is closed.
    #[arg(long, env = "API_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Connections one client address may hold open at once; more are closed as they are accepted
    /// (0 = no limit). Behind a reverse proxy every client shares the proxy's address.
    #[arg(long, env = "API_CLIENT_CONNECTIONS", default_value_t = 256)]
    pub client_connections: usize,
    /// Requests one client address may have in progress at once; more are answered 429 at once
    /// (0 = no limit). Behind a reverse proxy every client shares the proxy's address: raise it or
    /// set 0 there and limit at the proxy.
    #[arg(long, env = "API_CLIENT_CONCURRENCY", default_value_t = 64)]
    pub client_concurrency: usize,
    /// Serve the image worker's local store (`IMAGE_LOCAL_DIR`) read-only under `/images/…`, so
    /// variant URLs open in a browser during development (`just dev` sets it); empty: off.
    #[arg(long, env = "API_LOCAL_IMAGES_DIR", default_value = "")]
    pub local_images_dir: String,
    /// Change-feed subscribers (`GET /products/changes`) this process serves at once; more answer
    /// 503 with `Retry-After` (each holds a Kafka consumer of its own).
    #[arg(long, env = "API_CHANGES_MAX_CLIENTS", default_value_t = 100)]
    pub changes_max_clients: usize,
    /// Events buffered for one change-feed subscriber.
    #[arg(long, env = "API_CHANGES_BUFFER", default_value_t = 256)]
    pub changes_buffer: usize,
    /// How long a subscriber's full buffer may stay full, in milliseconds, before it is disconnected
    /// with an `overflow` event (it resumes with `Last-Event-ID`).
    #[arg(long, env = "API_CHANGES_SLOW_CLIENT_MS", default_value_t = 5_000)]
    pub changes_slow_client_ms: u64,
    /// Longest a request may take before it is answered 503, in milliseconds.
    #[arg(long, env = "API_REQUEST_TIMEOUT_MS", default_value_t = 15_000)]
    pub request_timeout_ms: u64,
    /// Longest a request waits for a pooled PostgreSQL connection before it is answered 503 with
    /// `Retry-After`, in milliseconds (load shedding instead of an unbounded queue).
    #[arg(long, env = "API_POOL_WAIT_MS", default_value_t = 1_000)]
    pub pool_wait_ms: u64,
    /// Failed publishes in a row (broker errors or timeouts) after which writes stop waiting for the
    /// broker: their changes are recorded and answered 503 at once, and the outbox relay publishes
    /// them when the broker is back.
    #[arg(long, env = "KAFKA_BREAKER_FAILURES", default_value_t = 3)]
    pub broker_breaker_failures: u32,
    /// How long writes skip the broker before one write probes it again, in milliseconds.
    #[arg(long, env = "KAFKA_BREAKER_COOL_DOWN_MS", default_value_t = 1_000)]
    pub broker_breaker_cool_down_ms: u64,
    /// Connections reserved for reads (a pool of their own, so reads never starve writes or the
    /// reverse); 0 means `DB_POOL_SIZE`.
    #[arg(long, env = "API_READ_POOL_SIZE", default_value_t = 0)]
    pub read_pool_size: usize,
    /// How long `GET /products/{id}` and `GET /users/{id}` wait for the projection to catch up with a
    /// command this API accepted (read-your-writes), in milliseconds.
    #[arg(long, env = "API_READ_WAIT_MS", default_value_t = 2_000)]
    pub read_wait_ms: u64,
    /// In-process cache tier for hot products, in milliseconds of lifetime per entry (0 = off). An entry
    /// is served without asking Redis, so a change can be invisible for up to this long (reads with
    /// `min_version` bypass it). The benchmark figures for the cached path use 250.
    #[arg(long, env = "CACHE_LOCAL_TTL_MS", default_value_t = 0)]
    pub cache_local_ttl_ms: u64,
    /// Most products held by the in-process tier (it is emptied when full).
    #[arg(long, env = "CACHE_LOCAL_MAX_ENTRIES", default_value_t = 10_000)]
    pub cache_local_max_entries: usize,
    /// How often the outbox relay looks for commands whose events were not all acknowledged, in ms.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL_MS", default_value_t = 5_000)]
    pub outbox_interval_ms: u64,
    /// How old an unpublished command must be before the relay re-sends it (longer than any request
    /// takes, so the relay does not race a request still in flight), in ms.
    #[arg(long, env = "OUTBOX_GRACE_MS", default_value_t = 30_000)]
    pub outbox_grace_ms: u64,
    /// How long idempotency keys are remembered, in hours.
    #[arg(long, env = "IDEMPOTENCY_RETENTION_HOURS", default_value_t = 24)]
    pub idempotency_retention_hours: u32,
    /// PostgreSQL settings.
    #[command(flatten)]
    pub db: DbConfig,
    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Cache settings (`GET /products/{id}`).
    #[command(flatten)]
    pub cache: CacheConfig,
    /// Credentials and rate limits.
    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,
    /// Log settings.
    #[command(flatten)]
    pub log: LogConfig,
    /// Failure injection for tests; cannot be set from the environment.
    #[arg(skip)]
    pub fault: Option<Fault>,
}

/// A failure a test can inject to prove recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After a command's events are committed to the event store, behave as if the process died before
    /// producing any of them (the relay of a later process must publish them).
    DieBeforePublish,
    /// Every optimistic attempt of an edit is answered as if its compare-and-set found the head moved
    /// (another writer appended first), so the command falls back to deciding on a locked head.
    LoseEveryRace,
}

impl Config {
    /// Request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
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
