//! The read path of `GET /products/{id}`: Redis first, then PostgreSQL through a single flight.
//!
//! - Hit: the cached bytes are served as they are (no PostgreSQL query).
//! - Miss: one task per product reads PostgreSQL (concurrent misses of the same product in this process
//!   wait for it instead of issuing their own query), then fills the cache with a version-stamped entry
//!   that cannot overwrite a newer one (see `platform::cache`). Across processes each process does its
//!   own read: N API processes cost at most N reads per miss, not one per request.
//! - Redis down or slow: every cache call is bounded (`CACHE_TIMEOUT_MS`) and skipped while the client
//!   is disconnected; the answer comes from PostgreSQL and a warning is logged.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use platform::read_model::{PRODUCT_COLUMNS, product_from_row};
use uuid::Uuid;

use crate::error::ApiError;
use crate::routes::read_projected;
use crate::state::AppState;

/// The optional in-process tier: recently served products, each kept for a fixed lifetime. Bounded
/// staleness by construction (the lifetime), bounded memory (emptied when full).
pub struct LocalTier {
    ttl: std::time::Duration,
    max_entries: usize,
    entries: std::sync::RwLock<HashMap<Uuid, (std::time::Instant, Representation)>>,
}

impl LocalTier {
    /// A tier keeping entries for `ttl`, at most `max_entries` of them.
    pub fn new(ttl: std::time::Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: std::sync::RwLock::default(),
        }
    }

    fn get(&self, id: Uuid, min_version: u64) -> Option<Representation> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (at, r) = entries.get(&id)?;
        (at.elapsed() < self.ttl && r.version >= min_version).then(|| r.clone())
    }

    fn put(&self, id: Uuid, r: &Representation) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max_entries {
            entries.clear();
        }
        entries.insert(id, (std::time::Instant::now(), r.clone()));
    }
}

/// Where an answer came from (the `x-cache` response header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Served from the in-process tier.
    Local,
    /// Served from Redis.
    Hit,
    /// Read from PostgreSQL (and offered to the cache) by this request.
    Miss,
    /// Missed, and shared the database read another request was already doing.
    Coalesced,
    /// Read from PostgreSQL because the cache is disabled or unavailable.
    Bypass,
}

impl Source {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Hit => "hit",
            Source::Miss => "miss",
            Source::Coalesced => "coalesced",
            Source::Bypass => "bypass",
        }
    }
}

/// A product representation: its version and its JSON bytes.
#[derive(Debug, Clone)]
pub struct Representation {
    /// Version of the product.
    pub version: u64,
    /// The JSON body.
    pub json: Bytes,
}

/// A load's result: the representation, and whether it came from the cache after all.
type Loaded = Option<(Representation, bool)>;
type Load = Shared<BoxFuture<'static, Result<Loaded, String>>>;

/// In-flight database reads, by product and minimum version.
#[derive(Default)]
pub struct SingleFlight {
    inflight: Mutex<HashMap<(Uuid, u64), Load>>,
}

impl SingleFlight {
    fn get_or_start(&self, key: (Uuid, u64), start: impl FnOnce() -> Load) -> (Load, bool) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(load) = inflight.get(&key) {
            return (load.clone(), false);
        }
        let load = start();
        inflight.insert(key, load.clone());
        (load, true)
    }

    fn finish(&self, key: &(Uuid, u64)) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Reads product `id` at version `min_version` or newer: cache, else PostgreSQL. `Ok(None)`: no such
/// product (or not at that version within the read wait, when `min_version` is given).
pub async fn product(
    state: &AppState,
    id: Uuid,
    min_version: u64,
) -> Result<Option<(Representation, Source)>, ApiError> {
    if let Some(r) = state.local.as_ref().and_then(|l| l.get(id, min_version)) {
        return Ok(Some((r, Source::Local)));
    }
    let mut cache_up = false;
    if let Some(cache) = &state.cache {
        match cache.get(id).await {
            Ok(Some((version, json))) if version >= min_version => {
                let r = Representation { version, json };
                if let Some(local) = &state.local {
                    local.put(id, &r);
                }
                return Ok(Some((r, Source::Hit)));
            }
            Ok(_) => cache_up = true,
            Err(error) => tracing::warn!(%error, "cache unavailable; reading PostgreSQL"),
        }
    }
    let key = (id, min_version);
    let (load, leader) = state.loads.get_or_start(key, || {
        let state = state.clone();
        async move {
            load(&state, id, min_version)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
        .shared()
    });
    let result = load.await;
    if leader {
        state.loads.finish(&key);
    }
    let Some((representation, from_cache)) = result.map_err(ApiError::Unavailable)? else {
        return Ok(None);
    };
    if let Some(local) = &state.local {
        local.put(id, &representation);
    }
    let source = match (cache_up, leader, from_cache) {
        (false, _, _) => Source::Bypass,
        (true, _, true) => Source::Hit,
        (true, true, false) => Source::Miss,
        (true, false, false) => Source::Coalesced,
    };
    Ok(Some((representation, source)))
}

/// The database read, and the cache fill.
///
/// Looks at the cache once more first: a request that missed just before another load filled the
/// entry (and finished, so it could not share it) finds it here instead of reading PostgreSQL again.
async fn load(state: &AppState, id: Uuid, min_version: u64) -> Result<Loaded, ApiError> {
    if let Some(cache) = &state.cache {
        if let Ok(Some((version, json))) = cache.get(id).await {
            if version >= min_version {
                return Ok(Some((Representation { version, json }, true)));
            }
        }
    }
    let Some(product) = read_projected(
        state,
        "products",
        PRODUCT_COLUMNS,
        id,
        min_version,
        product_from_row,
        |p| p.version,
    )
    .await?
    else {
        return Ok(None);
    };
    let representation = Representation {
        version: product.version,
        json: Bytes::from(serde_json::to_vec(&product).expect("product serialises")),
    };
    if let Some(cache) = &state.cache {
        if let Err(error) = cache
            .fill(id, representation.version, &representation.json)
            .await
        {
            tracing::warn!(%error, "cannot fill the cache");
        }
    }
    Ok(Some((representation, false)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flight = Arc::new(SingleFlight::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let key = (Uuid::nil(), 0);
        let callers = (0..50).map(|_| {
            let flight = flight.clone();
            let loads = loads.clone();
            async move {
                let (load, leader) = flight.get_or_start(key, || {
                    async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let r = Representation {
                            version: 7,
                            json: Bytes::from_static(b"{}"),
                        };
                        Ok(Some((r, false)))
                    }
                    .boxed()
                    .shared()
                });
                let out = load.await;
                if leader {
                    flight.finish(&key);
                }
                (out.unwrap().unwrap().0.version, leader)
            }
        });
        let results = futures::future::join_all(callers).await;
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, leader)| *leader).count(), 1);
        assert!(results.iter().all(|(v, _)| *v == 7));
        assert!(
            flight.inflight.lock().unwrap().is_empty(),
            "finished loads are forgotten"
        );
    }
}
