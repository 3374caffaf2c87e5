//! `GET /products/changes`: the products topic as Server-Sent Events, for people without a Kafka
//! client.
//!
//! Each subscriber gets a Kafka consumer of its own that never joins a group: it is assigned every
//! partition of the products topic at the subscriber's cursor, so subscribers never share or slow one
//! another, and a reconnect resumes exactly where the last delivered event left off. The cursor (each
//! event's SSE `id`) is the next offset of every partition (`0:12,1:7,2:30`); `Last-Event-ID` with it
//! resumes with no gap and no duplicate. Events travel through a bounded buffer: a subscriber that
//! leaves it full for `API_CHANGES_SLOW_CLIENT_MS` is sent what the buffer holds, then an `overflow`
//! event naming the cursor to resume from, and is disconnected.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use platform::config::KafkaConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, DefaultConsumerContext, StreamConsumer};
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::FieldError;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Most product owners remembered per subscriber for the `user_id` filter.
const MAX_OWNERS: usize = 10_000;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(changes))
}

/// The change feed's settings and the subscribers it serves.
pub struct Feed {
    kafka: KafkaConfig,
    topic: String,
    slots: Arc<Semaphore>,
    buffer: usize,
    slow_after: Duration,
    closing: watch::Sender<bool>,
}

impl Feed {
    /// A feed of `topic` on the brokers of `kafka`.
    pub fn new(
        kafka: KafkaConfig,
        topic: String,
        max_clients: usize,
        buffer: usize,
        slow_after: Duration,
    ) -> Self {
        Self {
            kafka,
            topic,
            slots: Arc::new(Semaphore::new(max_clients)),
            buffer: buffer.max(1),
            slow_after,
            closing: watch::channel(false).0,
        }
    }

    /// Ends every subscription (the server is stopping): their streams end, so connections can close.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

/// A position in the topic: the next offset to read in each partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor(BTreeMap<i32, i64>);

impl Cursor {
    fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(p, o)| format!("{p}:{o}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn parse(text: &str) -> Option<Self> {
        let mut positions = BTreeMap::new();
        for part in text.trim().split(',') {
            let (p, o) = part.split_once(':')?;
            let (p, o) = (p.parse::<i32>().ok()?, o.parse::<i64>().ok()?);
            if p < 0 || o < 0 || positions.insert(p, o).is_some() {
                return None;
            }
        }
        Some(Self(positions))
    }
}

/// What ends a subscription, told to the stream once it has sent everything buffered.
enum Ending {
    /// The subscriber left the buffer full too long.
    Overflow { resume_from: String },
    /// The broker stopped answering this subscription, or PostgreSQL the owner lookup of its
    /// `user_id` filter.
    Unavailable { resume_from: String },
}

/// Follows product changes as Server-Sent Events: one `message` event per event appended to the
/// products topic, its data the public envelope exactly as on the topic.
#[utoipa::path(
    get, path = "/products/changes", tag = "products",
    params(
        ("user_id" = Option<Uuid>, Query, description = "Only events of this user's products."),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after the event with this \
            `id` (browsers' EventSource sends it on reconnect): no event is missed or repeated. \
            Without it the feed starts at the end of the log (changes from now on)."),
        ("last_event_id" = Option<String>, Query, description = "The same as `Last-Event-ID`, for \
            clients that cannot set headers."),
    ),
    responses(
        (status = 200, description = "`text/event-stream`. First a `ready` event whose `id` is the \
            starting position; then one event per change (`data`: the envelope JSON, `id`: the \
            position after it). A subscriber too slow to read its buffer receives an `overflow` event \
            (`data.resume_from`) and is disconnected; `unavailable` likewise when the broker (or, \
            under a `user_id` filter, the database) stops answering. Comments every 15 s keep idle connections open.",
            content_type = "text/event-stream", body = String),
        (status = 422, description = "A malformed `user_id` or `Last-Event-ID`, named \
            (`validation_failed`).", body = ErrorBody),
        (status = 503, description = "Too many subscribers on this API process (`unavailable`), or \
            the broker does not answer.", body = ErrorBody),
    ),
)]
async fn changes(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = match params.get("user_id") {
        None => None,
        Some(raw) => Some(Uuid::parse_str(raw).map_err(|_| {
            ApiError::Validation(vec![FieldError::new("user_id", "must be a UUID")])
        })?),
    };
    let (field, last) = match headers.get("last-event-id") {
        Some(v) => (
            "Last-Event-ID",
            Some(v.to_str().unwrap_or("\u{0}").to_owned()),
        ),
        None => ("last_event_id", params.get("last_event_id").cloned()),
    };
    let bad_cursor = || {
        ApiError::Validation(vec![FieldError::new(
            field,
            "must be the id of an event of this feed",
        )])
    };
    let resume = match last.as_deref() {
        None | Some("") => None,
        Some(text) => Some(Cursor::parse(text).ok_or_else(bad_cursor)?),
    };
    let feed = &state.changes;
    let permit = feed.slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable("every change-feed slot of this process is taken".into())
    })?;
    let (kafka, topic) = (feed.kafka.clone(), feed.topic.clone());
    let (consumer, start) = tokio::task::spawn_blocking(move || subscribe(&kafka, &topic, resume))
        .await
        .map_err(|e| ApiError::Internal(format!("subscribe task: {e}")))??;

    let (events, received) = mpsc::channel(feed.buffer);
    let (end, ended) = oneshot::channel();
    tokio::spawn(pump(Pump {
        consumer,
        topic: feed.topic.clone(),
        cursor: start.clone(),
        user,
        pool: state.read_pool.clone(),
        db_timeout: state.db_timeout,
        events,
        end,
        slow_after: feed.slow_after,
        closing: feed.closing.subscribe(),
        _permit: permit,
        _counted: Subscribed::count(),
    }));
    tracing::info!(user_id = ?user, from = %start.encode(), "change-feed subscriber joined");
    let ready = Event::default()
        .event("ready")
        .id(start.encode())
        .json_data(serde_json::json!({ "resume_from": start.encode() }))
        .expect("JSON");
    Ok(Sse::new(stream(ready, received, ended))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// A consumer assigned to every partition of `topic`: at `resume` (which must name exactly the
/// topic's partitions), else at each partition's end. Blocking (broker round trips).
fn subscribe(
    kafka: &KafkaConfig,
    topic: &str,
    resume: Option<Cursor>,
) -> Result<(StreamConsumer<DefaultConsumerContext>, Cursor), ApiError> {
    let timeout = Duration::from_secs(5);
    let consumer = platform::kafka::reader(kafka, "catalog-api-changes")?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "topic {topic} has no partitions"
        )));
    }
    let start = match resume {
        Some(cursor) => {
            let mut named: Vec<i32> = cursor.0.keys().copied().collect();
            let mut known = partitions.clone();
            named.sort_unstable();
            known.sort_unstable();
            if named != known {
                return Err(ApiError::Validation(vec![FieldError::new(
                    "Last-Event-ID",
                    "names partitions the products topic does not have",
                )]));
            }
            cursor
        }
        None => {
            let mut ends = BTreeMap::new();
            for p in &partitions {
                let (_, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
                ends.insert(*p, high);
            }
            Cursor(ends)
        }
    };
    let mut assignment = rdkafka::TopicPartitionList::new();
    for (p, o) in &start.0 {
        assignment.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*o))?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, start))
}

/// One subscription's reading side.
struct Pump {
    consumer: StreamConsumer<DefaultConsumerContext>,
    topic: String,
    cursor: Cursor,
    user: Option<Uuid>,
    pool: deadpool_postgres::Pool,
    db_timeout: Duration,
    events: mpsc::Sender<Event>,
    end: oneshot::Sender<Ending>,
    slow_after: Duration,
    closing: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _counted: Subscribed,
}

/// One open subscription in the `changes_subscribers` gauge, for as long as it lives (however its
/// pump ends: a return, a panic, or a runtime that drops it unrun).
struct Subscribed;

impl Subscribed {
    fn count() -> Self {
        metrics::gauge!("changes_subscribers").increment(1.0);
        Self
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        metrics::gauge!("changes_subscribers").decrement(1.0);
    }
}

/// The parts of an envelope the feed reads; the data sent is the message itself. The payload is kept
/// as raw text and read only for the owner of a `ProductCreated` under a `user_id` filter.
#[derive(Deserialize)]
struct Head<'a> {
    event_type: String,
    aggregate_id: Uuid,
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

/// Reads the subscriber's partitions into its buffer until it leaves, is too slow, or the server
/// stops.
async fn pump(mut p: Pump) {
    let mut owners: HashMap<Uuid, Uuid> = HashMap::new();
    // The position of the last event put in the buffer: where a subscriber cut off resumes.
    let mut delivered = p.cursor.encode();
    let mut failures = 0u32;
    let mut stopping = false;
    let ending = loop {
        let message = tokio::select! {
            m = p.consumer.recv() => m,
            () = p.events.closed() => break None,
            _ = p.closing.changed() => {
                stopping = true;
                break None;
            }
        };
        let message = match message {
            Ok(m) => {
                failures = 0;
                m
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "change feed: kafka consume error");
                if failures >= 10 {
                    break Some(Ending::Unavailable {
                        resume_from: delivered,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if message.topic() != p.topic {
            continue;
        }
        p.cursor.0.insert(message.partition(), message.offset() + 1);
        let Some(payload) = message.payload() else {
            continue;
        };
        let (Ok(text), Ok(head)) = (
            std::str::from_utf8(payload),
            serde_json::from_slice::<Head>(payload),
        ) else {
            tracing::warn!(
                kafka.partition = message.partition(),
                kafka.offset = message.offset(),
                "change feed: a message that is not an event envelope is not forwarded"
            );
            continue;
        };
        if let Some(user) = p.user {
            match owner(&p.pool, p.db_timeout, &mut owners, &head).await {
                Ok(Some(owner)) if owner == user => {}
                Ok(_) => continue,
                // Not knowing whose it is, the event can be neither sent nor skipped: end here, and
                // the subscriber resumes from the last event it has.
                Err(error) => {
                    tracing::warn!(%error, "change feed: cannot look up a product's owner");
                    break Some(Ending::Unavailable {
                        resume_from: delivered,
                    });
                }
            }
        }
        let id = p.cursor.encode();
        let event = Event::default().id(id.clone()).data(text);
        match tokio::time::timeout(p.slow_after, p.events.send(event)).await {
            Ok(Ok(())) => delivered = id,
            Ok(Err(_)) => break None,
            Err(_) => {
                tracing::warn!(resume_from = %delivered, "change-feed subscriber too slow; disconnected");
                break Some(Ending::Overflow {
                    resume_from: delivered,
                });
            }
        }
    };
    let reason = match &ending {
        None if stopping => "server_stopping",
        None => "left",
        Some(Ending::Overflow { .. }) => "client_too_slow",
        Some(Ending::Unavailable { .. }) => "unavailable",
    };
    metrics::counter!("changes_disconnects_total", "reason" => reason).increment(1);
    if let Some(ending) = ending {
        let _ = p.end.send(ending);
    }
    let Pump {
        consumer,
        events,
        _permit: permit,
        _counted: counted,
        ..
    } = p;
    drop(events);
    drop(permit);
    drop(counted);
    platform::kafka::close(consumer, Duration::from_secs(5)).await;
}

/// The owner of the product `head` belongs to: from its `ProductCreated`, remembered; else from the
/// read model or the event store (for subscriptions that start after the product was created), within
/// `timeout`. `Ok(None)`: no one's (a product neither knows). `Err`: PostgreSQL did not answer.
async fn owner(
    pool: &deadpool_postgres::Pool,
    timeout: Duration,
    owners: &mut HashMap<Uuid, Uuid>,
    head: &Head<'_>,
) -> Result<Option<Uuid>, String> {
    #[derive(Deserialize)]
    struct Created {
        user_id: Uuid,
    }
    if let Some(owner) = owners.get(&head.aggregate_id) {
        return Ok(Some(*owner));
    }
    let found = if head.event_type == "ProductCreated" {
        head.data
            .and_then(|d| serde_json::from_str::<Created>(d.get()).ok())
            .map(|c| c.user_id)
    } else {
        let lookup = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_opt(
                    "SELECT user_id FROM products WHERE id = $1
                     UNION ALL
                     SELECT ((envelope::jsonb) -> 'data' ->> 'user_id')::uuid
                       FROM event_store WHERE aggregate_id = $1 AND sequence = 1
                     LIMIT 1",
                    &[&head.aggregate_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(row.map(|row| row.get(0)))
        };
        tokio::time::timeout(timeout, lookup)
            .await
            .map_err(|_| "the owner lookup timed out".to_owned())??
    };
    let Some(found) = found else {
        return Ok(None);
    };
    if owners.len() >= MAX_OWNERS {
        owners.clear();
    }
    owners.insert(head.aggregate_id, found);
    Ok(Some(found))
}

/// The subscriber's stream: `ready`, then the buffered events, then the ending, if any.
fn stream(
    ready: Event,
    received: mpsc::Receiver<Event>,
    ended: oneshot::Receiver<Ending>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    enum Stage {
        Ready(Event),
        Events,
        Ending,
    }
    futures::stream::unfold(
        (Stage::Ready(ready), received, Some(ended)),
        |(stage, mut received, mut ended)| async move {
            match stage {
                Stage::Ready(event) => Some((Ok(event), (Stage::Events, received, ended))),
                Stage::Events => match received.recv().await {
                    Some(event) => Some((Ok(event), (Stage::Events, received, ended))),
                    None => {
                        let ending = ended.take()?.await.ok()?;
                        let (name, code, resume_from) = match ending {
                            Ending::Overflow { resume_from } => {
                                ("overflow", "client_too_slow", resume_from)
                            }
                            Ending::Unavailable { resume_from } => {
                                ("unavailable", "unavailable", resume_from)
                            }
                        };
                        let message = if name == "overflow" {
                            "this subscriber did not read its events fast enough and is disconnected; \
                             reconnect with Last-Event-ID to resume"
                        } else {
                            "the broker or the database stopped answering; reconnect with \
                             Last-Event-ID to resume"
                        };
                        let event = Event::default()
                            .event(name)
                            .json_data(serde_json::json!({
                                "code": code,
                                "message": message,
                                "resume_from": resume_from,
                            }))
                            .expect("JSON");
                        Some((Ok(event), (Stage::Ending, received, ended)))
                    }
                },
                Stage::Ending => None,
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor([(0, 12), (1, 0), (2, 7)].into_iter().collect());
        assert_eq!(c.encode(), "0:12,1:0,2:7");
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
        for bad in [
            "", "0", "0:", ":1", "0:1,0:2", "-1:3", "0:-3", "a:b", "0:1;1:2",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }
}
