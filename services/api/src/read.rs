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

/// Where an answer came from (the `x-cache` response header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
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

type Load = Shared<BoxFuture<'static, Result<Option<Representation>, String>>>;

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
    let mut cache_up = false;
    if let Some(cache) = &state.cache {
        match cache.get(id).await {
            Ok(Some((version, json))) if version >= min_version => {
                return Ok(Some((Representation { version, json }, Source::Hit)));
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
    let representation = result.map_err(ApiError::Unavailable)?;
    let source = if cache_up {
        Source::Miss
    } else {
        Source::Bypass
    };
    Ok(representation.map(|r| (r, source)))
}

/// The database read, and the cache fill.
async fn load(
    state: &AppState,
    id: Uuid,
    min_version: u64,
) -> Result<Option<Representation>, ApiError> {
    let sql = format!(
        "SELECT {PRODUCT_COLUMNS},
                (SELECT (c.response->>'version')::bigint FROM api_commands c WHERE c.id = $1)
           FROM (SELECT $1::uuid AS wanted) w LEFT JOIN products ON products.id = w.wanted"
    );
    let Some(product) = read_projected(state, &sql, id, min_version, product_from_row, |p| {
        p.version
    })
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
    Ok(Some(representation))
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
                        Ok(Some(Representation {
                            version: 7,
                            json: Bytes::from_static(b"{}"),
                        }))
                    }
                    .boxed()
                    .shared()
                });
                let out = load.await;
                if leader {
                    flight.finish(&key);
                }
                (out.unwrap().unwrap().version, leader)
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
