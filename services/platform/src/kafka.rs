//! Kafka clients, configured the one way every catalog service uses them.
//!
//! Only the Kafka protocol through rdkafka is used here, so the services run against Apache Kafka in
//! production and any compatible broker in development and tests.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
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
pub fn producer(cfg: &KafkaConfig, client_id: &str) -> Result<FutureProducer, KafkaError> {
    base(cfg, client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "10000")
        .set("compression.type", "lz4")
        .set(
            "batch.num.messages",
            cfg.producer_batch_messages.to_string(),
        )
        .create()
}

/// A group consumer that never commits on its own: the caller stores offsets after its work is done.
pub fn consumer(
    cfg: &KafkaConfig,
    group_id: &str,
    client_id: &str,
) -> Result<StreamConsumer, KafkaError> {
    consumer_config(cfg, group_id, client_id).create()
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
        .set("isolation.level", "read_committed");
    c
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

/// Checks that the brokers answer a metadata request within `timeout`.
pub async fn ping(producer: &FutureProducer, timeout: Duration) -> Result<(), KafkaError> {
    use rdkafka::producer::Producer;
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).map(|_| ()))
        .await
        .unwrap_or(Err(KafkaError::Canceled))
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
