//! The image worker: turns `ImagesRequested` into stored, compressed variants and an `ImagesProcessed`.
//!
//! Two consumers run in the process: the job consumer (products topic, group `IMAGE_WORKER_GROUP_ID`)
//! and the retry consumer (retry topics, group `<group>-retry`). Failed images climb the retry ladder
//! (one topic per delay) and end on the dead-letter topic, with the reason in headers; `catalogctl dlq`
//! lists and re-drives them.

pub mod blurhash;
pub mod config;
pub mod dlq;
pub mod fetch;
pub mod job;
pub mod memory;
pub mod process;
pub mod storage;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

pub use crate::config::{Config, PipelineTopics};
use crate::fetch::{AddressPolicy, FetchLimits, Fetcher};
use crate::process::DecodeLimits;
use crate::storage::ImageStore;
use crate::worker::Context;

/// Retention of the retry topics: long enough for the whole ladder and an outage, not forever.
const RETRY_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting is invalid; the message names the variable.
    #[error("{0}")]
    Config(String),
    /// Kafka client setup or topic creation failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The image store could not be set up.
    #[error("image store: {0}")]
    Store(#[from] object_store::Error),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Creates the pipeline's topics (event topics forever, retry topics a week, dead letters forever).
pub async fn ensure_topics(config: &Config) -> Result<PipelineTopics, StartupError> {
    let topics = PipelineTopics::new(&config.kafka, config.retry_delays_ms.len());
    if config.kafka.create_topics {
        platform::kafka::ensure_topics(&config.kafka).await?;
        let mut wanted: Vec<(&str, i64)> = topics
            .retries
            .iter()
            .map(|t| (t.as_str(), RETRY_RETENTION_MS))
            .collect();
        wanted.push((&topics.dead_letters, -1));
        platform::kafka::create_topics(&config.kafka, &wanted).await?;
    }
    Ok(topics)
}

/// Runs both consumers until `shutdown`; each finishes the job in hand (committing it) first.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    if config.retry_delays_ms.is_empty() {
        return Err(StartupError::Config(
            "IMAGE_RETRY_DELAYS_MS: give at least one delay".into(),
        ));
    }
    let _metrics = platform::metrics::serve(&config.metrics_addr).await;
    let topics = ensure_topics(&config).await?;
    let fetcher = Fetcher::new(
        FetchLimits {
            connect_timeout: Duration::from_millis(config.fetch_connect_timeout_ms),
            total_timeout: Duration::from_millis(config.fetch_timeout_ms),
            max_redirects: config.fetch_max_redirects,
            max_bytes: config.fetch_max_bytes,
            origin_breaker_failures: config.origin_breaker_failures,
            origin_breaker_cool_down: Duration::from_millis(config.origin_breaker_cool_down_ms),
        },
        AddressPolicy {
            allow: config.allow_networks().map_err(StartupError::Config)?,
        },
    )?;
    let cpu_workers = if config.cpu_workers == 0 {
        std::thread::available_parallelism().map_or(2, usize::from)
    } else {
        config.cpu_workers
    };
    let ctx = Context {
        fetcher,
        store: ImageStore::new(&config.store)?,
        producer: platform::kafka::EventProducer::new(&config.kafka, "catalog-image-worker")?,
        topics: Arc::new(topics.clone()),
        retry_delays: Arc::new(config.retry_delays()),
        limits: DecodeLimits {
            max_pixels: config.max_pixels,
            ..DecodeLimits::default()
        },
        cpu: Arc::new(Semaphore::new(cpu_workers)),
        memory: memory::MemoryBudget::new(config.memory_limit_mb, config.fetch_max_bytes)
            .map_err(|e| StartupError::Config(e.to_string()))?,
        pool: platform::db::pool(&config.db).map_err(|e| StartupError::Config(e.to_string()))?,
        event_topics: Arc::new(config.kafka.topics()),
    };
    let jobs = worker::Subscription {
        kafka: config.kafka.clone(),
        group: config.group_id.clone(),
        client_id: "catalog-image-worker",
        topics: vec![topics.products.clone()],
    };
    let retries = worker::Subscription {
        kafka: config.kafka.clone(),
        group: format!("{}-retry", config.group_id),
        client_id: "catalog-image-worker-retry",
        topics: topics.retries.clone(),
    };
    tracing::info!(
        group = %config.group_id,
        cpu_workers,
        memory.limit_mb = config.memory_limit_mb,
        memory.decode_mib = ctx.memory.decode_mib(),
        "image worker consuming"
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let depth_task = tokio::spawn(dlq::measure_depth(ctx.pool.clone(), stopped.clone()));
    let job_task = tokio::spawn(worker::run_jobs(ctx.clone(), jobs, stopped.clone()));
    let retry_task = tokio::spawn(worker::run_retries(ctx.clone(), retries, stopped));
    shutdown.await;
    let _ = stop.send(true);
    let _ = job_task.await;
    let _ = retry_task.await;
    let _ = depth_task.await;
    tracing::info!("image worker stopped");
    Ok(())
}
