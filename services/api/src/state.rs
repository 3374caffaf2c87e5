//! The state every handler shares.

use std::sync::Arc;

use deadpool_postgres::Pool;
use platform::config::Topics;

use crate::config::Fault;

/// Shared by every request. Cloned once per request by the extractors, so it is one reference-counted
/// pointer (profiling showed cloning and dropping the fields one by one at ~2 % of a cached read).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Wraps the shared parts.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What every request shares.
pub struct Shared {
    /// Connections for commands (the event store, the command log, credentials).
    pub pool: Pool,
    /// Connections for reads of the projection: a pool of their own, so a flood of reads (or slow
    /// ones) never takes the connections writes need, and the reverse.
    pub read_pool: Pool,
    /// The event producer (idempotent, acks=all; replaced after a fatal error).
    pub producer: platform::kafka::EventProducer,
    /// Skips publishing in the request path while the broker keeps failing (the relay publishes).
    pub broker_breaker: Arc<platform::breaker::CircuitBreaker>,
    /// Publishes that may hold a command connection at once: all but two of the pool (at least one).
    /// A publish holds its connection until the broker acknowledges, so during a broker stall they
    /// would otherwise take every connection, and commands and the liveness probe would find none.
    pub publishing: Arc<tokio::sync::Semaphore>,
    /// Event topic names.
    pub topics: Arc<Topics>,
    /// Moves every time the projector commits a batch (`LISTEN`/`NOTIFY`): reads waiting for the
    /// projection wake on it.
    pub projection_commits: tokio::sync::watch::Receiver<u64>,
    /// How long a read waits for the projection to reach a version this API accepted.
    pub read_wait: std::time::Duration,
    /// Longest a single database read may take (pool checkout included).
    pub db_timeout: std::time::Duration,
    /// The product cache, when enabled.
    pub cache: Option<platform::cache::ProductCache>,
    /// The in-process tier in front of Redis, when enabled.
    pub local: Option<Arc<crate::read::LocalTier>>,
    /// Concurrent misses of one product share one database read.
    pub loads: Arc<crate::read::SingleFlight>,
    /// Credentials and rate limits.
    pub auth: Arc<crate::auth::Authenticator>,
    /// The image worker's local store, served read-only under `/images/…` (development).
    pub local_images: Option<std::path::PathBuf>,
    /// The change feed (`GET /products/changes`).
    pub changes: Arc<crate::changes::Feed>,
    /// Injected failure, tests only.
    pub fault: Option<Fault>,
}

/// `ce_source` of the events this service produces.
pub const EVENT_SOURCE: &str = "/catalog/api";
