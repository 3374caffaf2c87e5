//! Rebuilding the projection from offset 0 of the event topics (the log is the source of truth).
//!
//! Side by side (the default): a fresh schema is migrated and filled by replaying every partition from
//! the beginning with the projector's own batch code, while the live projection keeps serving and the
//! live projector keeps consuming. Once the rebuild has reached the live projector's stored offsets, the
//! switch happens in one short transaction that locks the live tables (readers wait a few milliseconds,
//! never see a missing or half-built product), checks again that the rebuild is not behind, moves the
//! live tables out and the rebuilt ones in (a rename: nothing is copied, so the wait does not grow with
//! the catalog) and keeps the newer offsets. The cache entries of products whose rows changed are
//! invalidated, and the retired tables are dropped.
//!
//! In place (development): the live projection tables are emptied and refilled directly; stop the
//! projector first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use platform::config::{DbConfig, KafkaConfig};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Offset, TopicPartitionList};

use crate::position::Positions;
use crate::projection::stored_positions;

/// Tables of the projection (the API's command log is not rebuilt: it is not derived from the log).
const PROJECTION_TABLES: [&str; 5] = [
    "users",
    "products",
    "product_events",
    "projection_parked_events",
    "projection_rejected",
];

/// Consumer name the rebuild stores its offsets under, in the side schema.
const REBUILD_CONSUMER: &str = "replay";

/// What can go wrong in a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Pool or migration failure.
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    /// No connection could be had.
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Kafka settings (topics, brokers).
    pub kafka: KafkaConfig,
    /// The live database and schema.
    pub db: DbConfig,
    /// The live projector's consumer group (its offsets are the live position).
    pub live_group: String,
    /// Events per transaction.
    pub batch_size: usize,
    /// Rebuild beside the live tables and switch (false: empty and refill the live tables).
    pub side_by_side: bool,
    /// Side by side only: switch reads to the rebuild when it has caught up.
    pub switch: bool,
    /// Print progress to standard error.
    pub progress: bool,
    /// The cache whose entries of changed products are invalidated at the switch.
    pub cache: Option<platform::cache::CacheConfig>,
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Events read from the log.
    pub events: u64,
    /// The schema the rebuild was written to.
    pub schema: String,
    /// Whether reads were switched to the rebuild.
    pub switched: bool,
    /// Products whose row differed between the live projection and the rebuild (their cache entries
    /// were invalidated at the switch).
    pub changed_products: Vec<(uuid::Uuid, u64)>,
    /// How long the switch held the live tables (the longest a reader waited for it).
    pub switch_held: Option<Duration>,
}

fn side_schema(live: &str) -> String {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
    let base: String = live.chars().take(40).collect();
    format!("{base}_rebuild_{stamp}")
}

async fn positions(pool: &Pool, schema: &str, consumer: &str) -> Result<Positions, ReplayError> {
    let client = pool.get().await?;
    Ok(stored_positions(&client, Some(schema), consumer).await?)
}

/// Whether `rebuilt` has reached `live` on every partition live has consumed.
fn caught_up(rebuilt: &Positions, live: &Positions) -> bool {
    live.iter()
        .all(|(tp, next)| rebuilt.get(tp).is_some_and(|r| r >= next))
}

fn lag(rebuilt: &Positions, live: &Positions) -> i64 {
    live.iter()
        .map(|(tp, next)| (next - rebuilt.get(tp).copied().unwrap_or(0)).max(0))
        .sum()
}

/// A consumer assigned every partition of the event topics from the beginning (no group offsets).
fn from_beginning(
    kafka: &KafkaConfig,
) -> Result<StreamConsumer<platform::kafka::WatchedContext>, ReplayError> {
    let group = format!("catalog-replay-{}", uuid::Uuid::new_v4().simple());
    let consumer = platform::kafka::consumer(kafka, &group, "catalog-replay")?;
    let mut tpl = TopicPartitionList::new();
    for topic in kafka.topics().all() {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Replays the whole log; see the module docs.
pub async fn replay(options: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let live_pool = platform::db::pool(&options.db)?;
    let live_schema = options.db.schema.clone();
    // Where the live projection had got to: an in-place rebuild is complete once it is back there.
    let live_before = positions(&live_pool, &live_schema, &options.live_group).await?;
    let (target, consumer_name) = if options.side_by_side {
        let mut target = options.db.clone();
        target.schema = side_schema(&live_schema);
        platform::db::migrate(&target).await?;
        (target, REBUILD_CONSUMER.to_owned())
    } else {
        let client = live_pool.get().await?;
        client
            .batch_execute(&format!(
                "TRUNCATE {}; DELETE FROM projection_offsets WHERE consumer = '{}'",
                PROJECTION_TABLES.join(", "),
                options.live_group.replace('\'', "''")
            ))
            .await?;
        (options.db.clone(), options.live_group.clone())
    };
    let target_pool = platform::db::pool(&target)?;
    let retired = format!("{}_retired", target.schema);
    let consumer = from_beginning(&options.kafka)?;
    let mut report = ReplayReport {
        schema: target.schema.clone(),
        ..ReplayReport::default()
    };
    let started = Instant::now();
    let mut progress = options
        .progress
        .then(|| platform::progress::Progress::new("replay", "events"));
    let mut rebuilt: Positions = HashMap::new();
    let idle = Duration::from_millis(500);
    loop {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        while batch.len() < options.batch_size {
            match tokio::time::timeout(idle, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(e)) => tracing::warn!(error = %e, "kafka consume error during replay"),
                Err(_) => break,
            }
        }
        let idle_now = batch.len() < options.batch_size;
        if !batch.is_empty() {
            let mut client = target_pool.get().await?;
            let tx = client.transaction().await?;
            let (_, positions) =
                crate::projection::apply_batch(&tx, &consumer_name, &batch).await?;
            tx.commit().await?;
            report.events += batch.len() as u64;
            rebuilt = positions;
        }
        let live = positions(&live_pool, &live_schema, &options.live_group).await?;
        if let Some(progress) = &mut progress {
            // Done: events replayed; to go: how far the rebuild is behind the live projection (in
            // place: behind where the projection was when the replay began).
            let target = if options.side_by_side {
                &live
            } else {
                &live_before
            };
            let behind = u64::try_from(lag(&rebuilt, target)).unwrap_or(0);
            progress.update(report.events, report.events + behind);
        }
        if !idle_now {
            continue;
        }
        if !options.side_by_side {
            // The log's end has no reliable marker on every broker: stop when idle, back where the
            // live projection was, and not before the consumer had time to start fetching.
            if caught_up(&rebuilt, &live_before)
                && (report.events > 0 || started.elapsed() > Duration::from_secs(5))
            {
                break;
            }
            continue;
        }
        if !caught_up(&rebuilt, &live) {
            continue;
        }
        if !options.switch {
            break;
        }
        if let Some(switched) = switch(
            &live_pool,
            &live_schema,
            &target.schema,
            &retired,
            &options.live_group,
        )
        .await?
        {
            report.switched = true;
            report.switch_held = Some(switched.held);
            break;
        }
    }
    if let Some(progress) = progress {
        progress.finish(&format!("{} events replayed", report.events));
    }
    platform::kafka::close(consumer, std::time::Duration::from_secs(10)).await;
    if report.switched {
        report.changed_products = changed_products(&live_pool, &live_schema, &retired).await?;
        invalidate(options, &report.changed_products).await;
        let client = live_pool.get().await?;
        client
            .batch_execute(&format!(
                "DROP SCHEMA {} CASCADE; DROP SCHEMA {retired} CASCADE",
                target.schema
            ))
            .await?;
    }
    Ok(report)
}

/// Drops the cache entries of the products whose rows the switch changed (their floor moves to the
/// rebuilt version, so nothing older can be filled back).
async fn invalidate(options: &ReplayOptions, changed: &[(uuid::Uuid, u64)]) {
    let Some(config) = &options.cache else { return };
    let cache = match platform::cache::ProductCache::connect(config) {
        Ok(Some(cache)) => cache,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "cannot reach the cache; changed entries expire with their TTL");
            return;
        }
    };
    cache.wait_connected(Duration::from_secs(2)).await;
    for (id, version) in changed {
        if let Err(error) = cache.invalidate(*id, *version).await {
            tracing::warn!(%error, product.id = %id, "cannot invalidate; the entry expires with its TTL");
        }
    }
}

/// What the switch did.
struct Switched {
    /// Longest time the switch held the live tables locked (readers waited at most this long).
    held: Duration,
}

/// Puts the rebuilt tables in place of the live ones in one short transaction, unless the live
/// projector has moved past the rebuild meanwhile (then `None`: replay on and try again).
///
/// Nothing is copied: each live table moves to a retiring schema and its rebuilt twin moves into the
/// live schema (catalog updates only), so the lock is held for milliseconds whatever the size of the
/// catalog. Readers that queued on the old table resolve its name again once they get the lock (as
/// PostgreSQL does for every statement, prepared ones included) and read the rebuilt one. The offsets
/// table stays (other consumers keep rows there); the live group's offsets move to the rebuild's.
async fn switch(
    pool: &Pool,
    live: &str,
    rebuild: &str,
    retired: &str,
    live_group: &str,
) -> Result<Option<Switched>, ReplayError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("CREATE SCHEMA {retired}"))
        .await?;
    let started = Instant::now();
    // Readers of these tables wait here for the commit; the live projector's next batch too.
    tx.batch_execute(&format!(
        "LOCK TABLE {} , {live}.projection_offsets IN ACCESS EXCLUSIVE MODE",
        PROJECTION_TABLES
            .iter()
            .map(|t| format!("{live}.{t}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await?;
    let live_now = stored_positions(&tx, Some(live), live_group).await?;
    let rebuilt = stored_positions(&tx, Some(rebuild), REBUILD_CONSUMER).await?;
    if !caught_up(&rebuilt, &live_now) {
        tx.rollback().await?;
        return Ok(None);
    }
    let mut sql = String::new();
    for table in PROJECTION_TABLES {
        sql.push_str(&format!(
            "ALTER TABLE {live}.{table} SET SCHEMA {retired};
             ALTER TABLE {rebuild}.{table} SET SCHEMA {live};"
        ));
    }
    tx.batch_execute(&sql).await?;
    for ((topic, partition), next) in rebuilt {
        tx.execute(
            &format!(
                "INSERT INTO {live}.projection_offsets (consumer, topic, partition, next_offset)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (consumer, topic, partition) DO UPDATE
                    SET next_offset = GREATEST(projection_offsets.next_offset, EXCLUDED.next_offset)"
            ),
            &[&live_group, &topic, &partition, &next],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Some(Switched {
        held: started.elapsed(),
    }))
}

/// Products whose row in `live` (just switched in) differs from the retired one: their cache entries
/// must go. Computed after the switch, without any lock held; a product the live projector changed
/// since shows up too, which only costs one more invalidation.
async fn changed_products(
    pool: &Pool,
    live: &str,
    retired: &str,
) -> Result<Vec<(uuid::Uuid, u64)>, ReplayError> {
    let client = pool.get().await?;
    Ok(client
        .query(
            &format!(
                "SELECT n.id, n.version FROM {live}.products n
                  WHERE NOT EXISTS (SELECT 1 FROM {retired}.products o WHERE o = n)"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, uuid::Uuid>(0),
                u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            )
        })
        .collect())
}

/// Differences between the projection tables of two schemas (empty when identical row for row).
pub async fn compare(pool: &Pool, left: &str, right: &str) -> Result<Vec<String>, ReplayError> {
    let client = pool.get().await?;
    let mut differences = Vec::new();
    for table in ["users", "products", "product_events"] {
        for (a, b) in [(left, right), (right, left)] {
            let n: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM (SELECT * FROM {a}.{table} EXCEPT SELECT * FROM {b}.{table}) d"),
                    &[],
                )
                .await?
                .get(0);
            if n > 0 {
                differences.push(format!("{n} row(s) of {a}.{table} are not in {b}.{table}"));
            }
        }
    }
    Ok(differences)
}
