//! The Redis cache of `GET /products/:id`: version-stamped entries that a slow reader can never roll
//! back.
//!
//! Each product has two keys: the entry (`{prefix}product:{id}` = `"{version}\n{json}"`, with a TTL) and
//! a floor (`{prefix}product:{id}:floor` = the newest version known to be projected). The projector
//! raises the floor and deletes the entry after each commit (`invalidate`); a reader that missed fills
//! the entry only if its version is at least the floor and newer than what is there (`fill`). Both are
//! Lua scripts, so each is atomic in Redis. A reader that read version 2 from PostgreSQL just before the
//! projector committed version 3 therefore cannot put version 2 back.
//!
//! Every call is bounded by a short timeout and fails soft: the caller falls back to PostgreSQL.

use std::time::Duration;

use fred::prelude::*;
use uuid::Uuid;

/// Cache settings. `Debug` hides a password in the Redis URL.
#[derive(Clone, clap::Args)]
pub struct CacheConfig {
    /// Redis URL; empty disables the cache.
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Lifetime of a cache entry, in seconds (bounds staleness if an invalidation is ever lost).
    #[arg(long = "cache-ttl-secs", env = "CACHE_TTL_SECS", default_value_t = 300)]
    pub cache_ttl_secs: u64,
    /// Longest wait for Redis per command, in milliseconds, before falling back to PostgreSQL.
    #[arg(
        long = "cache-timeout-ms",
        env = "CACHE_TIMEOUT_MS",
        default_value_t = 100
    )]
    pub cache_timeout_ms: u64,
    /// Connections to Redis (requests are spread over them; one connection serialises every command
    /// through one socket and one task).
    #[arg(
        long = "cache-connections",
        env = "CACHE_CONNECTIONS",
        default_value_t = 4
    )]
    pub cache_connections: usize,
    /// Prefix of every key (tests use one each).
    #[arg(
        long = "cache-key-prefix",
        env = "CACHE_KEY_PREFIX",
        default_value = "catalog:"
    )]
    pub cache_key_prefix: String,
    /// Failed or timed-out Redis calls in a row that open the circuit (calls are then skipped).
    #[arg(
        long = "cache-breaker-failures",
        env = "CACHE_BREAKER_FAILURES",
        default_value_t = 3
    )]
    pub cache_breaker_failures: u32,
    /// How long an open circuit skips Redis before one call probes it again, in milliseconds.
    #[arg(
        long = "cache-breaker-cool-down-ms",
        env = "CACHE_BREAKER_COOL_DOWN_MS",
        default_value_t = 1000
    )]
    pub cache_breaker_cool_down_ms: u64,
}

impl std::fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // redis://user:password@host:port/db → keep everything but the password.
        let url = match (self.redis_url.find("://"), self.redis_url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &self.redis_url[scheme + 3..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                format!(
                    "{}{user}:<redacted>{}",
                    &self.redis_url[..scheme + 3],
                    &self.redis_url[at..]
                )
            }
            _ => self.redis_url.clone(),
        };
        f.debug_struct("CacheConfig")
            .field("redis_url", &url)
            .field("cache_ttl_secs", &self.cache_ttl_secs)
            .field("cache_timeout_ms", &self.cache_timeout_ms)
            .field("cache_connections", &self.cache_connections)
            .field("cache_key_prefix", &self.cache_key_prefix)
            .finish()
    }
}

/// Why a cache call did not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis did not answer in time (or is not connected).
    #[error("redis did not answer in time")]
    Timeout,
    /// The circuit breaker is open: the call was skipped without trying.
    #[error("redis calls are skipped for a while (circuit open)")]
    CircuitOpen,
    /// The entry is not of the expected shape.
    #[error("malformed cache entry")]
    Malformed,
}

/// How long a floor outlives the last invalidation: far longer than any read can take.
const FLOOR_TTL_SECS: u64 = 3600;

const FILL: &str = r"
local floor = tonumber(redis.call('GET', KEYS[2]) or '0')
local v = tonumber(ARGV[1])
if v < floor then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local cv = tonumber(string.match(cur, '^(%d+)\n'))
  if cv and cv >= v then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '\n' .. ARGV[2], 'EX', ARGV[3])
return 1
";

/// KEYS: entry and floor of each product, in pairs; ARGV[1]: floor TTL; ARGV[2]: `1` to drop entries
/// whatever their version, `0` to keep an entry already at or past the projected version (it is as new
/// as the rows); ARGV[k + 2]: the projected version of the k-th product.
const INVALIDATE: &str = r"
for k = 1, #KEYS / 2 do
  local entry_key, floor_key = KEYS[2 * k - 1], KEYS[2 * k]
  local v = tonumber(ARGV[k + 2])
  local floor = tonumber(redis.call('GET', floor_key) or '0')
  if v > floor then
    redis.call('SET', floor_key, ARGV[k + 2], 'EX', ARGV[1])
  else
    redis.call('EXPIRE', floor_key, ARGV[1])
  end
  local drop = ARGV[2] == '1'
  if not drop then
    local cur = redis.call('GET', entry_key)
    if cur then
      local cv = tonumber(string.match(cur, '^(%d+)\n'))
      drop = (not cv) or cv < v
    end
  end
  if drop then redis.call('DEL', entry_key) end
end
return #KEYS / 2
";

/// Products per invalidation script call (bounds the time one call holds Redis).
pub const INVALIDATE_CHUNK: usize = 500;

/// The product cache (cheap to clone).
#[derive(Clone)]
pub struct ProductCache {
    client: Pool,
    prefix: String,
    ttl_secs: u64,
    timeout: Duration,
    breaker: std::sync::Arc<crate::breaker::CircuitBreaker>,
}

impl ProductCache {
    /// Connects in the background (never blocks start-up on Redis); `None` when disabled.
    pub fn connect(cfg: &CacheConfig) -> Result<Option<Self>, CacheError> {
        if cfg.redis_url.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(cfg.cache_timeout_ms);
        let config = Config::from_url(&cfg.redis_url)?;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build_pool(cfg.cache_connections.max(1))?;
        let _connections = client.connect_pool();
        Ok(Some(Self {
            client,
            prefix: cfg.cache_key_prefix.clone(),
            ttl_secs: cfg.cache_ttl_secs,
            timeout,
            breaker: std::sync::Arc::new(crate::breaker::CircuitBreaker::new(
                "redis",
                cfg.cache_breaker_failures,
                Duration::from_millis(cfg.cache_breaker_cool_down_ms),
            )),
        }))
    }

    fn keys(&self, id: Uuid) -> (String, String) {
        let entry = format!("{}product:{id}", self.prefix);
        let floor = format!("{entry}:floor");
        (entry, floor)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, CacheError> {
        if !self.client.next().is_connected() {
            return Err(CacheError::Timeout);
        }
        let Some(attempt) = self.breaker.attempt() else {
            return Err(CacheError::CircuitOpen);
        };
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(CacheError::from),
            Err(_) => Err(CacheError::Timeout),
        };
        attempt.record(result.is_ok());
        result
    }

    /// The cached representation of product `id` and its version, if any.
    pub async fn get(&self, id: Uuid) -> Result<Option<(u64, bytes::Bytes)>, CacheError> {
        let (entry, _) = self.keys(id);
        let value: Option<bytes::Bytes> = self.bounded(self.client.get(entry)).await?;
        let Some(value) = value else { return Ok(None) };
        let newline = value
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(CacheError::Malformed)?;
        let version = std::str::from_utf8(&value[..newline])
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or(CacheError::Malformed)?;
        Ok(Some((version, value.slice(newline + 1..))))
    }

    /// Stores `json` as version `version` of product `id`, unless the cache already knows a newer one.
    /// Returns whether it was stored.
    pub async fn fill(&self, id: Uuid, version: u64, json: &[u8]) -> Result<bool, CacheError> {
        let (entry, floor) = self.keys(id);
        let args: Vec<Value> = vec![
            Value::from(version.to_string()),
            Value::Bytes(bytes::Bytes::copy_from_slice(json)),
            Value::from(self.ttl_secs.to_string()),
        ];
        let stored: i64 = self
            .bounded(self.client.eval(FILL, vec![entry, floor], args))
            .await?;
        Ok(stored == 1)
    }

    /// Records that version `version` of product `id` is projected: drops the entry (whatever its
    /// version) and refuses any later fill with an older version.
    pub async fn invalidate(&self, id: Uuid, version: u64) -> Result<(), CacheError> {
        self.invalidate_many(&[(id, version)]).await
    }

    /// [`Self::invalidate`] for many products, one script call (one round trip) per
    /// [`INVALIDATE_CHUNK`] products. For rows that may have changed without a new version (a replay
    /// repairing them).
    pub async fn invalidate_many(&self, changed: &[(Uuid, u64)]) -> Result<(), CacheError> {
        self.run_invalidate(changed, true).await
    }

    /// The projector's invalidation after a commit: raises each floor to the projected version and
    /// drops entries older than it; an entry already at that version or newer (a reader filled it from
    /// the committed rows before this call arrived) is as fresh as the rows and stays.
    pub async fn invalidate_projected(&self, changed: &[(Uuid, u64)]) -> Result<(), CacheError> {
        self.run_invalidate(changed, false).await
    }

    async fn run_invalidate(&self, changed: &[(Uuid, u64)], force: bool) -> Result<(), CacheError> {
        for chunk in changed.chunks(INVALIDATE_CHUNK) {
            let mut keys = Vec::with_capacity(chunk.len() * 2);
            let mut args = Vec::with_capacity(chunk.len() + 2);
            args.push(FLOOR_TTL_SECS.to_string());
            args.push(if force { "1" } else { "0" }.to_owned());
            for &(id, version) in chunk {
                let (entry, floor) = self.keys(id);
                keys.push(entry);
                keys.push(floor);
                args.push(version.to_string());
            }
            let _: i64 = self
                .bounded(self.client.eval(INVALIDATE, keys, args))
                .await?;
        }
        Ok(())
    }

    /// Waits (bounded) for the first connection; for start-up logs and tests.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.client.wait_for_connect())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redis_password_never_shows_in_debug_output() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            cache: super::CacheConfig,
        }
        let cli = Cli::parse_from(["x", "--redis-url", "redis://app:hunter2@cache:6379/0"]);
        let shown = format!("{:?}", cli.cache);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://app:<redacted>@cache:6379/0"),
            "{shown}"
        );
    }
}
