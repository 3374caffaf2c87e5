//! An example of a downstream service built on the catalog's public event contract (docs/EVENTS.md):
//! it keeps, per user, how many products they have created.
//!
//! It shows the safe way to consume: its own consumer group, `earliest` start (the topics keep
//! everything), effects idempotent per event (a product is counted once however often its
//! `ProductCreated` is delivered, because the count changes only when the product's row is new, and
//! goes down once per `ProductDeleted` the same way), the
//! Kafka offset committed only after the database transaction, unknown event types ignored.

use std::future::Future;

use events::{AnyEnvelope, ProductEvent};
use platform::config::{DbConfig, KafkaConfig, LogConfig};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "catalog-user-stats",
    about = "Per-user product counts from catalog events"
)]
pub struct Config {
    /// Consumer group of this service.
    #[arg(
        long,
        env = "USER_STATS_GROUP_ID",
        default_value = "catalog-user-stats"
    )]
    pub group_id: String,
    /// Address of the metrics listener (`GET /metrics`, Prometheus text format); empty: none.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9103")]
    pub metrics_addr: String,
    /// PostgreSQL settings (the tables are created in DB_SCHEMA on start-up).
    #[command(flatten)]
    pub db: DbConfig,
    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Log settings.
    #[command(flatten)]
    pub log: LogConfig,
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL.
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    /// PostgreSQL query.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Kafka.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// No connection.
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS user_stats_products (
    product_id uuid PRIMARY KEY,
    user_id    uuid NOT NULL
);
ALTER TABLE user_stats_products ADD COLUMN IF NOT EXISTS deleted boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS user_product_counts (
    user_id  uuid PRIMARY KEY,
    products bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS user_stats_rejected (
    topic     text    NOT NULL,
    partition integer NOT NULL,
    \"offset\"  bigint  NOT NULL,
    reason    text    NOT NULL,
    PRIMARY KEY (topic, partition, \"offset\")
);";

/// Consumes until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let _metrics = platform::metrics::serve(&config.metrics_addr).await;
    let pool = platform::db::pool(&config.db)?;
    pool.get().await?.batch_execute(SCHEMA).await?;
    tokio::pin!(shutdown);
    loop {
        let consumer =
            platform::kafka::consumer(&config.kafka, &config.group_id, "catalog-user-stats")?;
        consumer.subscribe(&[&config.kafka.topics().products])?;
        let exit = consume(&config, &pool, &consumer, &mut shutdown).await;
        platform::kafka::close(consumer, std::time::Duration::from_secs(10)).await;
        if exit? {
            return Ok(());
        }
    }
}

/// Consumes until shutdown (`Ok(true)`) or until the consumer's group membership has been unsettled
/// for `KAFKA_REJOIN_AFTER_MS` (`Ok(false)`: the caller joins again with a new consumer).
async fn consume(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    consumer: &rdkafka::consumer::StreamConsumer<platform::kafka::WatchedContext>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<bool, Error> {
    let mut watch = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let message = tokio::select! {
            () = &mut *shutdown => return Ok(true),
            _ = watch.tick() => {
                if consumer.context().health.stuck(config.kafka.rejoin_after()) {
                    return Ok(false);
                }
                continue;
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    consumer.context().started(&m);
                    m.detach()
                }
                Err(error) => {
                    tracing::warn!(%error, "kafka consume error");
                    continue;
                }
            },
        };
        // Only ProductCreated and ProductDeleted matter here; read the header before parsing anything.
        let is_counted = message
            .headers()
            .and_then(|h| {
                use rdkafka::message::Headers;
                h.iter()
                    .find(|h| h.key == events::header_names::TYPE)
                    .and_then(|h| h.value)
            })
            .is_none_or(|t| t == b"ProductCreated" || t == b"ProductDeleted");
        let decoded = message.payload().map(AnyEnvelope::from_json);
        if let (true, Some(Err(error))) = (is_counted, &decoded) {
            // A message this service should count and cannot read is kept with the reason, never
            // skipped in silence (a type this build does not know is simply not ours).
            if !matches!(error, events::DecodeError::UnknownEventType { .. }) {
                tracing::error!(%error, kafka.offset = message.offset(), "unreadable event kept in user_stats_rejected");
                pool.get()
                    .await?
                    .execute(
                        "INSERT INTO user_stats_rejected (topic, partition, \"offset\", reason)
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[
                            &message.topic(),
                            &message.partition(),
                            &message.offset(),
                            &error.to_string(),
                        ],
                    )
                    .await?;
            }
        }
        if is_counted {
            if let Some(Ok(AnyEnvelope::Product(e))) = decoded {
                if let ProductEvent::Deleted(_) = &e.event {
                    // Counted down once however often the deletion is delivered: only the first
                    // delivery finds the product not yet marked deleted.
                    let mut client = pool.get().await?;
                    let tx = client.transaction().await?;
                    let owner = tx
                        .query_opt(
                            "UPDATE user_stats_products SET deleted = true
                              WHERE product_id = $1 AND NOT deleted RETURNING user_id",
                            &[&e.aggregate_id],
                        )
                        .await?;
                    if let Some(owner) = owner {
                        tx.execute(
                            "UPDATE user_product_counts SET products = products - 1 WHERE user_id = $1",
                            &[&owner.get::<_, uuid::Uuid>(0)],
                        )
                        .await?;
                    }
                    tx.commit().await?;
                }
                if let ProductEvent::Created(created) = &e.event {
                    let mut client = pool.get().await?;
                    let tx = client.transaction().await?;
                    let new = tx
                        .execute(
                            "INSERT INTO user_stats_products (product_id, user_id) VALUES ($1, $2)
                             ON CONFLICT DO NOTHING",
                            &[&e.aggregate_id, &created.user_id],
                        )
                        .await?;
                    if new == 1 {
                        tx.execute(
                            "INSERT INTO user_product_counts (user_id, products) VALUES ($1, 1)
                             ON CONFLICT (user_id) DO UPDATE SET products = user_product_counts.products + 1",
                            &[&created.user_id],
                        )
                        .await?;
                    }
                    tx.commit().await?;
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )?;
        consumer.commit(&tpl, CommitMode::Async)?;
    }
}
