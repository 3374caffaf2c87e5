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
    /// The event store refused or failed an append.
    #[error("event store: {0}")]
    Store(#[from] platform::event_store::StoreError),
}

/// Records a dead letter (acknowledged at `partition`/`offset` of the dead-letter topic) in the index
/// that `list` reads. Idempotent by position.
pub async fn index(
    client: &impl deadpool_postgres::GenericClient,
    record: &DeadLetterRecord,
) -> Result<(), DlqError> {
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    client
        .execute(
            &client
                .prepare_cached(
                    "INSERT INTO pipeline_dead_letters
                        (partition, \"offset\", product_id, error_class, letter, headers)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                )
                .await?,
            &[
                &record.partition,
                &record.offset,
                &record.letter.product_id,
                &record.letter.failure.class,
                &tokio_postgres::types::Json(&record.letter),
                &tokio_postgres::types::Json(&headers),
            ],
        )
        .await?;
    Ok(())
}

/// The indexed dead letters that `filter` selects, oldest first: an indexed query, however long the
/// dead-letter topic has grown.
pub async fn list(
    pool: &deadpool_postgres::Pool,
    filter: &Filter,
) -> Result<Vec<DeadLetterRecord>, DlqError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT partition, \"offset\", letter, headers FROM pipeline_dead_letters
              WHERE ($1::uuid IS NULL OR product_id = $1)
                AND ($2::text IS NULL OR error_class = $2)
              ORDER BY dead_at, partition, \"offset\"",
            &[&filter.product, &filter.error_class],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let tokio_postgres::types::Json(letter): tokio_postgres::types::Json<DeadLetter> =
                row.get(2);
            let tokio_postgres::types::Json(headers): tokio_postgres::types::Json<
                BTreeMap<String, String>,
            > = row.get(3);
            Ok(DeadLetterRecord {
                letter,
                partition: row.get(0),
                offset: row.get(1),
                headers: headers.into_iter().collect(),
            })
        })
        .collect()
}

/// Adds every entry of the dead-letter topic to the index (for entries parked before it existed).
/// Returns how many entries the topic holds.
pub async fn reindex(
    kafka: &KafkaConfig,
    retry_count: usize,
    idle: Duration,
    pool: &deadpool_postgres::Pool,
) -> Result<usize, DlqError> {
    let records = read_all(kafka, retry_count, idle).await?;
    let client = pool.get().await?;
    for record in &records {
        index(&client, record).await?;
    }
    Ok(records.len())
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
    platform::kafka::close(consumer, std::time::Duration::from_secs(10)).await;
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

/// Re-drives `records`: one new `ImagesRequested` per product for its images that are still failed,
/// appended through the event store like every other write (the product's head is locked and its
/// current state decides), so two re-drives at once, or a re-drive while a job is still climbing the
/// retry ladder, can never take the same sequence: the second finds the images pending and appends
/// nothing.
pub async fn redrive(
    kafka: &KafkaConfig,
    pool: &deadpool_postgres::Pool,
    records: &[DeadLetterRecord],
) -> Result<RedriveReport, DlqError> {
    redrive_with(kafka, pool, records, None).await
}

/// [`redrive`], reporting each product done to `progress` (`catalogctl dlq redrive`).
pub async fn redrive_with(
    kafka: &KafkaConfig,
    pool: &deadpool_postgres::Pool,
    records: &[DeadLetterRecord],
    mut progress: Option<platform::progress::Progress>,
) -> Result<RedriveReport, DlqError> {
    use platform::event_store::{self, NewEvent};
    let producer = platform::kafka::EventProducer::new(kafka, "catalogctl")?;
    let topics = kafka.topics();
    let mut by_product: BTreeMap<Uuid, BTreeMap<String, ImageRef>> = BTreeMap::new();
    for r in records {
        by_product
            .entry(r.letter.product_id)
            .or_default()
            .insert(r.letter.image.url.clone(), r.letter.image.clone());
    }
    let mut report = RedriveReport::default();
    let total = by_product.len() as u64;
    for (done, (product_id, images)) in by_product.into_iter().enumerate() {
        if let Some(progress) = &mut progress {
            progress.update(done as u64, total);
        }
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let head = event_store::lock_head::<events::ProductState>(&tx, product_id).await?;
        let Some((version, mut product)) = head.filter(|(_, p)| p.deleted_at.is_none()) else {
            report.skipped += images.len();
            continue;
        };
        // Still failed, by URL (an edit may have moved the image since it failed).
        let todo: Vec<ImageRef> = product
            .images
            .iter()
            .filter(|s| s.status == ImageStatusKind::Failed && images.contains_key(&s.url))
            .map(|s| ImageRef {
                position: s.position,
                url: s.url.clone(),
            })
            .collect();
        report.skipped += images.len().saturating_sub(todo.len());
        if todo.is_empty() {
            continue;
        }
        let count = todo.len();
        let envelope = Envelope::new(
            product_id,
            version + 1,
            Utc::now(),
            Some(format!("redrive-{}", Uuid::new_v4())),
            ProductEvent::ImagesRequested(ImagesRequested { images: todo }),
        )
        .with_actor("system:redrive");
        product
            .apply(&envelope)
            .map_err(|e| DlqError::Store(event_store::StoreError::Corrupt(e.to_string())))?;
        event_store::append(
            &tx,
            product_id,
            version,
            &[NewEvent::new(envelope.to_wire())],
            &product,
            REDRIVE_SOURCE,
        )
        .await?;
        tx.commit().await?;
        drop(client);
        event_store::publish_stream(pool, &producer, &topics, product_id).await?;
        tracing::info!(product.id = %product_id, event.sequence = version + 1, images = count, "re-driven");
        report.products += 1;
        report.images += count;
    }
    if let Some(mut progress) = progress {
        progress.update(total, total);
        progress.finish(&format!(
            "{} products, {} images re-driven, {} skipped",
            report.products, report.images, report.skipped
        ));
    }
    Ok(report)
}

/// Keeps the `image_dead_letters` gauge (letters in the index, i.e. on the dead-letter topic) current:
/// measured every 15 s until `stop`.
pub async fn measure_depth(
    pool: deadpool_postgres::Pool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match pool.get().await {
            Ok(client) => match client
                .query_one("SELECT count(*) FROM pipeline_dead_letters", &[])
                .await
            {
                #[allow(clippy::cast_precision_loss)]
                Ok(row) => metrics::gauge!("image_dead_letters").set(row.get::<_, i64>(0) as f64),
                Err(error) => tracing::debug!(%error, "cannot count dead letters"),
            },
            Err(error) => tracing::debug!(%error, "cannot count dead letters"),
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(15)) => {}
            _ = stop.changed() => return,
        }
    }
}
