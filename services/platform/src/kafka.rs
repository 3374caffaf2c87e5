//! Kafka clients, configured the one way every catalog service uses them.
//!
//! Only the Kafka protocol through rdkafka is used here, so the services run against Apache Kafka in
//! production and any compatible broker in development and tests.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{DefaultConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

fn base(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id)
        .set("socket.keepalive.enable", "true");
    c
}

/// A producer for events: idempotent, `acks=all`, so an acknowledged event is durable and a retry
/// inside the client never duplicates or reorders messages of a partition.
///
/// Services send through [`EventProducer`], which replaces this instance after a fatal error.
pub fn producer(cfg: &KafkaConfig, client_id: &str) -> Result<FutureProducer, KafkaError> {
    producer_config(cfg, client_id).create()
}

fn producer_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = base(cfg, client_id);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "10000")
        .set("compression.type", "lz4")
        .set(
            "batch.num.messages",
            cfg.producer_batch_messages.to_string(),
        );
    c
}

/// Hands each delivery report to the sender waiting for it.
pub struct DeliveryContext;

/// Where a delivery report goes.
type Report = tokio::sync::oneshot::Sender<Result<(i32, i64), KafkaError>>;

impl rdkafka::client::ClientContext for DeliveryContext {}

impl rdkafka::producer::ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Report>;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, report: Box<Report>) {
        use rdkafka::Message;
        let outcome = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        let _ = report.send(outcome);
    }
}

/// An event producer with a polling thread of its own that waits for delivery reports in 1 s windows.
///
/// rust-rdkafka's `FutureProducer` polls in 100 ms windows and rounds the time left down to whole
/// milliseconds, so its thread spins through the last fraction of a millisecond of every window: about
/// half a percent of a core per idle producer (docs/BENCHMARKS.md). Reports are handed over as soon as
/// they arrive either way; the window only sets how often an idle thread wakes up.
pub struct PolledProducer {
    producer: std::sync::Arc<rdkafka::producer::BaseProducer<DeliveryContext>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PolledProducer {
    fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let producer: rdkafka::producer::BaseProducer<DeliveryContext> =
            config.create_with_context(DeliveryContext)?;
        let producer = std::sync::Arc::new(producer);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (polled, stopped) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("event producer poll".into())
            .spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    polled.poll(Duration::from_secs(1));
                }
            })
            .map_err(|_| KafkaError::ClientCreation("cannot start the polling thread".into()))?;
        Ok(Self { producer, stop })
    }

    /// The underlying client (metadata, fatal errors).
    pub fn client(&self) -> &rdkafka::client::Client<DeliveryContext> {
        use rdkafka::producer::Producer;
        self.producer.client()
    }

    /// Queues one record (waiting up to `queue_timeout` while the local queue is full) and waits for
    /// its delivery report: (partition, offset).
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        queue_timeout: Duration,
    ) -> Result<(i32, i64), KafkaError> {
        let deadline = tokio::time::Instant::now() + queue_timeout;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut report = Box::new(tx);
        loop {
            let record = rdkafka::producer::BaseRecord::with_opaque_to(topic, report)
                .key(key)
                .payload(payload)
                .headers(headers.clone());
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record))
                    if tokio::time::Instant::now() < deadline =>
                {
                    report = record.delivery_opaque;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
        rx.await.unwrap_or(Err(KafkaError::Canceled))
    }

    /// Waits (blocking) until everything queued is acknowledged or `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        let _ = self.producer.flush(timeout);
    }
}

impl Drop for PolledProducer {
    fn drop(&mut self) {
        // The thread sees this within one window and lets go of its handle.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The event producer every service sends through: an idempotent producer ([`producer`]) that is
/// replaced by a new instance when librdkafka reports a fatal error.
///
/// After a fatal error (fenced by the broker, out-of-order sequence, unknown producer id, …) an
/// idempotent librdkafka producer never sends again; only a new instance, with a new producer id, can.
/// Replacing it is safe because nothing acknowledged is lost: every caller keeps what it sends until
/// the acknowledgement (the API's outbox row, the worker's uncommitted input offset) and re-sends it
/// with the same event id, which consumers recognise. What was in flight in the old instance fails
/// with the fatal error and is re-sent once by [`EventProducer::send`] through the new one.
#[derive(Clone)]
pub struct EventProducer {
    inner: std::sync::Arc<ProducerSlot>,
}

struct ProducerSlot {
    cfg: KafkaConfig,
    client_id: String,
    /// The current instance and its generation (bumped by each replacement).
    current: std::sync::RwLock<(u64, std::sync::Arc<PolledProducer>)>,
    /// Generation + 1 of an instance that had a send refused for good without librdkafka declaring a
    /// fatal error (0: none).
    failed: std::sync::atomic::AtomicU64,
    /// Reads the log for [`EventProducer::events_in_log`]; made when first needed, one scan at a time.
    log: tokio::sync::Mutex<Option<LogCheck>>,
}

/// Whether a send error means this producer instance can never send again. librdkafka raises a
/// fatal error for most of these, but a broker may answer `ProducerFenced` to an idempotent producer
/// on a path where librdkafka only fails the message, and every later message then fails the same way.
fn ends_instance(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::Fatal
                | Code::Fenced
                | Code::ProducerFenced
                | Code::InvalidProducerEpoch
                | Code::OutOfOrderSequenceNumber
                | Code::UnknownProducerId
                | Code::InvalidProducerIdMapping
        )
    )
}

impl EventProducer {
    /// A producer for `client_id` with the settings of [`producer`].
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Self, KafkaError> {
        Ok(Self {
            inner: std::sync::Arc::new(ProducerSlot {
                cfg: cfg.clone(),
                client_id: client_id.to_owned(),
                current: std::sync::RwLock::new((
                    0,
                    std::sync::Arc::new(PolledProducer::new(&producer_config(cfg, client_id))?),
                )),
                failed: std::sync::atomic::AtomicU64::new(0),
                log: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The ids of the events in `topics` appended at or after `since`, read to each partition's end
    /// as it is now. For publishers about to send again what an earlier attempt may have delivered
    /// (its writer died before marking it, or gave up while a stalled broker still held it): what is
    /// there is not sent twice.
    pub async fn events_in_log(
        &self,
        topics: &[&str],
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<std::collections::HashSet<uuid::Uuid>, KafkaError> {
        let mut log = self.inner.log.lock().await;
        if log.is_none() {
            *log = Some(LogCheck::new(&self.inner.cfg, &self.inner.client_id)?);
        }
        let started = std::time::Instant::now();
        let found = log
            .as_ref()
            .expect("just made")
            .event_ids_since(topics, since)
            .await;
        if found.is_err() {
            // A reader that failed (broker away) is not reused: the next scan starts fresh.
            *log = None;
        }
        tracing::info!(
            since = %since,
            events = found.as_ref().map_or(0, std::collections::HashSet::len),
            ok = found.is_ok(),
            took_ms = started.elapsed().as_millis() as u64,
            "read the log for events sent but not marked"
        );
        found
    }

    /// The instance to send through now, replacing it first if it has failed fatally.
    pub fn current(&self) -> std::sync::Arc<PolledProducer> {
        self.healthy().1
    }

    /// How many times the instance was replaced.
    pub fn replacements(&self) -> u64 {
        self.read().0
    }

    /// The fatal error of the current instance, if it has one (it is replaced at the next send).
    pub fn fatal_error(&self) -> Option<String> {
        let (generation, producer) = self.read();
        if self.inner.failed.load(std::sync::atomic::Ordering::SeqCst) == generation + 1 {
            return Some("a send was refused for good (fenced or out of sequence)".into());
        }
        producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code}: {reason}"))
    }

    fn read(&self) -> (u64, std::sync::Arc<PolledProducer>) {
        let guard = self.inner.current.read().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    fn healthy(&self) -> (u64, std::sync::Arc<PolledProducer>) {
        let (generation, producer) = self.read();
        let failed = self.inner.failed.load(std::sync::atomic::Ordering::SeqCst) == generation + 1;
        if !failed && producer.client().fatal_error().is_none() {
            return (generation, producer);
        }
        self.replace(generation);
        self.read()
    }

    /// Replaces instance `generation` (if no one else has yet). A failure to create the new instance
    /// (invalid settings cannot appear here: the first instance had the same) keeps the old one.
    fn replace(&self, generation: u64) {
        let mut guard = self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if guard.0 != generation {
            return;
        }
        let fatal = guard.1.client().fatal_error();
        self.inner
            .failed
            .store(0, std::sync::atomic::Ordering::SeqCst);
        match PolledProducer::new(&producer_config(&self.inner.cfg, &self.inner.client_id)) {
            Ok(fresh) => {
                tracing::error!(
                    kafka.client_id = %self.inner.client_id,
                    error = ?fatal,
                    generation = generation + 1,
                    "producer failed fatally; replaced by a new instance"
                );
                let old =
                    std::mem::replace(&mut *guard, (generation + 1, std::sync::Arc::new(fresh))).1;
                // Dropping a producer flushes; keep that off the async threads.
                std::thread::spawn(move || drop(old));
            }
            Err(error) => tracing::error!(%error, "cannot create a replacement producer"),
        }
    }

    /// Sends one record and waits for its acknowledgement; returns (partition, offset). If the
    /// instance failed fatally meanwhile, it is replaced and the record is sent once more through the
    /// new instance (same bytes, so a consumer sees at most the same event twice, never a different
    /// one).
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        timeout: Duration,
    ) -> Result<(i32, i64), KafkaError> {
        let mut retried = false;
        loop {
            let (generation, producer) = self.healthy();
            match producer
                .send(topic, key, payload, headers.clone(), timeout)
                .await
            {
                Ok(delivered) => return Ok(delivered),
                Err(error) => {
                    if producer.client().fatal_error().is_none() && !ends_instance(&error) {
                        return Err(error);
                    }
                    self.inner
                        .failed
                        .store(generation + 1, std::sync::atomic::Ordering::SeqCst);
                    self.replace(generation);
                    if retried {
                        return Err(error);
                    }
                    retried = true;
                }
            }
        }
    }

    /// Waits (blocking; call from a blocking thread) until everything sent is acknowledged or
    /// `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        self.read().1.flush(timeout);
    }
}

/// A group consumer that never commits on its own: the caller stores offsets after its work is done.
/// Its context logs rebalances and tracks group health ([`WatchedContext`]).
pub fn consumer(
    cfg: &KafkaConfig,
    group_id: &str,
    client_id: &str,
) -> Result<StreamConsumer<WatchedContext>, KafkaError> {
    consumer_config(cfg, group_id, client_id).create_with_context(WatchedContext::default())
}

fn consumer_config(cfg: &KafkaConfig, group_id: &str, client_id: &str) -> ClientConfig {
    let mut c = base(cfg, client_id);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        // For GroupHealth: librdkafka reports the group join state once a second.
        .set("statistics.interval.ms", "1000");
    c
}

/// Whether a consumer's group membership is settled, from librdkafka's statistics (`cgrp.join_state`).
///
/// A member that lost its assignment and never gets through a rebalance again (seen after a broker
/// stall, and when a group coordinator keeps a dead member as leader) consumes nothing while looking
/// alive. The consume loops watch [`GroupHealth::unsettled_for`] and replace such a consumer with a
/// new instance (see `KAFKA_REJOIN_AFTER_MS`). A member that is settled with no partitions (more
/// members than partitions) counts as settled: it is not churned.
#[derive(Clone)]
pub struct GroupHealth {
    settled_at: std::sync::Arc<std::sync::Mutex<std::time::Instant>>,
}

impl Default for GroupHealth {
    fn default() -> Self {
        Self {
            settled_at: std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
        }
    }
}

impl GroupHealth {
    /// Reads a statistics document (the `stats_raw` callback); also records the consumer lag metric.
    pub fn observe(&self, statistics: &[u8]) {
        crate::metrics::record_consumer_lag(statistics);
        #[derive(serde::Deserialize)]
        struct Stats {
            cgrp: Option<Group>,
        }
        #[derive(serde::Deserialize)]
        struct Group {
            join_state: String,
        }
        if let Ok(Stats { cgrp: Some(group) }) = serde_json::from_slice(statistics) {
            if group.join_state == "steady" {
                *self.settled_at.lock().unwrap_or_else(|e| e.into_inner()) =
                    std::time::Instant::now();
            }
        }
    }

    /// Whether the membership has been unsettled for longer than `limit` (logged when so): the consume
    /// loop should then replace its consumer with a new instance.
    pub fn stuck(&self, limit: Duration) -> bool {
        let unsettled = self.unsettled_for();
        let stuck = unsettled > limit;
        if stuck {
            tracing::warn!(
                unsettled_ms = unsettled.as_millis() as u64,
                "group membership not settled; rejoining with a new consumer"
            );
        }
        stuck
    }

    /// How long the membership has not been settled (zero-ish while it is).
    pub fn unsettled_for(&self) -> Duration {
        self.settled_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// Partitions named in a rebalance, as (topic, partition).
pub fn partitions_of(tpl: &rdkafka::TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// A change of a consumer's assignment, as its consume loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentChange {
    /// These partitions were assigned.
    Assigned(Vec<(String, i32)>),
    /// These partitions were revoked (or lost).
    Revoked(Vec<(String, i32)>),
}

/// The context of the group consumers without special start offsets: logs every assignment and
/// revocation (with partitions) and the offset each newly assigned partition starts from (its
/// first message, [`WatchedContext::started`]), tracks [`GroupHealth`], and queues the changes for the
/// consume loop ([`WatchedContext::take_changes`]) so per-partition state can follow the assignment.
#[derive(Clone, Default)]
pub struct WatchedContext {
    /// Group membership health.
    pub health: GroupHealth,
    changes: std::sync::Arc<std::sync::Mutex<Vec<AssignmentChange>>>,
    /// Assigned partitions whose first message has not been seen yet.
    starting: std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>>,
    any_starting: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WatchedContext {
    /// The assignment changes since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<AssignmentChange> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Call with every message consumed: the first one of a newly assigned partition is logged as
    /// where that partition started (`partition started`, with its offset). Once every assigned
    /// partition has started, one atomic load.
    pub fn started(&self, message: &impl rdkafka::Message) {
        use std::sync::atomic::Ordering;
        if !self.any_starting.load(Ordering::Acquire) {
            return;
        }
        let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        let (topic, partition) = (message.topic(), message.partition());
        if let Some(at) = starting
            .iter()
            .position(|(t, p)| t == topic && *p == partition)
        {
            starting.swap_remove(at);
            tracing::info!(
                kafka.topic = topic,
                kafka.partition = partition,
                kafka.offset = message.offset(),
                "partition started"
            );
        }
        self.any_starting
            .store(!starting.is_empty(), Ordering::Release);
    }
}

impl rdkafka::client::ClientContext for WatchedContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.health.observe(statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for WatchedContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        use rdkafka::consumer::Rebalance;
        let change = match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = partitions_of(tpl);
                tracing::info!(kafka.partitions = ?partitions, "partitions assigned");
                let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
                starting.extend(partitions.iter().cloned());
                self.any_starting
                    .store(!starting.is_empty(), std::sync::atomic::Ordering::Release);
                AssignmentChange::Assigned(partitions)
            }
            Rebalance::Revoke(tpl) => {
                let partitions = partitions_of(tpl);
                tracing::info!(kafka.partitions = ?partitions, "partitions revoked");
                let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
                starting.retain(|p| !partitions.contains(p));
                self.any_starting
                    .store(!starting.is_empty(), std::sync::atomic::Ordering::Release);
                AssignmentChange::Revoked(partitions)
            }
            Rebalance::Error(error) => {
                tracing::error!(%error, "rebalance error");
                return;
            }
        };
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(change);
    }
}

/// Closes a Kafka client (a consumer leaves its group) on a thread of its own, waiting at most
/// `timeout`. Closing can block for good: librdkafka's last poll of a closing consumer may meet a
/// rebalance and wait without limit for an incremental unassign that its main thread never answers
/// (seen in a test). Not on tokio's blocking pool: a runtime waits for its blocking tasks when it
/// shuts down, so one stuck close would keep a service (or a test) from ever exiting.
pub async fn close<T: Send + 'static>(client: T, timeout: Duration) {
    let (closed, finished) = tokio::sync::oneshot::channel::<()>();
    let closing = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            drop(client);
            let _ = closed.send(());
        });
    if closing.is_ok() && tokio::time::timeout(timeout, finished).await.is_err() {
        tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            "a Kafka client did not close in time; left closing on its own thread"
        );
    }
}

/// Like [`consumer`], with a context that can take over rebalances (e.g. to start each assigned
/// partition at an offset kept outside Kafka).
pub fn consumer_with_context<C: rdkafka::consumer::ConsumerContext + 'static>(
    cfg: &KafkaConfig,
    group_id: &str,
    client_id: &str,
    context: C,
) -> Result<StreamConsumer<C>, KafkaError> {
    consumer_config(cfg, group_id, client_id).create_with_context(context)
}

/// Creates the event topics that do not exist yet, with infinite retention, and checks that existing
/// ones keep everything too: the log is the source of truth and projections are rebuilt from offset 0,
/// so an event topic with finite retention is refused at start-up.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let topics = cfg.topics();
    let wanted: Vec<(&str, i64)> = topics.all().into_iter().map(|t| (t, -1)).collect();
    create_topics(cfg, &wanted).await?;
    check_retention(cfg, &topics.all()).await
}

/// Fails if a topic's `retention.ms` or `retention.bytes` is not -1 (keep forever). A broker that does
/// not report the setting is trusted, with a warning.
pub async fn check_retention(cfg: &KafkaConfig, topics: &[&str]) -> Result<(), KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = base(cfg, "catalog-admin").create()?;
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    for (topic, result) in topics
        .iter()
        .zip(admin.describe_configs(&specs, &options).await?)
    {
        let resource = match result {
            Ok(resource) => resource,
            Err(code) => {
                tracing::warn!(topic, error = %code, "broker did not describe the topic; retention not checked");
                continue;
            }
        };
        for key in ["retention.ms", "retention.bytes"] {
            match resource.get(key).and_then(|e| e.value.as_deref()) {
                Some("-1") => {}
                Some(value) => {
                    tracing::error!(
                        topic,
                        setting = key,
                        value,
                        "event topic does not keep everything"
                    );
                    return Err(KafkaError::AdminOpCreation(format!(
                        "topic {topic} has {key}={value}; event topics must keep everything ({key}=-1): \
                         set it with kafka-configs --alter --add-config {key}=-1"
                    )));
                }
                None => tracing::warn!(
                    topic,
                    setting = key,
                    "broker did not report the setting; retention not checked"
                ),
            }
        }
    }
    Ok(())
}

/// Creates the topics in `wanted` (name, `retention.ms`, -1 for forever) that do not exist yet.
pub async fn create_topics(cfg: &KafkaConfig, wanted: &[(&str, i64)]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(cfg, "catalog-admin").create()?;
    let retention: Vec<String> = wanted.iter().map(|(_, r)| r.to_string()).collect();
    let new: Vec<NewTopic<'_>> = wanted
        .iter()
        .zip(&retention)
        .map(|((name, _), retention)| {
            NewTopic::new(
                name,
                cfg.topic_partitions,
                TopicReplication::Fixed(cfg.topic_replication),
            )
            .set("retention.ms", retention)
            .set("retention.bytes", "-1")
            .set("cleanup.policy", "delete")
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic = %name, error = %code, "cannot create topic");
                });
            }
        }
    }
    Ok(())
}

/// Checks that the producer can send: it has not failed fatally, the brokers answer a metadata request
/// within `timeout`, and every topic in `topics` exists (a broker restarted with an empty log has none).
pub async fn ping(
    producer: &EventProducer,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), PingError> {
    if let Some(fatal) = producer.fatal_error() {
        // Replaced at once, so the next probe (and the next write) uses a working instance.
        let _ = producer.current();
        tracing::warn!(error = %fatal, "producer had failed fatally");
        return Err(PingError::ProducerFailed);
    }
    let producer = producer.current();
    let metadata =
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
            .map_err(PingError::Unreachable)?;
    for wanted in topics {
        let present = metadata
            .topics()
            .iter()
            .any(|t| t.name() == *wanted && t.error().is_none() && !t.partitions().is_empty());
        if !present {
            return Err(PingError::TopicMissing((*wanted).to_owned()));
        }
    }
    Ok(())
}

/// Why [`ping`] failed; the texts are safe to show in a readiness report.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    /// The producer instance had failed fatally (it has been replaced).
    #[error("producer failed fatally; replaced")]
    ProducerFailed,
    /// The brokers did not answer.
    #[error("brokers unreachable")]
    Unreachable(#[source] KafkaError),
    /// An event topic does not exist.
    #[error("topic {0} missing")]
    TopicMissing(String),
}

/// Kafka headers for an event envelope (CloudEvents Kafka binding names, see the `events` crate).
pub fn headers(wire: &events::WireEnvelope, source: &str) -> OwnedHeaders {
    wire.headers(source)
        .into_iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
}

/// A consumer that never joins a group and never commits: partitions are assigned by hand at offsets
/// the caller chooses (a change-feed subscriber, a one-off scan). No statistics: many may run at once.
pub fn reader(
    cfg: &KafkaConfig,
    client_id: &str,
) -> Result<StreamConsumer<DefaultConsumerContext>, KafkaError> {
    reader_config(cfg, client_id).create()
}

/// The settings of a [`reader`]: a group id of its own (never joined), no statistics.
fn reader_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let group = format!("{client_id}-{}", uuid::Uuid::new_v4().simple());
    let mut config = consumer_config(cfg, &group, client_id);
    config.set("statistics.interval.ms", "0");
    config
}

/// Reads which events are in the log, for publishers that must not send an event twice: a
/// [`reader`] (never joins a group; partitions are assigned by hand, nothing is committed).
struct LogCheck {
    consumer: StreamConsumer<DefaultConsumerContext>,
}

impl LogCheck {
    /// A checker on the brokers of `cfg`.
    fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let mut config = reader_config(cfg, client_id);
        // Asked right after a broker comes back: reconnect promptly instead of librdkafka's growing
        // backoff (up to 10 s).
        config.set("reconnect.backoff.max.ms", "500");
        Ok(Self {
            consumer: config.create()?,
        })
    }

    /// The ids of the events in `topics` appended at or after `since` (by record timestamp), read up
    /// to each partition's end as it is now.
    async fn event_ids_since(
        &self,
        topics: &[&str],
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<std::collections::HashSet<uuid::Uuid>, rdkafka::error::KafkaError> {
        use rdkafka::Message as _;
        use rdkafka::consumer::Consumer as _;
        #[derive(serde::Deserialize)]
        struct Id {
            event_id: uuid::Uuid,
        }
        let timeout = Duration::from_secs(5);
        let mut wanted = rdkafka::TopicPartitionList::new();
        for topic in topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), timeout)?;
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                wanted.add_partition_offset(
                    topic,
                    partition.id(),
                    rdkafka::Offset::Offset(since.timestamp_millis()),
                )?;
            }
        }
        let starts = self.consumer.offsets_for_times(wanted, timeout)?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        let mut ends = std::collections::HashMap::new();
        for e in starts.elements() {
            let rdkafka::Offset::Offset(start) = e.offset() else {
                continue; // nothing at or after `since`
            };
            let (_, high) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)?;
            if start < high {
                assignment.add_partition_offset(e.topic(), e.partition(), e.offset())?;
                ends.insert((e.topic().to_owned(), e.partition()), high);
            }
        }
        let mut ids = std::collections::HashSet::new();
        if ends.is_empty() {
            return Ok(ids);
        }
        self.consumer.assign(&assignment)?;
        let deadline = tokio::time::Instant::now() + timeout * 3;
        while !ends.is_empty() {
            let message = tokio::time::timeout_at(deadline, self.consumer.recv())
                .await
                .map_err(|_| {
                    rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    )
                })??;
            if let Some(id) = message
                .payload()
                .and_then(|p| serde_json::from_slice::<Id>(p).ok())
            {
                ids.insert(id.event_id);
            }
            let key = (message.topic().to_owned(), message.partition());
            if ends
                .get(&key)
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&key);
            }
        }
        self.consumer.unassign()?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn only_a_steady_join_state_counts_as_settled() {
        let health = super::GroupHealth::default();
        std::thread::sleep(std::time::Duration::from_millis(30));
        health.observe(br#"{"name":"c","cgrp":{"state":"up","join_state":"wait-join"}}"#);
        health.observe(br#"{"name":"c"}"#);
        health.observe(b"not json");
        assert!(health.unsettled_for() >= std::time::Duration::from_millis(30));
        assert!(health.stuck(std::time::Duration::from_millis(10)));
        health.observe(br#"{"name":"c","cgrp":{"state":"up","join_state":"steady"}}"#);
        assert!(!health.stuck(std::time::Duration::from_millis(10)));
    }

    #[test]
    fn fenced_and_sequence_errors_end_a_producer_instance_timeouts_do_not() {
        for code in [
            Code::ProducerFenced,
            Code::Fatal,
            Code::OutOfOrderSequenceNumber,
            Code::UnknownProducerId,
        ] {
            assert!(
                super::ends_instance(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        for code in [
            Code::MessageTimedOut,
            Code::BrokerTransportFailure,
            Code::QueueFull,
        ] {
            assert!(
                !super::ends_instance(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
    }
}
