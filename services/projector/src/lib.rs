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

/// Drops the cache entries of the products a committed batch changed, so the next read is fresh.
///
/// Runs after the commit, never before: a reader that misses then reads the new rows. If Redis is
/// away, each invalidation is retried briefly and then given up with an error log; the entry's TTL
/// (`CACHE_TTL_SECS`) bounds how long it can be stale, and its version floor is raised at the next
/// change of that product.
async fn invalidate(cache: &platform::cache::ProductCache, changed: &[(uuid::Uuid, u64)]) {
    for &(id, version) in changed {
        let mut delay = Duration::from_millis(20);
        for attempt in 1..=3 {
            match cache.invalidate(id, version).await {
                Ok(()) => break,
                // Redis is known to be away: don't spend retries on it; entries expire by TTL, and
                // the floor is raised at the product's next change.
                Err(platform::cache::CacheError::CircuitOpen) => break,
                Err(error) if attempt == 3 => {
                    tracing::error!(%error, product.id = %id, version, "cannot invalidate cache entry; it expires with its TTL");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
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
    let pool = platform::db::pool(&config.db)?;
    platform::db::ping(&pool).await?;
    if config.kafka.create_topics {
        platform::kafka::ensure_topics(&config.kafka).await?;
    }
    let cache = platform::cache::ProductCache::connect(&config.cache)
        .map_err(|e| ProjectorError::Cache(e.to_string()))?;
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
            cache.as_ref(),
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
    cache: Option<&platform::cache::ProductCache>,
    consumer: &StreamConsumer<PositionContext>,
    context: &PositionContext,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Exit {
    let mut watch = tokio::time::interval(Duration::from_secs(1));
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
        // Retry the database until it works or we are told to stop: skipping would lose events, and
        // not committing means the batch is simply consumed again after a restart.
        let mut backoff = Duration::from_millis(100);
        loop {
            match apply(pool, &config.group_id, &batch).await {
                Ok((report, positions)) => {
                    context.advance(&positions);
                    tracing::info!(
                        batch.size = batch.len(),
                        batch.applied = report.applied,
                        batch.duplicates = report.duplicates,
                        batch.parked = report.parked,
                        batch.rejected = report.rejected,
                        "batch projected"
                    );
                    commit(consumer, &batch);
                    if let Some(cache) = cache {
                        invalidate(cache, &report.changed_products).await;
                    }
                    break;
                }
                Err(error) => {
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

async fn load_positions(
    pool: &deadpool_postgres::Pool,
    consumer: &str,
) -> Result<Positions, platform::db::DbError> {
    let client = pool.get().await?;
    Ok(projection::stored_positions(&**client, None, consumer).await?)
}

/// Commits the group offsets after the batch (asynchronously: PostgreSQL holds the real position).
fn commit(consumer: &StreamConsumer<PositionContext>, batch: &[OwnedMessage]) {
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
