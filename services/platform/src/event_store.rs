//! The write side's event store: one authority over the sequence of every stream, and the ordered relay
//! of its events to Kafka.
//!
//! Every writer (the API's commands, the image worker's results, re-drives) appends through
//! [`append`] inside a transaction in which it holds the stream's head row ([`lock_head`]), having
//! decided its events from the head's state. The head's version is the version the writer expects:
//! [`append`] moves it only from that version, and the primary key (aggregate id, sequence) refuses a
//! sequence taken twice, so a mismatch is refused before anything reaches the log.
//!
//! Events reach Kafka through [`publish_stream`]: it locks the stream's unpublished events in sequence
//! order, produces them in that order and marks the acknowledged ones published — a new stream's
//! first events too: a client retrying its creation with the same idempotency key publishes the same
//! stream, so even those rows are locked. A writer calls it
//! after committing; the relay ([`relay_once`]) calls it for streams whose events have waited longer
//! than a grace period (a writer that died after its commit). A later event is never produced before
//! an earlier unpublished one of its stream, whoever publishes: the row locks are taken in sequence
//! order, and a publisher that finds the earlier rows locked waits for them.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use uuid::Uuid;

use std::collections::HashSet;

use crate::config::Topics;
use crate::kafka::EventProducer;

/// Why an append or a publication failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the version the writer expected (another writer came first), or it
    /// already exists when the writer meant to create it.
    #[error("stream {aggregate_id} is not at version {expected}")]
    VersionMismatch {
        /// The stream.
        aggregate_id: Uuid,
        /// The version the writer expected.
        expected: u64,
    },
    /// The event this append answers was already answered (a job run twice).
    #[error("event {0} is already answered")]
    AlreadyAnswered(Uuid),
    /// The API key a command was made with is revoked (or gone): nothing was written.
    #[error("API key {0} is revoked")]
    KeyRevoked(Uuid),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had.
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The broker did not acknowledge an event.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A stored envelope or head state cannot be read (a bug or a hand-edited row).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

/// One event to append: its wire envelope and, if it answers another event, that event's id.
pub struct NewEvent {
    /// The envelope (its sequence must follow the stream's version, in order).
    pub wire: events::WireEnvelope,
    /// The id of the event this one answers, if any; an event can be answered once.
    pub causation_id: Option<Uuid>,
}

impl NewEvent {
    /// An event answering nothing.
    pub fn new(wire: events::WireEnvelope) -> Self {
        Self {
            wire,
            causation_id: None,
        }
    }
}

/// Locks the head of stream `aggregate_id` for the rest of the transaction and returns its version and
/// state, or `None` if the stream does not exist.
pub async fn lock_head<S: DeserializeOwned>(
    tx: &impl GenericClient,
    aggregate_id: Uuid,
) -> Result<Option<(u64, S)>, StoreError> {
    let head = head(
        tx,
        "SELECT version, state FROM stream_heads WHERE aggregate_id = $1 FOR UPDATE",
        aggregate_id,
    )
    .await?;
    head.map(|(version, state)| {
        serde_json::from_value(state)
            .map(|state| (version, state))
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    })
    .transpose()
}

/// The head row `query` selects (version and state JSON), if any.
async fn head(
    client: &impl GenericClient,
    query: &str,
    aggregate_id: Uuid,
) -> Result<Option<(u64, serde_json::Value)>, StoreError> {
    let row = client
        .query_opt(&client.prepare_cached(query).await?, &[&aggregate_id])
        .await?;
    Ok(row.map(|row| {
        let version = u64::try_from(row.get::<_, i64>(0)).unwrap_or_default();
        let Json(state): Json<serde_json::Value> = row.get(1);
        (version, state)
    }))
}

/// The head of stream `aggregate_id` as it is now (no lock): its version and state, or `None` if the
/// stream does not exist. For writers that decide first and then move the head with a compare-and-set
/// ([`append_command`]).
pub async fn read_head(
    client: &impl GenericClient,
    aggregate_id: Uuid,
) -> Result<Option<(u64, serde_json::Value)>, StoreError> {
    head(
        client,
        "SELECT version, state FROM stream_heads WHERE aggregate_id = $1",
        aggregate_id,
    )
    .await
}

/// The command row an API command records with its events (idempotency and the stored answer).
pub struct CommandRecord<'a> {
    /// Id of the command's row.
    pub id: Uuid,
    /// `METHOD /path` the command came through; scopes idempotency keys.
    pub route: &'a str,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<&'a str>,
    /// Fingerprint of the request.
    pub request_hash: &'a [u8],
    /// The answer, stored for retries.
    pub response: &'a serde_json::Value,
    /// The API key the caller presented, if the write itself must check that it is not revoked (the
    /// API remembers keys instead of reading them before every command).
    pub api_key: Option<Uuid>,
}

/// What [`append_command`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandWritten {
    /// The command is recorded and its events appended (or, with none, the command alone).
    Appended,
    /// The idempotency key was used already: nothing was written.
    Duplicate,
}

/// Records `command`, moves the head of `aggregate_id` from `expected` (0: creates the stream) to
/// `state` and appends `events` — in one statement, so one round trip and no lock held between
/// statements (`sql/0009_append_command.sql`). A head no longer at `expected` writes nothing and is
/// [`StoreError::VersionMismatch`]: the caller reads the head again and decides again. With
/// `command.api_key`, the same statement first checks that the key is not revoked
/// (`sql/0011_append_command_with_key.sql`; [`StoreError::KeyRevoked`], nothing written).
pub async fn append_command(
    client: &impl GenericClient,
    command: &CommandRecord<'_>,
    aggregate_id: Uuid,
    expected: u64,
    events: &[events::WireEnvelope],
    state: &serde_json::Value,
    source: &str,
) -> Result<CommandWritten, StoreError> {
    let aggregate_type = events
        .first()
        .map_or("product", |e| e.aggregate_type.as_str());
    let (sequences, ids, envelopes) = columns(aggregate_id, expected, events.iter())?;
    let statement = client
        .prepare_cached(
            "SELECT catalog_append_command_with_key($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .await?;
    let result = client
        .query_one(
            &statement,
            &[
                &command.api_key,
                &command.id,
                &command.route,
                &command.idempotency_key,
                &command.request_hash,
                command.response,
                &aggregate_id,
                &aggregate_type,
                &to_i64(expected),
                state,
                &source,
                &sequences,
                &ids,
                &envelopes,
            ],
        )
        .await;
    match result {
        Ok(row) if row.get::<_, &str>(0) == "duplicate" => Ok(CommandWritten::Duplicate),
        Ok(_) => Ok(CommandWritten::Appended),
        Err(e) if e.code().is_some_and(|c| c.code() == "CA401") => {
            Err(StoreError::KeyRevoked(command.api_key.unwrap_or_default()))
        }
        Err(e)
            if e.code().is_some_and(|c| c.code() == "CA409")
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
        {
            Err(StoreError::VersionMismatch {
                aggregate_id,
                expected,
            })
        }
        Err(e) => Err(StoreError::Postgres(e)),
    }
}

/// The `event_store` columns of `events` (sequence, event id, exact JSON), checked to continue the
/// stream of `aggregate_id` from `expected` without a gap.
#[allow(clippy::type_complexity)]
fn columns<'a>(
    aggregate_id: Uuid,
    expected: u64,
    events: impl ExactSizeIterator<Item = &'a events::WireEnvelope>,
) -> Result<(Vec<i64>, Vec<Uuid>, Vec<String>), StoreError> {
    let mut sequences = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut envelopes = Vec::with_capacity(events.len());
    for (offset, wire) in events.enumerate() {
        if wire.aggregate_id != aggregate_id || wire.sequence != expected + 1 + offset as u64 {
            return Err(StoreError::Corrupt(format!(
                "event {} does not continue stream {aggregate_id} at version {expected}",
                wire.event_id
            )));
        }
        sequences.push(to_i64(wire.sequence));
        ids.push(wire.event_id);
        envelopes
            .push(serde_json::to_string(wire).map_err(|e| StoreError::Corrupt(e.to_string()))?);
    }
    Ok((sequences, ids, envelopes))
}

/// Appends `events` to the stream of `aggregate_id`, which must be at version `expected` (0: the
/// stream must not exist yet), and sets its head to `state`. Call inside the transaction that holds
/// the head ([`lock_head`]); nothing is visible until it commits. Events are written as `source`.
pub async fn append(
    tx: &impl GenericClient,
    aggregate_id: Uuid,
    expected: u64,
    events: &[NewEvent],
    state: &impl Serialize,
    source: &str,
) -> Result<u64, StoreError> {
    let Some(first) = events.first() else {
        return Ok(expected);
    };
    let aggregate_type = first.wire.aggregate_type.as_str();
    let new_version = expected + events.len() as u64;
    let state = serde_json::to_value(state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let (expected_i, new_i) = (to_i64(expected), to_i64(new_version));
    let moved = if expected == 0 {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO stream_heads (aggregate_id, aggregate_type, version, state)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&aggregate_id, &aggregate_type, &new_i, &Json(&state)],
        )
        .await?
    } else {
        tx.execute(
            &tx.prepare_cached(
                "UPDATE stream_heads SET version = $3, state = $4
              WHERE aggregate_id = $1 AND version = $2",
            )
            .await?,
            &[&aggregate_id, &expected_i, &new_i, &Json(&state)],
        )
        .await?
    };
    if moved != 1 {
        return Err(StoreError::VersionMismatch {
            aggregate_id,
            expected,
        });
    }
    // One statement for all the events (one round trip), checked against the stream first.
    let (sequences, ids, envelopes) =
        columns(aggregate_id, expected, events.iter().map(|e| &e.wire))?;
    let causes: Vec<Option<Uuid>> = events.iter().map(|e| e.causation_id).collect();
    tx.execute(
        &tx.prepare_cached("INSERT INTO event_store (aggregate_id, sequence, event_id, aggregate_type, envelope, source,
                                  causation_id)
         SELECT $1, s, i, $5, e, $6, c
           FROM unnest($2::bigint[], $3::uuid[], $4::text[], $7::uuid[]) AS t(s, i, e, c)").await?,
        &[
            &aggregate_id,
            &sequences,
            &ids,
            &envelopes,
            &aggregate_type,
            &source,
            &causes,
        ],
    )
    .await
    .map_err(|e| {
        let unique = e.code() == Some(&SqlState::UNIQUE_VIOLATION);
        let answered = e
            .as_db_error()
            .and_then(|d| d.constraint())
            .is_some_and(|c| c == "event_store_answers");
        match (unique, answered, events.iter().find_map(|e| e.causation_id)) {
            (true, true, Some(cause)) => StoreError::AlreadyAnswered(cause),
            (true, _, _) => StoreError::VersionMismatch {
                aggregate_id,
                expected,
            },
            _ => StoreError::Postgres(e),
        }
    })?;
    Ok(new_version)
}

/// One event on its way to the log: its sequence, the exact stored JSON, the writer's `ce_source`.
struct Pending<'a> {
    sequence: i64,
    json: String,
    source: &'a str,
    wire: events::WireEnvelope,
}

/// Hands all of a stream's `events` (in sequence order) to the producer at once and waits for the
/// acknowledgements. Each send is enqueued when first polled and `join_all` polls them in order, so
/// the idempotent producer keeps their order within the partition and the stream waits for one round
/// of acknowledgements instead of one per event. Returns the sequences of the acknowledged prefix (a
/// later event is never counted before an earlier one) and the first failure, if any.
async fn produce_in_order(
    producer: &EventProducer,
    topics: &Topics,
    aggregate_id: Uuid,
    events: &[Pending<'_>],
) -> (Vec<i64>, Option<rdkafka::error::KafkaError>) {
    let key = aggregate_id.to_string();
    let sends = events.iter().map(|e| {
        producer.send(
            topics.for_aggregate(e.wire.aggregate_type),
            &key,
            e.json.as_bytes(),
            crate::kafka::headers(&e.wire, e.source),
            Duration::from_secs(10),
        )
    });
    let mut published = Vec::new();
    let mut failure = None;
    for (event, ack) in events.iter().zip(futures::future::join_all(sends).await) {
        match ack {
            Ok((partition, offset)) if failure.is_none() => {
                published.push(event.sequence);
                tracing::debug!(
                    event.id = %event.wire.event_id,
                    event.r#type = %event.wire.event_type,
                    event.sequence = event.wire.sequence,
                    kafka.partition = partition,
                    kafka.offset = offset,
                    "event published"
                );
            }
            Ok(_) => {}
            Err(error) => {
                failure.get_or_insert(error);
            }
        }
    }
    (published, failure)
}

/// Produces every unpublished event of `aggregate_id` in sequence order, holding their rows locked so
/// no other publisher can produce a later event first, and marks the acknowledged ones published.
/// Returns how many it produced.
pub async fn publish_stream(
    pool: &deadpool_postgres::Pool,
    producer: &EventProducer,
    topics: &Topics,
    aggregate_id: Uuid,
) -> Result<usize, StoreError> {
    publish_stream_except(pool, producer, topics, aggregate_id, None).await
}

/// [`publish_stream`], marking the events found in `in_log` (already in the log) published without
/// producing them again.
async fn publish_stream_except(
    pool: &deadpool_postgres::Pool,
    producer: &EventProducer,
    topics: &Topics,
    aggregate_id: Uuid,
    in_log: Option<&HashSet<Uuid>>,
) -> Result<usize, StoreError> {
    // BEGIN travels with the locking SELECT, and the mark with COMMIT: two round trips, not four.
    // The mark is committed without waiting for its WAL flush: it only records what the broker has
    // already acknowledged. A mark lost in a database crash leaves an event that was recorded before
    // the server came back: such events, like any pending for over 2 s, are looked for in the log
    // before anything is sent (by the relay always), so none is sent twice. "Came back" is the later
    // of the postmaster's start (a restart) and the last reset of the shared statistics, which
    // PostgreSQL resets when it recovers from a crash of any of its processes without restarting the
    // postmaster (`restart_after_crash`, e.g. a backend killed by the OOM killer) — the postmaster's
    // start time does not move then, and unflushed commits are lost all the same.
    let tx = Pipelined(Some(pool.get().await?));
    let client = tx.client();
    let select = client
        .prepare_cached(
            "SELECT sequence, envelope, source, event_id, recorded_at,
                    recorded_at < now() - interval '2 seconds'
                      OR recorded_at < greatest(pg_postmaster_start_time(),
                                                pg_stat_get_bgwriter_stat_reset_time())
               FROM event_store
              WHERE aggregate_id = $1 AND published_at IS NULL
              ORDER BY sequence FOR UPDATE",
        )
        .await?;
    let mark = client
        .prepare_cached(
            "UPDATE event_store SET published_at = now()
              WHERE aggregate_id = $1 AND sequence = ANY($2) AND published_at IS NULL",
        )
        .await?;
    let (_, rows) = futures::future::try_join(
        client.batch_execute("BEGIN; SET LOCAL synchronous_commit TO off"),
        client.query(&select, &[&aggregate_id]),
    )
    .await?;
    // Pending events that are not this caller's fresh ones were left by a writer that gave up or died
    // after sending them, and may have landed: the log is asked (rarely: a crash or a stall before).
    let scanned;
    let in_log = match in_log {
        Some(ids) => Some(ids),
        None => match rows
            .iter()
            .filter(|row| row.get::<_, bool>(5))
            .map(|row| row.get::<_, chrono::DateTime<chrono::Utc>>(4))
            .min()
        {
            Some(oldest) => {
                scanned = producer
                    .events_in_log(&topics.all(), oldest - chrono::Duration::seconds(10))
                    .await?;
                Some(&scanned)
            }
            None => None,
        },
    };
    // Events an earlier attempt did get into the log lead the pending ones (a stream is produced in
    // order): they are only marked.
    let landed: Vec<i64> = rows
        .iter()
        .take_while(|row| in_log.is_some_and(|ids| ids.contains(&row.get::<_, Uuid>(3))))
        .map(|row| row.get(0))
        .collect();
    if !landed.is_empty() {
        tracing::info!(stream = %aggregate_id, events = landed.len(), "events found already in the log; marked, not sent again");
    }
    let pending = rows[landed.len()..]
        .iter()
        .map(|row| {
            let json: String = row.get(1);
            let wire =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(Pending {
                sequence: row.get(0),
                json,
                source: row.get(2),
                wire,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let (published, failure) = produce_in_order(producer, topics, aggregate_id, &pending).await;
    let mut marked = landed;
    marked.extend(published);
    if marked.is_empty() {
        client.batch_execute("COMMIT").await?;
    } else {
        // Should the UPDATE fail, PostgreSQL answers the COMMIT of the failed transaction as a
        // rollback, and the error is the UPDATE's.
        futures::future::try_join(
            client.execute(&mark, &[&aggregate_id, &marked]),
            client.batch_execute("COMMIT"),
        )
        .await?;
    }
    tx.committed();
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(pending.len()),
    }
}

/// A pooled connection in a transaction begun by a plain `BEGIN`, so that it can be pipelined with
/// the transaction's first statement (a `Transaction` waits for its `BEGIN`). Dropped before
/// [`Pipelined::committed`] (an error, or the future abandoned), the connection leaves the pool and
/// closes, so PostgreSQL rolls the transaction back and no later borrower finds it open.
struct Pipelined(Option<deadpool_postgres::Object>);

impl Pipelined {
    fn client(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("taken only by committed or drop")
    }

    /// The transaction has ended: the connection goes back to the pool.
    fn committed(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// One relay sweep: publishes the streams (up to `limit`) whose oldest unpublished event is older than
/// `grace`. A stream that cannot be published now (broker away, a bad row) is logged and skipped, so one
/// stream never holds up the others. Returns how many events it published.
pub async fn relay_once(
    pool: &deadpool_postgres::Pool,
    producer: &EventProducer,
    topics: &Topics,
    grace: Duration,
    limit: i64,
) -> Result<usize, StoreError> {
    let candidates = pool
        .get()
        .await?
        .query(
            "SELECT aggregate_id, min(recorded_at) FROM event_store
              WHERE published_at IS NULL AND recorded_at < now() - make_interval(secs => $1)
              GROUP BY aggregate_id ORDER BY min(recorded_at) LIMIT $2",
            &[&grace.as_secs_f64(), &limit],
        )
        .await?;
    let Some(oldest) = candidates
        .iter()
        .map(|r| r.get::<_, chrono::DateTime<chrono::Utc>>(1))
        .min()
    else {
        return Ok(0);
    };
    let streams: Vec<Uuid> = candidates.iter().map(|r| r.get(0)).collect();
    // An unacknowledged send may still have landed (its writer died before marking it, or gave up
    // while a stalled broker held it): what is in the log since the oldest candidate is not sent
    // again. A broker that cannot be read now cannot be written either: the sweep waits.
    let in_log = producer
        .events_in_log(&topics.all(), oldest - chrono::Duration::seconds(10))
        .await?;
    let mut published = 0;
    let mut first_error = None;
    for id in streams {
        match publish_stream_except(pool, producer, topics, id, Some(&in_log)).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(stream = %id, events = n, "relay published a stream's pending events");
                }
                published += n;
            }
            Err(error) => {
                tracing::warn!(stream = %id, %error, "relay cannot publish this stream now");
                first_error.get_or_insert(error);
            }
        }
    }
    match (published, first_error) {
        (0, Some(error)) => Err(error),
        (n, _) => Ok(n),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Events recorded and not yet acknowledged by the broker: how many, and how long the oldest has
/// waited in seconds (0 when none). Cheap: it reads the partial index of unpublished rows.
pub async fn waiting(pool: &deadpool_postgres::Pool) -> Result<(i64, f64), StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(recorded_at))::float8, 0)
               FROM event_store WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
