//! Operator side of the dead-letter topic: list what is parked there, and re-drive chosen entries.
//!
//! Re-driving appends a new `ImagesRequested` to the product's stream for the images that are still
//! failed in the projection (so re-driving twice, or re-driving what already succeeded, does nothing).
//! It goes at the product's next sequence, read under a per-product advisory lock; the worker then
//! processes it like any other request.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use events::{Envelope, ImageRef, ImageStatusKind, ImagesRequested, ProductEvent};
use platform::config::KafkaConfig;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::Headers;
use tokio_postgres::types::Json;
use uuid::Uuid;

use crate::config::PipelineTopics;
use crate::job::DeadLetter;

/// `ce_source` of events appended by a re-drive.
pub const REDRIVE_SOURCE: &str = "/catalog/catalogctl";

/// One message of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetterRecord {
    /// The parked image.
    pub letter: DeadLetter,
    /// Partition of the dead-letter message.
    pub partition: i32,
    /// Offset of the dead-letter message.
    pub offset: i64,
    /// Its headers (original topic/partition/offset, attempt, error class and message …).
    pub headers: Vec<(String, String)>,
}

/// Which entries to act on.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this product.
    pub product: Option<Uuid>,
    /// Only this error class.
    pub error_class: Option<String>,
}

impl Filter {
    /// Whether `record` is selected.
    pub fn matches(&self, record: &DeadLetterRecord) -> bool {
        self.product.is_none_or(|p| p == record.letter.product_id)
            && self
                .error_class
                .as_ref()
                .is_none_or(|c| *c == record.letter.failure.class)
    }
}

/// What went wrong in the operator commands.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had.
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Reads every entry of the dead-letter topic (stops once nothing arrives for `idle`).
pub async fn read_all(
    kafka: &KafkaConfig,
    retry_count: usize,
    idle: Duration,
) -> Result<Vec<DeadLetterRecord>, DlqError> {
    let topics = PipelineTopics::new(kafka, retry_count);
    let group = format!("catalogctl-dlq-{}", Uuid::new_v4().simple());
    let consumer = platform::kafka::consumer(kafka, &group, "catalogctl")?;
    consumer.subscribe(&[&topics.dead_letters])?;
    let mut out = Vec::new();
    loop {
        let message = match tokio::time::timeout(idle, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(error)) => return Err(error.into()),
            Ok(Ok(m)) => m.detach(),
        };
        let Some(letter) = message
            .payload()
            .and_then(|p| serde_json::from_slice::<DeadLetter>(p).ok())
        else {
            tracing::warn!(
                kafka.offset = message.offset(),
                "unreadable dead letter skipped"
            );
            continue;
        };
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(DeadLetterRecord {
            letter,
            partition: message.partition(),
            offset: message.offset(),
            headers,
        });
    }
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    Ok(out)
}

/// What a re-drive did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RedriveReport {
    /// Products that got a new `ImagesRequested`.
    pub products: usize,
    /// Images requested again.
    pub images: usize,
    /// Entries not re-driven because their image is no longer failed (or the product is unknown).
    pub skipped: usize,
}

/// Re-drives `records`: one new `ImagesRequested` per product for its still-failed images.
pub async fn redrive(
    kafka: &KafkaConfig,
    pool: &deadpool_postgres::Pool,
    records: &[DeadLetterRecord],
) -> Result<RedriveReport, DlqError> {
    let producer = platform::kafka::EventProducer::new(kafka, "catalogctl")?;
    let topic = kafka.topics().products;
    let mut by_product: BTreeMap<Uuid, BTreeMap<u32, ImageRef>> = BTreeMap::new();
    for r in records {
        by_product
            .entry(r.letter.product_id)
            .or_default()
            .insert(r.letter.image.position, r.letter.image.clone());
    }
    let mut report = RedriveReport::default();
    for (product_id, images) in by_product {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&product_id.to_string()],
        )
        .await?;
        let Some(row) = tx
            .query_opt(
                "SELECT version, images FROM products WHERE id = $1",
                &[&product_id],
            )
            .await?
        else {
            report.skipped += images.len();
            continue;
        };
        let version: i64 = row.get(0);
        let Json(statuses): Json<Vec<events::ImageStatus>> = row.get(1);
        let todo: Vec<ImageRef> = images
            .into_values()
            .filter(|i| {
                let failed = statuses
                    .iter()
                    .any(|s| s.position == i.position && s.status == ImageStatusKind::Failed);
                if !failed {
                    report.skipped += 1;
                }
                failed
            })
            .collect();
        if todo.is_empty() {
            continue;
        }
        let count = todo.len();
        let envelope = Envelope::new(
            product_id,
            u64::try_from(version).unwrap_or(0) + 1,
            Utc::now(),
            Some(format!("redrive-{}", Uuid::new_v4())),
            ProductEvent::ImagesRequested(ImagesRequested { images: todo }),
        );
        let wire = envelope.to_wire();
        let key = product_id.to_string();
        producer
            .send(
                &topic,
                &key,
                &envelope.to_json(),
                platform::kafka::headers(&wire, REDRIVE_SOURCE),
                Duration::from_secs(10),
            )
            .await?;
        tx.commit().await?;
        tracing::info!(product.id = %product_id, event.sequence = wire.sequence, images = count, "re-driven");
        report.products += 1;
        report.images += count;
    }
    Ok(report)
}
