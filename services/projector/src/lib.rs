//! The projector: consumes the event topics and maintains the PostgreSQL read model.
//!
//! One process per instance, all in one consumer group, so partitions (and so products) are spread
//! over instances. Each batch of events is applied in one transaction together with the consumed
//! offsets; the Kafka group offset is committed only after that, as a hint for where to resume.

mod config;
pub mod position;
pub mod projection;
pub mod replay;

use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};

use crate::position::{PositionContext, Positions};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

pub use crate::config::Config;
pub use crate::projection::BatchReport;

/// Why the projector could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// PostgreSQL setup failed.
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    /// Kafka client setup or subscription failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The cache settings are invalid (REDIS_URL).
    #[error("cache (REDIS_URL): {0}")]
    Cache(String),
}

/// Drops the cache entries of the products committed batches changed, off the projection's path.
///
/// Runs after the commit, never before: a reader that misses then reads the new rows. The projection
/// loop only hands the changed products over; a background task sends them to Redis in one script
/// call per batch. While Redis is away or hanging, changes are coalesced per product (newest version)
/// and kept until Redis takes them, so the projection never waits on Redis and no invalidation is
/// given up; only a projector that dies meanwhile loses its pending set, and those entries then live
/// at most `CACHE_TTL_SECS`.
pub struct Invalidator {
    pending: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, u64>>,
    wake: tokio::sync::Notify,
}

impl Invalidator {
    /// Starts the background task for `cache`.
    pub fn spawn(cache: platform::cache::ProductCache) -> std::sync::Arc<Self> {
        let invalidator = std::sync::Arc::new(Self {
            pending: std::sync::Mutex::default(),
            wake: tokio::sync::Notify::new(),
        });
        tokio::spawn(invalidator.clone().drain_forever(cache));
        invalidator
    }

    /// Queues the invalidation of `changed` (product, projected version).
    pub fn submit(&self, changed: &[(uuid::Uuid, u64)]) {
        if changed.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for &(id, version) in changed {
            let slot = pending.entry(id).or_insert(version);
            *slot = (*slot).max(version);
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Invalidations not yet accepted by Redis.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take(&self) -> Vec<(uuid::Uuid, u64)> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }

    async fn drain_forever(self: std::sync::Arc<Self>, cache: platform::cache::ProductCache) {
        let mut backoff = Duration::from_millis(50);
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let batch = self.take();
            if batch.is_empty() {
                self.wake.notified().await;
                continue;
            }
            match cache.invalidate_projected(&batch).await {
                Ok(()) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            products = batch.len(),
                            outage_ms = since.elapsed().as_millis() as u64,
                            "cache reachable again; pending invalidations applied"
                        );
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(error) => {
                    // Put them back (a newer version queued meanwhile wins) and try again later.
                    self.submit(&batch);
                    if failing_since.is_none() {
                        failing_since = Some(std::time::Instant::now());
                        tracing::warn!(%error, pending = self.pending(), "cannot invalidate cache entries; keeping them until Redis answers");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Waits (at most `within`) until every queued invalidation reached Redis; for shutdown.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Projects events until `shutdown` completes; then finishes the batch in hand, commits and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProjectorError> {
    if config.run_migrations {
        platform::db::ensure_database(&config.db).await?;
        platform::db::migrate(&config.db).await?;
    }
    let _metrics = platform::metrics::serve(&config.metrics_addr).await;
    let pool = platform::db::pool(&config.db)?;
    platform::db::ping(&pool).await?;
    if config.kafka.create_topics {
        platform::kafka::ensure_topics(&config.kafka).await?;
    }
    let cache = platform::cache::ProductCache::connect(&config.cache)
        .map_err(|e| ProjectorError::Cache(e.to_string()))?
        .map(Invalidator::spawn);
    let context = PositionContext::default();
    context.advance(&load_positions(&pool, &config.group_id).await?);
    let topics = config.kafka.topics();
    tokio::pin!(shutdown);
    loop {
        let instance = context.for_new_consumer();
        let consumer = platform::kafka::consumer_with_context(
            &config.kafka,
            &config.group_id,
            "catalog-projector",
            instance.clone(),
        )?;
        consumer.subscribe(&topics.all())?;
        tracing::info!(group = %config.group_id, topics = ?topics.all(), "projector consuming");
        let exit = project(
            &config,
            &pool,
            cache.as_deref(),
            &consumer,
            &instance,
            &mut shutdown,
        )
        .await;
        platform::kafka::close(consumer, Duration::from_secs(10)).await;
        if let Exit::Shutdown = exit {
            break;
        }
    }
    if let Some(cache) = &cache {
        if !cache.flush(Duration::from_secs(2)).await {
            tracing::warn!(
                pending = cache.pending(),
                "stopping with cache invalidations Redis did not take; those entries expire with their TTL"
            );
        }
    }
    tracing::info!("projector stopped");
    Ok(())
}

/// Why a consume loop returned.
enum Exit {
    /// Shutdown was asked for.
    Shutdown,
    /// The consumer's group membership stayed unsettled too long: replace it.
    Rejoin,
}

/// Projects batches from `consumer` until shutdown, or until its membership is stuck.
async fn project(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    cache: Option<&Invalidator>,
    consumer: &StreamConsumer<PositionContext>,
    context: &PositionContext,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Exit {
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut rate = Rate::new(Duration::from_secs(5));
    loop {
        let first = tokio::select! {
            () = &mut *shutdown => return Exit::Shutdown,
            received = consumer.recv() => received,
            _ = watch.tick() => {
                if context.health.stuck(config.kafka.rejoin_after()) {
                    return Exit::Rejoin;
                }
                continue;
            }
        };
        let first = match first {
            Ok(m) => m.detach(),
            Err(error) => {
                tracing::warn!(%error, "kafka consume error");
                continue;
            }
        };
        let batch = fill_batch(consumer, first, config.batch_size, config.batch_wait()).await;
        // From the producer's timestamp of the oldest event in the batch to the batch in hand.
        let delivery_ms = batch
            .iter()
            .filter_map(|m| m.timestamp().to_millis())
            .min()
            .map_or(0, |t| chrono::Utc::now().timestamp_millis() - t);
        let lanes = into_lanes(batch, config.parallelism);
        let size: usize = lanes.iter().map(Vec::len).sum();
        // Retry the database until it works or we are told to stop: skipping would lose events, and
        // not committing means the batch is simply consumed again after a restart. Parts of the batch
        // already committed (see `apply_isolating`) are skipped by their stored offsets.
        let mut backoff = Duration::from_millis(100);
        let started = std::time::Instant::now();
        loop {
            let results = futures::future::join_all(lanes.iter().map(|lane| async {
                let mut report = BatchReport::default();
                let result = apply_isolating(pool, &config.group_id, lane, &mut report).await;
                (report, result)
            }))
            .await;
            let mut report = BatchReport::default();
            let mut failure = None;
            for (done, result) in results {
                report.merge(done);
                match result {
                    Ok(positions) => context.advance(&positions),
                    Err(error) => failure = Some(error),
                }
            }
            // What committed is committed, even when another lane failed: drop its cache entries now.
            if let Some(cache) = cache {
                cache.submit(&report.changed_products);
            }
            let Some(error) = failure else {
                tracing::debug!(
                    batch.size = size,
                    batch.applied = report.applied,
                    batch.duplicates = report.duplicates,
                    batch.parked = report.parked,
                    batch.rejected = report.rejected,
                    hop.delivery_ms = delivery_ms,
                    hop.apply_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "batch projected"
                );
                rate.record(&report, size);
                record_batch(&report, started.elapsed());
                commit(consumer, lanes.iter().flatten());
                break;
            };
            tracing::error!(%error, retry_in_ms = backoff.as_millis() as u64, "cannot project batch; retrying");
            tokio::select! {
                () = &mut *shutdown => {
                    tracing::info!("stopping with an unprojected batch; it will be consumed again");
                    return Exit::Shutdown;
                }
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// The metrics of one committed batch: events by what became of them, and how long the batch took.
fn record_batch(report: &BatchReport, took: Duration) {
    for (result, n) in [
        ("applied", report.applied),
        ("duplicate", report.duplicates),
        ("parked", report.parked),
        ("rejected", report.rejected),
    ] {
        if n > 0 {
            metrics::counter!("projector_events_total", "result" => result).increment(n as u64);
        }
    }
    metrics::histogram!("projector_batch_duration_seconds").record(took.as_secs_f64());
}

/// Splits a batch into `lanes` by partition, keeping each partition's order: lanes never share a
/// partition, so never a stream, so they can be applied concurrently.
fn into_lanes(batch: Vec<OwnedMessage>, lanes: usize) -> Vec<Vec<OwnedMessage>> {
    let n = lanes.max(1);
    let mut out: Vec<Vec<OwnedMessage>> = (0..n).map(|_| Vec::new()).collect();
    for message in batch {
        // By partition number alone: the topics' partitions spread evenly over the lanes (a user
        // partition may share a lane with a product partition; they write different tables).
        let lane = usize::try_from(message.partition()).unwrap_or(0) % n;
        out[lane].push(message);
    }
    out.retain(|lane| !lane.is_empty());
    out
}

/// Applied-event counts between two progress log lines.
struct Rate {
    since: std::time::Instant,
    messages: u64,
    applied: u64,
    rejected: u64,
    every: Duration,
}

impl Rate {
    fn new(every: Duration) -> Self {
        Self {
            since: std::time::Instant::now(),
            messages: 0,
            applied: 0,
            rejected: 0,
            every,
        }
    }

    /// Counts a batch; logs the rate every `every` while work arrives (an idle projector is quiet).
    fn record(&mut self, report: &BatchReport, messages: usize) {
        self.messages += messages as u64;
        self.applied += report.applied as u64;
        self.rejected += report.rejected as u64;
        let elapsed = self.since.elapsed();
        if elapsed >= self.every {
            let secs = elapsed.as_secs_f64();
            tracing::info!(
                messages = self.messages,
                applied = self.applied,
                rejected = self.rejected,
                messages_per_sec = (self.messages as f64 / secs).round() as u64,
                "projection rate"
            );
            *self = Self::new(self.every);
        }
    }
}

async fn fill_batch(
    consumer: &StreamConsumer<PositionContext>,
    first: OwnedMessage,
    max: usize,
    wait: Duration,
) -> Vec<OwnedMessage> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(message.detach()),
            Ok(Err(error)) => tracing::warn!(%error, "kafka consume error"),
            Err(_) => break,
        }
    }
    batch
}

/// Which errors `apply` can meet.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

impl ApplyError {
    /// Whether the database refused the data of the batch (a value out of range, a constraint), as
    /// opposed to failing or being unreachable: retrying the same events cannot help then.
    fn is_refusal(&self) -> bool {
        let Self::Postgres(error) = self else {
            return false;
        };
        error.code().is_some_and(|code| {
            // 22: data exception, 23: integrity constraint violation, 54: program limit exceeded
            // (a row or index entry too large).
            matches!(&code.code()[..2], "22" | "23" | "54")
        })
    }
}

async fn apply(
    pool: &deadpool_postgres::Pool,
    consumer: &str,
    batch: &[OwnedMessage],
) -> Result<(BatchReport, Positions), ApplyError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let result = projection::apply_batch(&tx, consumer, batch).await?;
    tx.commit().await?;
    Ok(result)
}

/// Applies `batch`; when the database refuses it, finds the refused message by halving (committing
/// the parts that apply, in order) and keeps it in `projection_rejected` with the reason, so one
/// poison event never stops the projection. Counts go to `report`, which survives an error return
/// (the parts committed so far stay committed; a retry skips them by offset).
async fn apply_isolating(
    pool: &deadpool_postgres::Pool,
    consumer: &str,
    batch: &[OwnedMessage],
    report: &mut BatchReport,
) -> Result<Positions, ApplyError> {
    let mut positions = Positions::new();
    let mut todo: Vec<&[OwnedMessage]> = vec![batch];
    while let Some(part) = todo.pop() {
        match apply(pool, consumer, part).await {
            Ok((done, stored)) => {
                report.merge(done);
                for (tp, next) in stored {
                    let slot = positions.entry(tp).or_insert(next);
                    *slot = (*slot).max(next);
                }
            }
            Err(error) if error.is_refusal() && part.len() > 1 => {
                let (first, second) = part.split_at(part.len() / 2);
                todo.push(second);
                todo.push(first);
            }
            Err(error) if error.is_refusal() => {
                let message = &part[0];
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                projection::reject_alone(
                    &tx,
                    consumer,
                    message,
                    &format!("refused by the database: {error}"),
                )
                .await?;
                tx.commit().await?;
                report.rejected += 1;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(positions)
}

async fn load_positions(
    pool: &deadpool_postgres::Pool,
    consumer: &str,
) -> Result<Positions, platform::db::DbError> {
    let client = pool.get().await?;
    Ok(projection::stored_positions(&client, None, consumer).await?)
}

/// Commits the group offsets after the batch (asynchronously: PostgreSQL holds the real position).
fn commit<'a>(
    consumer: &StreamConsumer<PositionContext>,
    batch: impl Iterator<Item = &'a OwnedMessage>,
) {
    let mut tpl = TopicPartitionList::new();
    let mut next: std::collections::HashMap<(&str, i32), i64> = std::collections::HashMap::new();
    for m in batch {
        let entry = next.entry((m.topic(), m.partition())).or_insert(0);
        *entry = (*entry).max(m.offset() + 1);
    }
    for ((topic, partition), offset) in next {
        if let Err(error) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            tracing::warn!(%error, "cannot build commit list");
        }
    }
    if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(%error, "kafka offset commit failed; the stored offsets keep us exact");
    }
}
