//! The job consumer and the retry consumer, and what both do with a job.
//!
//! At least once, made idempotent: a job's outputs (stored objects, dead letters, the next retry, the
//! `ImagesProcessed` event) are produced and acknowledged before the input offset is committed. A crash
//! in between re-runs the job: the objects are content-addressed (`PutMode::Create`), and the event store
//! accepts one `ImagesProcessed` per request (its `causation_id`), so nothing changes downstream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use events::{
    Envelope, ImageOutcome, ImageOutcomeStatus, ImageRef, ImageVariant, ImagesProcessed,
    ProductEvent,
};
use futures::future::join_all;
use platform::config::KafkaConfig;
use platform::kafka::{AssignmentChange, WatchedContext};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::{Message, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::config::PipelineTopics;
use crate::fetch::Fetcher;
use crate::job::{DeadLetter, Failure, Job};
use crate::process::{self, DEFAULT_VARIANTS, DecodeLimits};
use crate::storage::ImageStore;

/// `ce_source` of the events this service produces.
pub const EVENT_SOURCE: &str = "/catalog/image-worker";

/// Header names on retry and dead-letter messages.
pub mod headers {
    /// Topic the job came from originally.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    /// Partition it came from originally.
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    /// Offset it came from originally.
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";
    /// Attempts made so far.
    pub const ATTEMPT: &str = "x-attempt";
    /// When the first failure happened (RFC 3339).
    pub const FIRST_FAILURE_AT: &str = "x-first-failure-at";
    /// Failure class of the last failure.
    pub const ERROR_CLASS: &str = "x-error-class";
    /// Failure message of the last failure.
    pub const ERROR_MESSAGE: &str = "x-error-message";
    /// When a retry message is due (milliseconds since the Unix epoch).
    pub const DUE_AT: &str = "x-due-at";
}

/// What a job needs from the process.
#[derive(Clone)]
pub struct Context {
    /// Downloads.
    pub fetcher: Fetcher,
    /// Stores variants.
    pub store: ImageStore,
    /// Produces results, retries and dead letters (replaced after a fatal error).
    pub producer: platform::kafka::EventProducer,
    /// Topic names.
    pub topics: Arc<PipelineTopics>,
    /// Delay before each retry.
    pub retry_delays: Arc<Vec<Duration>>,
    /// Decoding limits.
    pub limits: DecodeLimits,
    /// Bounds the CPU-bound work running at once.
    pub cpu: Arc<Semaphore>,
    /// Bounds the memory that downloads and decoding hold at once.
    pub memory: crate::memory::MemoryBudget,
    /// The event store results are appended through.
    pub pool: deadpool_postgres::Pool,
    /// Event topic names (results are published to the products topic from the store).
    pub event_topics: Arc<platform::config::Topics>,
}

/// Where a job's first message was.
#[derive(Debug, Clone)]
struct Origin {
    topic: String,
    partition: i32,
    offset: i64,
}

/// Why a job could not be finished now (its input is then not committed and is consumed again).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Producing an output failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Appending the result to the event store (or publishing it) failed.
    #[error("event store: {0}")]
    Store(#[from] platform::event_store::StoreError),
    /// Recording a dead letter in the index failed.
    #[error("dead-letter index: {0}")]
    Index(String),
}

/// Processes one image: fetch, then (unless every variant is already stored) decode and encode, then
/// store. Returns its outcome, or a failure.
async fn process_image(ctx: &Context, image: &ImageRef) -> Result<ImageOutcome, Failure> {
    let started = Instant::now();
    let mut download = ctx.memory.download().await;
    let source = ctx.fetcher.fetch(&image.url).await?;
    metrics::counter!("image_download_bytes_total").increment(source.len() as u64);
    download.shrink_to(source.len());
    let downloaded = Instant::now();
    let hash = hex(&Sha256::digest(&source));
    let keys: Vec<String> = DEFAULT_VARIANTS
        .iter()
        .map(|s| ctx.store.key(&hash, s))
        .collect();
    // The store is asked about every variant at once (one round trip's wait, not four). Every call
    // runs to its end (join, not try_join): one refused call must not cancel a sibling that is the
    // store breaker's probe, or the breaker would never learn that the store is back.
    let sizes = join_all(keys.iter().map(|key| ctx.store.size(key)))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let checked = Instant::now();
    let limits = ctx.limits;
    let span = tracing::Span::current();
    // Header only: completeness, every frame within the limits, the memory decoding will take.
    let source = Arc::new(source);
    let plan = {
        let (source, span) = (source.clone(), span.clone());
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            process::plan(&source, limits, &DEFAULT_VARIANTS)
        })
        .await
        .map_err(blocking_failure)??
    };
    let mut got_cpu = checked;
    let mut rendered = checked;
    let (variants, placeholder) = if sizes.iter().all(Option::is_some) {
        // Already stored (same source bytes, same settings): only the sizes are needed, and the
        // placeholder, from the stored thumbnail (a few KiB).
        let (w, h) = plan.display_size();
        let variants = DEFAULT_VARIANTS
            .iter()
            .zip(keys.iter().zip(sizes))
            .map(|(spec, (key, size))| {
                let (width, height) = process::fit(w, h, spec.max_side);
                variant(
                    ctx,
                    image.position,
                    spec,
                    key,
                    width,
                    height,
                    size.unwrap_or_default(),
                )
            })
            .collect();
        let thumb = ctx.store.read(&keys[process::placeholder_source()]).await?;
        let placeholder = tokio::task::spawn_blocking(move || process::placeholder(&thumb))
            .await
            .map_err(blocking_failure)?;
        (variants, placeholder)
    } else {
        // Memory first, then a CPU slot: a job waiting for either holds nothing the other waits for.
        let Some(memory) = ctx.memory.decoding(plan.peak_bytes).await else {
            return Err(Failure::permanent(
                "too_many_pixels",
                format!(
                    "decoding it needs about {} MiB, more than this worker's {} MiB for decoding \
                     (IMAGE_MEMORY_LIMIT_MB)",
                    plan.peak_bytes.div_ceil(1 << 20),
                    ctx.memory.decode_mib()
                ),
            ));
        };
        let permit = ctx
            .cpu
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        got_cpu = Instant::now();
        let (encoded, placeholder) = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let _held = (permit, memory);
            let encoded = process::render_planned(&source, limits, &plan, &DEFAULT_VARIANTS)?;
            let placeholder = process::placeholder(&encoded[process::placeholder_source()].bytes);
            Ok::<_, Failure>((encoded, placeholder))
        })
        .await
        .map_err(blocking_failure)??;
        rendered = Instant::now();
        let variants: Vec<ImageVariant> = encoded
            .iter()
            .zip(&keys)
            .map(|(e, key)| {
                variant(
                    ctx,
                    image.position,
                    &e.spec,
                    key,
                    e.width,
                    e.height,
                    e.bytes.len() as u64,
                )
            })
            .collect();
        // The variants are stored concurrently (each call to its end, as above).
        join_all(
            encoded
                .into_iter()
                .zip(&keys)
                .map(|(e, key)| ctx.store.put_if_absent(key, e.bytes)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        (variants, placeholder)
    };
    drop(download);
    let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
    let stored = Instant::now();
    tracing::info!(
        hop.download_ms = ms(started, downloaded),
        hop.store_check_ms = ms(downloaded, checked),
        hop.cpu_wait_ms = ms(checked, got_cpu),
        hop.render_ms = ms(got_cpu, rendered),
        hop.store_ms = ms(rendered, stored),
        "image processed"
    );
    Ok(ImageOutcome {
        position: image.position,
        url: image.url.clone(),
        status: ImageOutcomeStatus::Ready,
        variants,
        error_class: None,
        reason: None,
        placeholder,
    })
}

/// A CPU task that did not finish: a panic in a decoder or encoder is the input's doing and will happen
/// again (permanent); a cancelled task (shutdown) is not.
fn blocking_failure(error: tokio::task::JoinError) -> Failure {
    if error.is_panic() {
        tracing::error!(%error, "image processing panicked");
        Failure::permanent(
            "unprocessable",
            "the image could not be processed (a decoder or encoder failed on it)",
        )
    } else {
        Failure::retryable("worker", error.to_string())
    }
}

fn variant(
    ctx: &Context,
    position: u32,
    spec: &process::VariantSpec,
    key: &str,
    width: u32,
    height: u32,
    bytes: u64,
) -> ImageVariant {
    ImageVariant {
        position,
        variant: spec.name.to_owned(),
        format: spec.format.name().to_owned(),
        url: ctx.store.url(key),
        key: key.to_owned(),
        width,
        height,
        bytes,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one attempt of `job`: processes what is pending, then sends the job on (retry topic), parks
/// what failed for good (dead-letter topic) and, once every image has an outcome, appends
/// `ImagesProcessed`. Returns when all of that is acknowledged.
async fn run_job(ctx: &Context, mut job: Job, origin: &Origin) -> Result<(), JobError> {
    let started = Instant::now();
    let pending = job.pending();
    let results = join_all(pending.iter().map(|image| {
        let span =
            tracing::info_span!("image", image.position = image.position, image.url = %image.url);
        process_image(ctx, image).instrument(span)
    }))
    .await;
    job.attempt += 1;
    let now = Utc::now();
    let mut dead = Vec::new();
    let mut retry = Vec::new();
    for (image, result) in pending.iter().zip(results) {
        record_outcome(&result);
        match result {
            Ok(outcome) => job.done.push(outcome),
            Err(failure) if failure.retryable => {
                tracing::warn!(image.position = image.position, error.class = %failure.class, error = %failure.message, "image failed; will retry");
                retry.push((image.clone(), failure));
            }
            Err(failure) => {
                tracing::warn!(image.position = image.position, error.class = %failure.class, error = %failure.message, "image failed for good");
                job.fail(image, &failure);
                dead.push((image.clone(), failure));
            }
        }
    }
    if !retry.is_empty() {
        job.first_failure_at.get_or_insert(now);
    }
    let attempts_allowed = ctx.retry_delays.len() as u32 + 1;
    let mut sends = Vec::new();
    if !retry.is_empty() && job.attempt < attempts_allowed {
        job.last_failures = retry.iter().map(|(i, f)| (i.position, f.clone())).collect();
        let delay = ctx.retry_delays[(job.attempt - 1) as usize];
        let due = now + chrono::Duration::from_std(delay).unwrap_or_default();
        let (class, message) = (retry[0].1.class.clone(), retry[0].1.message.clone());
        let headers = failure_headers(origin, &job, &class, &message).insert(Header {
            key: headers::DUE_AT,
            value: Some(due.timestamp_millis().to_string().as_bytes()),
        });
        let topic = ctx.topics.retries[(job.attempt - 1) as usize].clone();
        tracing::info!(retry.topic = %topic, retry.delay_ms = delay.as_millis() as u64, "job sent to retry");
        sends.push((
            topic,
            serde_json::to_vec(&job).expect("job serialises"),
            headers,
        ));
    } else {
        for (image, failure) in retry {
            let gave_up = Failure::permanent(
                &failure.class,
                format!(
                    "gave up after {} attempts: {}",
                    job.attempt, failure.message
                ),
            );
            job.fail(&image, &gave_up);
            dead.push((image, gave_up));
        }
    }
    // The dead letters, by their index in `sends`, to be indexed once acknowledged.
    let mut letters = Vec::new();
    for (image, failure) in &dead {
        let letter = DeadLetter {
            product_id: job.product_id,
            request_sequence: job.request_sequence,
            image: image.clone(),
            failure: failure.clone(),
            attempts: job.attempt,
            first_failure_at: job.first_failure_at.unwrap_or(now),
        };
        let headers = failure_headers(origin, &job, &failure.class, &failure.message);
        let pairs = failure_header_pairs(origin, &job, &failure.class, &failure.message)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<Vec<_>>();
        sends.push((
            ctx.topics.dead_letters.clone(),
            serde_json::to_vec(&letter).expect("dead letter serialises"),
            headers,
        ));
        letters.push((sends.len() - 1, letter, pairs));
    }
    let key = job.product_id.to_string();
    let acks = join_all(sends.iter().map(|(topic, payload, headers)| {
        ctx.producer.send(
            topic,
            &key,
            payload,
            headers.clone(),
            Duration::from_secs(10),
        )
    }))
    .await;
    let mut positions = Vec::with_capacity(acks.len());
    for ack in acks {
        positions.push(ack?);
    }
    // Dead letters go into the index `catalogctl dlq` reads, before the input is committed: a crash
    // in between runs the job again (a second letter, indexed too), never leaves one unlisted.
    if !letters.is_empty() {
        let client = ctx
            .pool
            .get()
            .await
            .map_err(|e| JobError::Store(e.into()))?;
        for (at, letter, headers) in letters {
            let (partition, offset) = positions[at];
            let record = crate::dlq::DeadLetterRecord {
                letter,
                partition,
                offset,
                headers,
            };
            crate::dlq::index(&client, &record)
                .await
                .map_err(|e| JobError::Index(e.to_string()))?;
            metrics::counter!("image_dead_letters_total", "error_class" => record.letter.failure.class.clone())
                .increment(1);
        }
    }
    let processed = Instant::now();
    metrics::histogram!("image_job_duration_seconds").record((processed - started).as_secs_f64());
    if job.pending().is_empty() {
        append_result(ctx, &job).await?;
        tracing::info!(
            hop.images_ms = (processed - started).as_secs_f64() * 1000.0,
            hop.result_ms = processed.elapsed().as_secs_f64() * 1000.0,
            "job answered"
        );
    }
    Ok(())
}

/// Counts one image's outcome in this attempt: `ready`, `retry` (a retryable failure) or `failed`
/// (permanent), with the failure's `error_class`.
fn record_outcome(result: &Result<ImageOutcome, Failure>) {
    let (outcome, class) = match result {
        Ok(_) => ("ready", String::new()),
        Err(f) if f.retryable => ("retry", f.class.clone()),
        Err(f) => ("failed", f.class.clone()),
    };
    metrics::counter!("image_results_total", "outcome" => outcome, "error_class" => class)
        .increment(1);
}

/// The failure headers of a retry or dead-letter message, as (name, value).
fn failure_header_pairs(
    origin: &Origin,
    job: &Job,
    class: &str,
    message: &str,
) -> [(&'static str, String); 7] {
    let first = job.first_failure_at.unwrap_or_else(Utc::now).to_rfc3339();
    [
        (headers::ORIGINAL_TOPIC, origin.topic.clone()),
        (headers::ORIGINAL_PARTITION, origin.partition.to_string()),
        (headers::ORIGINAL_OFFSET, origin.offset.to_string()),
        (headers::ATTEMPT, job.attempt.to_string()),
        (headers::FIRST_FAILURE_AT, first),
        (headers::ERROR_CLASS, class.to_owned()),
        (headers::ERROR_MESSAGE, message.to_owned()),
    ]
}

fn failure_headers(origin: &Origin, job: &Job, class: &str, message: &str) -> OwnedHeaders {
    let values = failure_header_pairs(origin, job, class, message);
    values.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

/// Appends the job's `ImagesProcessed` through the event store, at the product stream's next free
/// sequence, then publishes the stream. A job that already answered its request (run twice after a
/// crash) appends nothing and only makes sure the answer is published; a job for a product deleted
/// meanwhile appends nothing (a deletion ends the stream).
async fn append_result(ctx: &Context, job: &Job) -> Result<(), JobError> {
    use platform::event_store::{self, NewEvent, StoreError};
    let mut images = job.done.clone();
    images.sort_by_key(|i| i.position);
    let request_event_id = events::event_id_for(job.product_id, job.request_sequence);
    let mut client = ctx
        .pool
        .get()
        .await
        .map_err(|e| JobError::Store(e.into()))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| JobError::Store(e.into()))?;
    let Some((version, mut product)) =
        event_store::lock_head::<events::ProductState>(&tx, job.product_id).await?
    else {
        tracing::error!(product.id = %job.product_id, "no stream head for the product; result dropped");
        return Ok(());
    };
    if product.deleted_at.is_some() {
        tracing::info!(product.id = %job.product_id, "product deleted meanwhile; result dropped");
        return Ok(());
    }
    let envelope = Envelope::new(
        job.product_id,
        version + 1,
        Utc::now(),
        Some(job.correlation_id.clone()),
        ProductEvent::ImagesProcessed(ImagesProcessed {
            request_sequence: job.request_sequence,
            request_event_id: Some(request_event_id),
            images,
        }),
    )
    .with_actor("system:image-worker");
    if let Err(error) = product.apply(&envelope) {
        return Err(StoreError::Corrupt(error.to_string()).into());
    }
    let event = NewEvent {
        wire: envelope.to_wire(),
        causation_id: Some(request_event_id),
    };
    match event_store::append(
        &tx,
        job.product_id,
        version,
        &[event],
        &product,
        EVENT_SOURCE,
    )
    .await
    {
        Ok(_) => {
            tx.commit().await.map_err(|e| JobError::Store(e.into()))?;
            tracing::info!(event.sequence = version + 1, "ImagesProcessed appended");
        }
        Err(StoreError::AlreadyAnswered(_)) => {
            drop(tx);
            tracing::info!("this request was already answered; publishing what is pending");
        }
        Err(error) => return Err(error.into()),
    }
    drop(client);
    event_store::publish_stream(&ctx.pool, &ctx.producer, &ctx.event_topics, job.product_id)
        .await?;
    Ok(())
}

fn header_text(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// What a consumed message is to this worker.
enum Read {
    /// A job: an `ImagesRequested` from the products topic, or a job on a retry topic.
    Job(Box<Job>, Origin),
    /// Another event type: not this worker's business.
    NotOurs,
    /// A message this worker should read and cannot: kept in `pipeline_rejected` with the reason.
    Unreadable(String),
}

/// Reads a job from a consumed message.
fn job_from(message: &OwnedMessage, topics: &PipelineTopics) -> Read {
    let Some(payload) = message.payload() else {
        return Read::Unreadable("the message has no payload".into());
    };
    if message.topic() == topics.products {
        if header_text(message, events::header_names::TYPE).is_some_and(|t| t != "ImagesRequested")
        {
            return Read::NotOurs;
        }
        let envelope = match Envelope::<ProductEvent>::from_json(payload) {
            Ok(e) => e,
            // A type this build does not know is for other readers; anything else could be a job.
            Err(events::DecodeError::UnknownEventType { .. }) => return Read::NotOurs,
            Err(error) => return Read::Unreadable(error.to_string()),
        };
        let ProductEvent::ImagesRequested(request) = &envelope.event else {
            return Read::NotOurs;
        };
        let job = Job {
            product_id: envelope.aggregate_id,
            request_sequence: envelope.sequence,
            correlation_id: envelope.event_id.to_string(),
            images: request.images.clone(),
            done: Vec::new(),
            attempt: 0,
            first_failure_at: None,
            last_failures: Vec::new(),
        };
        let origin = Origin {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        Read::Job(Box::new(job), origin)
    } else {
        let job: Job = match serde_json::from_slice(payload) {
            Ok(job) => job,
            Err(error) => return Read::Unreadable(format!("not an image job: {error}")),
        };
        let origin = Origin {
            topic: header_text(message, headers::ORIGINAL_TOPIC)
                .unwrap_or_else(|| message.topic().to_owned()),
            partition: header_text(message, headers::ORIGINAL_PARTITION)
                .and_then(|p| p.parse().ok())
                .unwrap_or(-1),
            offset: header_text(message, headers::ORIGINAL_OFFSET)
                .and_then(|o| o.parse().ok())
                .unwrap_or(-1),
        };
        Read::Job(Box::new(job), origin)
    }
}

/// Keeps an unreadable message in `pipeline_rejected` (idempotent by position).
async fn reject(ctx: &Context, message: &OwnedMessage, reason: &str) -> Result<(), JobError> {
    let client = ctx
        .pool
        .get()
        .await
        .map_err(|e| JobError::Store(e.into()))?;
    client
        .execute(
            "INSERT INTO pipeline_rejected (topic, partition, \"offset\", key, payload, reason)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                &message.topic(),
                &message.partition(),
                &message.offset(),
                &message.key(),
                &message.payload(),
                &reason,
            ],
        )
        .await
        .map_err(|e| JobError::Store(e.into()))?;
    tracing::error!(
        kafka.topic = message.topic(),
        kafka.partition = message.partition(),
        kafka.offset = message.offset(),
        reason,
        "message the worker cannot read; kept in pipeline_rejected"
    );
    Ok(())
}

/// Handles one consumed message until its outputs are acknowledged (retrying the job on producer
/// errors), then commits it. Returns `false` if shutdown came first (nothing committed).
/// A group consumer of the worker.
type GroupConsumer = StreamConsumer<WatchedContext>;

async fn handle(
    ctx: &Context,
    consumer: &GroupConsumer,
    message: &OwnedMessage,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let span = tracing::info_span!(
        "image_worker.job",
        kafka.topic = message.topic(),
        kafka.partition = message.partition(),
        kafka.offset = message.offset(),
        event.aggregate_id = tracing::field::Empty,
        job.attempt = tracing::field::Empty,
    );
    let mut backoff = Duration::from_millis(200);
    match job_from(message, &ctx.topics) {
        Read::NotOurs => {}
        Read::Unreadable(reason) => {
            // Kept before the offset moves on: nothing is dropped silently.
            while let Err(error) = reject(ctx, message, &reason).await {
                tracing::error!(parent: &span, %error, "cannot keep an unreadable message; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return false,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        Read::Job(job, origin) => {
            span.record(
                "event.aggregate_id",
                tracing::field::display(job.product_id),
            );
            // From the producer's timestamp of the request to this worker holding it.
            if let Some(produced) = message.timestamp().to_millis() {
                let lag = chrono::Utc::now().timestamp_millis() - produced;
                tracing::info!(parent: &span, hop.delivery_ms = lag, "job received");
            }
            span.record("job.attempt", job.attempt + 1);
            loop {
                match run_job(ctx, (*job).clone(), &origin)
                    .instrument(span.clone())
                    .await
                {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::error!(parent: &span, %error, "cannot finish job; retrying it");
                        tokio::select! {
                            _ = shutdown.changed() => return false,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }
    commit(consumer, message);
    true
}

fn commit(consumer: &GroupConsumer, message: &OwnedMessage) {
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )
        .is_ok()
    {
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(%error, "offset commit failed; the job may run again");
        }
    }
}

/// Which group a consume loop joins, and what it reads.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Consumer group.
    pub group: String,
    /// `client.id` of its consumers.
    pub client_id: &'static str,
    /// Topics to read.
    pub topics: Vec<String>,
}

/// Why a consume loop returned.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    /// Shutdown was asked for.
    Shutdown,
    /// The consumer's group membership stayed unsettled too long: replace it.
    Rejoin,
}

/// Runs `consume` on consumer instances of `sub` until shutdown, replacing an instance whose group
/// membership is stuck (see `platform::kafka::GroupHealth`) by a new one.
async fn supervise<F>(
    sub: &Subscription,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    mut consume: F,
) where
    F: for<'a> FnMut(
        &'a GroupConsumer,
        &'a mut tokio::sync::watch::Receiver<bool>,
    ) -> futures::future::BoxFuture<'a, Exit>,
{
    loop {
        let consumer = match platform::kafka::consumer(&sub.kafka, &sub.group, sub.client_id) {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, group = %sub.group, "cannot create a consumer; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let topics: Vec<&str> = sub.topics.iter().map(String::as_str).collect();
        if let Err(error) = consumer.subscribe(&topics) {
            tracing::error!(%error, "cannot subscribe; retrying");
        }
        let exit = consume(&consumer, shutdown).await;
        platform::kafka::close(consumer, Duration::from_secs(10)).await;
        if exit == Exit::Shutdown {
            return;
        }
    }
}

/// Whether `consumer`'s membership has been unsettled longer than allowed (logged when so).
fn stuck(consumer: &GroupConsumer, kafka: &KafkaConfig) -> bool {
    consumer.context().health.stuck(kafka.rejoin_after())
}

/// Consumes `ImagesRequested` from the products topic until shutdown.
pub async fn run_jobs(
    ctx: Context,
    sub: Subscription,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let kafka = sub.kafka.clone();
    supervise(&sub, &mut shutdown, |consumer, shutdown| {
        let ctx = ctx.clone();
        let kafka = kafka.clone();
        Box::pin(async move {
            let (ctx, kafka) = (&ctx, &kafka);
            let mut watch = tokio::time::interval(Duration::from_secs(1));
            loop {
                let message = tokio::select! {
                    _ = shutdown.changed() => return Exit::Shutdown,
                    _ = watch.tick() => {
                        if stuck(consumer, kafka) {
                            return Exit::Rejoin;
                        }
                        continue;
                    }
                    received = consumer.recv() => match received {
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
                if !handle(ctx, consumer, &message, shutdown).await {
                    return Exit::Shutdown;
                }
            }
        })
    })
    .await;
}

fn due_at(message: &OwnedMessage) -> chrono::DateTime<Utc> {
    header_text(message, headers::DUE_AT)
        .and_then(|ms| ms.parse::<i64>().ok())
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now)
}

/// Consumes the retry topics until shutdown. A message that is not due yet is held with the rest of
/// its partition, which is paused until then, so other partitions go on and polling never stops
/// (no `max.poll.interval.ms` breach). Held messages follow the assignment: those of a revoked
/// partition are dropped unhandled and uncommitted (its new owner reads them again from the committed
/// offset), and a newly assigned partition is resumed, since a pause outlives a revocation.
pub async fn run_retries(
    ctx: Context,
    sub: Subscription,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let kafka = sub.kafka.clone();
    supervise(&sub, &mut shutdown, |consumer, shutdown| {
        let ctx = ctx.clone();
        let kafka = kafka.clone();
        Box::pin(async move { retry_loop(&ctx, consumer, &kafka, shutdown).await })
    })
    .await;
}

async fn retry_loop(
    ctx: &Context,
    consumer: &GroupConsumer,
    kafka: &KafkaConfig,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Exit {
    let mut held: HashMap<(String, i32), VecDeque<OwnedMessage>> = HashMap::new();
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    loop {
        follow_assignment(consumer, &mut held);
        let next_due = held.values().filter_map(|q| q.front()).map(due_at).min();
        let wait = next_due.map_or(Duration::from_secs(3600), |due| {
            (due - Utc::now()).to_std().unwrap_or_default()
        });
        tokio::select! {
            _ = shutdown.changed() => return Exit::Shutdown,
            _ = watch.tick() => {
                if stuck(consumer, kafka) {
                    return Exit::Rejoin;
                }
            }
            received = consumer.recv() => {
                let message = match received {
                    Ok(m) => {
                        consumer.context().started(&m);
                        m.detach()
                    }
                    Err(error) => {
                        tracing::warn!(%error, "kafka consume error");
                        continue;
                    }
                };
                let tp = (message.topic().to_owned(), message.partition());
                let waiting = held.get(&tp).is_some_and(|q| !q.is_empty());
                if waiting || due_at(&message) > Utc::now() {
                    if !waiting {
                        set_paused(consumer, &tp, true);
                    }
                    held.entry(tp).or_default().push_back(message);
                } else if !handle(ctx, consumer, &message, shutdown).await {
                    return Exit::Shutdown;
                }
            }
            () = tokio::time::sleep(wait), if next_due.is_some() => {
                let now = Utc::now();
                let mut emptied = Vec::new();
                for (tp, queue) in &mut held {
                    while queue.front().is_some_and(|m| due_at(m) <= now) {
                        let message = queue.pop_front().expect("front exists");
                        if !handle(ctx, consumer, &message, shutdown).await {
                            return Exit::Shutdown;
                        }
                    }
                    if queue.is_empty() {
                        emptied.push(tp.clone());
                    }
                }
                for tp in emptied {
                    held.remove(&tp);
                    set_paused(consumer, &tp, false);
                }
            }
        }
    }
}

/// Applies the assignment changes since the last look to the held messages; see [`run_retries`].
fn follow_assignment(
    consumer: &GroupConsumer,
    held: &mut HashMap<(String, i32), VecDeque<OwnedMessage>>,
) {
    for change in consumer.context().take_changes() {
        match change {
            AssignmentChange::Revoked(partitions) => {
                for tp in partitions {
                    if let Some(queue) = held.remove(&tp) {
                        tracing::info!(kafka.topic = %tp.0, kafka.partition = tp.1, dropped = queue.len(), "partition revoked; its held retries are left to the new owner");
                    }
                    set_paused(consumer, &tp, false);
                }
            }
            AssignmentChange::Assigned(partitions) => {
                for tp in partitions {
                    if !held.contains_key(&tp) {
                        set_paused(consumer, &tp, false);
                    }
                }
            }
        }
    }
}

fn set_paused(consumer: &GroupConsumer, (topic, partition): &(String, i32), paused: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, *partition);
    let result = if paused {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(error) = result {
        tracing::warn!(%error, kafka.topic = %topic, kafka.partition = partition, paused, "cannot change pause state");
    }
}
