//! The read path of `GET /products/{id}`: Redis first, then PostgreSQL through a single flight.
//!
//! - Hit: the cached bytes are served as they are (no PostgreSQL query).
//! - Miss: one task per product reads PostgreSQL (concurrent misses of the same product in this process
//!   share its answer when that is safe, see [`SingleFlight`]), then fills the cache with a
//!   version-stamped entry that cannot overwrite a newer one (see `platform::cache`). Across processes
//!   each process does its own read: N API processes cost at most N reads per miss, not one per request.
//! - Waiting for a version (read-your-writes, `min_version`): each look is one short read; nothing is
//!   held between looks, and a request whose client hung up stops looking at once.
//! - Redis down or slow: every cache call is bounded (`CACHE_TIMEOUT_MS`) and skipped while the client
//!   is disconnected; the answer comes from PostgreSQL and a warning is logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use platform::read_model::{PRODUCT_COLUMNS, product_from_row};
use uuid::Uuid;

use crate::error::ApiError;
use crate::query::{self, Projected};
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

    /// Drops the entry of `id` (after this process acknowledged a change to it).
    pub fn forget(&self, id: Uuid) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn put(&self, id: Uuid, r: &Representation) {
        if r.deleted_at.is_some() {
            return;
        }
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
    /// When the product was deleted (never cached, so `None` for every cache hit).
    pub deleted_at: Option<chrono::DateTime<chrono::Utc>>,
}

type LoadResult = Result<Projected<Representation>, String>;

/// One database read of a product, shared by the requests that may use its answer.
struct Flight {
    /// The flight clock's reading when the statement was sent; 0 while it has not been.
    sent_at: Arc<AtomicU64>,
    /// The read's answer, for every request that joins it.
    result: Shared<BoxFuture<'static, LoadResult>>,
}

/// What a request may do with the flight it found.
enum Found {
    /// Use this read's answer (`true`: this request started it).
    Join(Shared<BoxFuture<'static, LoadResult>>, bool),
    /// A read that began before this request arrived: its snapshot may be older than something
    /// committed before the request, so wait for it to end, then look again.
    Outdated(Shared<BoxFuture<'static, LoadResult>>),
}

/// In-flight database reads, one per product at most.
///
/// - A read runs in its own task: a request that is dropped (its client hung up) takes nothing with
///   it, and the task forgets its flight when it ends, however it ends (answer, error, panic).
/// - A request joins a read only if the read's statement was sent after the request arrived, so a
///   shared answer is never older than what was committed before the request came: coalescing can
///   never serve a version the request could not have read itself.
#[derive(Default)]
pub struct SingleFlight {
    clock: AtomicU64,
    inflight: Mutex<HashMap<Uuid, Flight>>,
}

impl SingleFlight {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn find_or_start(
        self: &Arc<Self>,
        id: Uuid,
        arrived: u64,
        start: impl FnOnce(Arc<AtomicU64>) -> BoxFuture<'static, LoadResult>,
    ) -> Found {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = inflight.get(&id) {
            let sent_at = flight.sent_at.load(Ordering::SeqCst);
            return if sent_at == 0 || sent_at > arrived {
                Found::Join(flight.result.clone(), false)
            } else {
                Found::Outdated(flight.result.clone())
            };
        }
        let sent_at = Arc::new(AtomicU64::new(0));
        let forget = Forget {
            flights: self.clone(),
            id,
            sent_at: sent_at.clone(),
        };
        let work = start(sent_at.clone());
        let task = tokio::spawn(async move {
            let _forget = forget;
            work.await
        });
        let result = async move {
            task.await
                .unwrap_or_else(|e| Err(format!("product read task failed: {e}")))
        }
        .boxed()
        .shared();
        inflight.insert(
            id,
            Flight {
                sent_at,
                result: result.clone(),
            },
        );
        Found::Join(result, true)
    }
}

/// Removes a flight from the map when its task ends, whichever way it ends.
struct Forget {
    flights: Arc<SingleFlight>,
    id: Uuid,
    sent_at: Arc<AtomicU64>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let mut inflight = self
            .flights
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if inflight
            .get(&self.id)
            .is_some_and(|f| Arc::ptr_eq(&f.sent_at, &self.sent_at))
        {
            inflight.remove(&self.id);
        }
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
                let r = Representation {
                    version,
                    json,
                    deleted_at: None,
                };
                if let Some(local) = &state.local {
                    local.put(id, &r);
                }
                return Ok(Some((r, Source::Hit)));
            }
            Ok(_) => cache_up = true,
            // Skipped calls are not news: the breaker logged when it opened.
            Err(platform::cache::CacheError::CircuitOpen) => {}
            Err(error) => tracing::warn!(%error, "cache unavailable; reading PostgreSQL"),
        }
    }
    let led = std::sync::atomic::AtomicBool::new(false);
    let found = query::wait_projected(
        &state.projection_commits,
        state.read_wait,
        min_version,
        |r: &Representation| r.version,
        || async {
            let (projected, leader) = read_shared(state, id).await?;
            led.store(leader, Ordering::Relaxed);
            Ok(projected)
        },
    )
    .await?;
    let Some(representation) = found else {
        return Ok(None);
    };
    if let Some(local) = &state.local {
        local.put(id, &representation);
    }
    let source = match (cache_up, led.load(Ordering::Relaxed)) {
        (false, _) => Source::Bypass,
        (true, true) => Source::Miss,
        (true, false) => Source::Coalesced,
    };
    Ok(Some((representation, source)))
}

/// One look at the projection, shared with concurrent requests for the same product where that is
/// safe (see [`SingleFlight`]). Returns the look and whether this request started it.
async fn read_shared(
    state: &AppState,
    id: Uuid,
) -> Result<(Projected<Representation>, bool), ApiError> {
    let arrived = state.loads.tick();
    loop {
        let found = state.loads.find_or_start(id, arrived, |sent_at| {
            let state = state.clone();
            async move {
                let read = load(&state, id, &sent_at);
                tokio::time::timeout(state.db_timeout, read)
                    .await
                    .map_err(|_| "postgres did not answer in time".to_owned())?
                    .map_err(|e| e.to_string())
            }
            .boxed()
        });
        match found {
            Found::Join(result, leader) => {
                return result
                    .await
                    .map(|p| (p, leader))
                    .map_err(ApiError::Unavailable);
            }
            Found::Outdated(result) => {
                let _ = result.await;
            }
        }
    }
}

/// The database read, and the cache fill. Marks `sent_at` just before the statement goes out.
async fn load(
    state: &AppState,
    id: Uuid,
    sent_at: &AtomicU64,
) -> Result<Projected<Representation>, ApiError> {
    let projected = query::projected(
        &state.read_pool,
        "products",
        PRODUCT_COLUMNS,
        id,
        product_from_row,
        || sent_at.store(state.loads.tick(), Ordering::SeqCst),
    )
    .await?;
    let Some(product) = projected.value else {
        return Ok(Projected {
            value: None,
            accepted: projected.accepted,
        });
    };
    let representation = Representation {
        version: product.version,
        json: Bytes::from(serde_json::to_vec(&product).expect("product serialises")),
        deleted_at: product.deleted_at,
    };
    if let (Some(cache), None) = (&state.cache, product.deleted_at) {
        if let Err(error) = cache
            .fill(id, representation.version, &representation.json)
            .await
        {
            tracing::warn!(%error, "cannot fill the cache");
        }
    }
    Ok(Projected {
        value: Some(representation),
        accepted: projected.accepted,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn answer(version: u64) -> LoadResult {
        Ok(Projected {
            value: Some(Representation {
                version,
                json: Bytes::from_static(b"{}"),
                deleted_at: None,
            }),
            accepted: 0,
        })
    }

    #[tokio::test]
    async fn callers_arriving_before_the_statement_share_one_read() {
        let flights = Arc::new(SingleFlight::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let arrivals: Vec<u64> = (0..50).map(|_| flights.tick()).collect();
        let callers = arrivals.into_iter().map(|arrived| {
            let found = flights.find_or_start(Uuid::nil(), arrived, |sent_at| {
                let loads = loads.clone();
                let flights = flights.clone();
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    sent_at.store(flights.tick(), Ordering::SeqCst);
                    loads.fetch_add(1, Ordering::SeqCst);
                    answer(7)
                }
                .boxed()
            });
            let Found::Join(result, leader) = found else {
                panic!("nothing was sent yet: every caller may join");
            };
            async move { (result.await.unwrap().value.unwrap().version, leader) }
        });
        let all = futures::future::join_all(callers);
        release.send(true).unwrap();
        let results = all.await;
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, leader)| *leader).count(), 1);
        assert!(results.iter().all(|(v, _)| *v == 7));
        tokio::task::yield_now().await;
        assert!(
            flights.inflight.lock().unwrap().is_empty(),
            "ended reads are forgotten"
        );
    }

    #[tokio::test]
    async fn a_caller_arriving_after_the_statement_was_sent_does_not_share_it() {
        let flights = Arc::new(SingleFlight::default());
        let (release, released) = tokio::sync::watch::channel(false);
        let first = flights.tick();
        let Found::Join(old, true) = flights.find_or_start(Uuid::nil(), first, |sent_at| {
            let flights = flights.clone();
            let mut released = released.clone();
            async move {
                sent_at.store(flights.tick(), Ordering::SeqCst);
                let _ = released.wait_for(|r| *r).await;
                answer(1)
            }
            .boxed()
        }) else {
            panic!("the first caller starts the read");
        };
        // Let the task send its statement, then a new caller arrives (after something committed).
        while flights.inflight.lock().unwrap()[&Uuid::nil()]
            .sent_at
            .load(Ordering::SeqCst)
            == 0
        {
            tokio::task::yield_now().await;
        }
        let late = flights.tick();
        let found = flights.find_or_start(Uuid::nil(), late, |_| async { answer(2) }.boxed());
        assert!(
            matches!(found, Found::Outdated(_)),
            "must not share an older snapshot"
        );
        release.send(true).unwrap();
        assert_eq!(old.await.unwrap().value.unwrap().version, 1);
    }

    #[tokio::test]
    async fn an_abandoned_read_is_forgotten_when_it_ends() {
        let flights = Arc::new(SingleFlight::default());
        let arrived = flights.tick();
        let found = flights.find_or_start(Uuid::nil(), arrived, |_| async { answer(3) }.boxed());
        // The caller hangs up without awaiting the answer.
        drop(found);
        for _ in 0..100 {
            if flights.inflight.lock().unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the flight of an abandoned read stayed in the map");
    }
}
