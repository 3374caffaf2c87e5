//! Applies a batch of consumed messages to the projection in one PostgreSQL transaction.
//!
//! Exactly-once on top of at-least-once delivery:
//! - the next offset of every partition is stored in `projection_offsets` in the same transaction as the
//!   rows, and messages below it are skipped, so a batch re-delivered after a crash changes nothing;
//! - each row carries the sequence of the last event applied, and an event is applied only if it is the
//!   next one (`events::ProductState::apply`), so a re-sent event (same id, same sequence) is ignored;
//! - an event that arrives before its predecessor is parked and applied as soon as the gap closes;
//! - a message that cannot be read is recorded in `projection_rejected` with the reason, never dropped.

use std::collections::{BTreeMap, HashMap, HashSet};

use deadpool_postgres::{GenericClient, Transaction};
use events::{AnyEnvelope, ApplyError, Envelope, ProductEvent, ProductState, UserEvent, UserState};
use platform::read_model::{
    PRODUCT_COLUMNS, USER_COLUMNS, product_from_row, upsert_products, upsert_users, user_from_row,
};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio_postgres::types::Json;
use uuid::Uuid;

use crate::position::Positions;

/// What a batch did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// Products whose row changed, with their new version (for cache invalidation after commit).
    pub changed_products: Vec<(Uuid, u64)>,
    /// Events applied to a row.
    pub applied: usize,
    /// Messages below the stored offset, or events already applied.
    pub duplicates: usize,
    /// Events waiting for an earlier event of their stream.
    pub parked: usize,
    /// Messages recorded in `projection_rejected`.
    pub rejected: usize,
}

impl BatchReport {
    /// Adds the counts of another (later) part of the same batch.
    pub fn merge(&mut self, other: BatchReport) {
        self.changed_products.extend(other.changed_products);
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.parked += other.parked;
        self.rejected += other.rejected;
    }
}

/// A stream's state while a batch is applied, with the events parked for it.
struct Stream<S> {
    state: Option<S>,
    dirty: bool,
    parked: BTreeMap<u64, serde_json::Value>,
    parked_added: HashSet<u64>,
    parked_removed: HashSet<u64>,
    /// Envelopes applied in this batch, in order (the product history table gets them).
    applied: Vec<events::WireEnvelope>,
}

impl<S> Default for Stream<S> {
    fn default() -> Self {
        Self {
            state: None,
            dirty: false,
            applied: Vec::new(),
            parked: BTreeMap::new(),
            parked_added: HashSet::new(),
            parked_removed: HashSet::new(),
        }
    }
}

/// The state type of an aggregate, so one driver handles users and products.
trait Fold: Sized + Clone {
    type Event: events::DomainEvent;
    fn create(envelope: &Envelope<Self::Event>) -> Result<Self, ApplyError>;
    fn apply(&mut self, envelope: &Envelope<Self::Event>) -> Result<(), ApplyError>;
    fn version(&self) -> u64;
}

impl Fold for ProductState {
    type Event = ProductEvent;
    fn create(envelope: &Envelope<ProductEvent>) -> Result<Self, ApplyError> {
        ProductState::create(envelope)
    }
    fn apply(&mut self, envelope: &Envelope<ProductEvent>) -> Result<(), ApplyError> {
        ProductState::apply(self, envelope)
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Fold for UserState {
    type Event = UserEvent;
    fn create(envelope: &Envelope<UserEvent>) -> Result<Self, ApplyError> {
        UserState::create(envelope)
    }
    fn apply(&mut self, envelope: &Envelope<UserEvent>) -> Result<(), ApplyError> {
        UserState::apply(self, envelope)
    }
    fn version(&self) -> u64 {
        self.version
    }
}

/// What happened to one event offered to a stream.
enum Step {
    Applied,
    Duplicate,
    Parked,
    Rejected(ApplyError),
}

impl<S: Fold> Stream<S> {
    fn offer(&mut self, envelope: &Envelope<S::Event>) -> Step {
        let result = match &mut self.state {
            None => S::create(envelope).map(|s| self.state = Some(s)),
            Some(state) => state.apply(envelope),
        };
        match result {
            Ok(()) => {
                self.dirty = true;
                self.applied.push(envelope.to_wire());
                Step::Applied
            }
            Err(ApplyError::AlreadyApplied { .. }) => Step::Duplicate,
            Err(ApplyError::Gap { .. } | ApplyError::NotACreation(_)) => {
                let sequence = envelope.sequence;
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    self.parked.entry(sequence)
                {
                    slot.insert(
                        serde_json::to_value(envelope.to_wire()).expect("envelope serialises"),
                    );
                    self.parked_added.insert(sequence);
                    self.parked_removed.remove(&sequence);
                }
                Step::Parked
            }
            Err(e @ (ApplyError::NotFirst(_) | ApplyError::AfterDeletion(_))) => Step::Rejected(e),
        }
    }

    /// Applies parked events that are now next in line.
    fn drain_parked(&mut self, report: &mut BatchReport) {
        loop {
            let next = self.version() + 1;
            let Some(json) = self.parked.get(&next) else {
                return;
            };
            // It was read once to be parked; if it cannot be read now (a build that no longer
            // knows its schema), it stays parked, and so does its stream, instead of vanishing.
            let envelope = match serde_json::from_value::<events::WireEnvelope>(json.clone())
                .map_err(events::DecodeError::from)
                .and_then(Envelope::<S::Event>::from_wire)
            {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::error!(
                        event.sequence = next,
                        %error,
                        "a parked event cannot be read; it stays parked and its stream waits"
                    );
                    return;
                }
            };
            self.parked.remove(&next);
            self.parked_added.remove(&next);
            self.parked_removed.insert(next);
            if matches!(self.offer(&envelope), Step::Applied) {
                report.applied += 1;
                report.parked = report.parked.saturating_sub(1);
            }
        }
    }

    fn version(&self) -> u64 {
        self.state.as_ref().map_or(0, S::version)
    }
}

/// Applies `batch` (messages in consumption order) inside `tx` and records the new offsets.
///
/// Returns what it did and the positions now stored (every partition of this consumer).
pub async fn apply_batch(
    tx: &Transaction<'_>,
    consumer: &str,
    batch: &[OwnedMessage],
) -> Result<(BatchReport, Positions), tokio_postgres::Error> {
    let mut report = BatchReport::default();
    let stored: Positions = stored_positions(tx, None, consumer).await?;

    // Decode what is new; remember the next offset per partition.
    let mut next_offsets: HashMap<(String, i32), i64> = HashMap::new();
    let mut decoded = Vec::with_capacity(batch.len());
    for message in batch {
        let tp = (message.topic().to_owned(), message.partition());
        let next = next_offsets
            .entry(tp.clone())
            .or_insert(message.offset() + 1);
        *next = (*next).max(message.offset() + 1);
        if stored.get(&tp).is_some_and(|&n| message.offset() < n) {
            report.duplicates += 1;
            continue;
        }
        let result = message
            .payload()
            .ok_or_else(|| "message has no payload".to_owned())
            .and_then(|p| AnyEnvelope::from_json(p).map_err(|e| e.to_string()));
        decoded.push((message, result));
    }

    let product_ids: Vec<Uuid> = ids(&decoded, |e| matches!(e, AnyEnvelope::Product(_)));
    let user_ids: Vec<Uuid> = ids(&decoded, |e| matches!(e, AnyEnvelope::User(_)));
    // Four reads, pipelined on the one connection (one round trip's wait, not four).
    let (mut products, mut users, product_parked, user_parked) = futures::try_join!(
        load(
            tx,
            "products",
            PRODUCT_COLUMNS,
            &product_ids,
            product_from_row,
            |p| p.id
        ),
        load(tx, "users", USER_COLUMNS, &user_ids, user_from_row, |u| u
            .id),
        load_parked(tx, &product_ids),
        load_parked(tx, &user_ids),
    )?;
    attach_parked(&mut products, product_parked);
    attach_parked(&mut users, user_parked);

    for (message, result) in decoded {
        let envelope = match result {
            Ok(envelope) => envelope,
            Err(reason) => {
                reject(tx, consumer, message, &reason).await?;
                report.rejected += 1;
                continue;
            }
        };
        let kind = envelope.kind();
        let span = tracing::info_span!(
            "projector.event",
            kafka.topic = message.topic(),
            kafka.partition = message.partition(),
            kafka.offset = message.offset(),
            event.r#type = kind.event_type,
            event.aggregate_id = %kind.aggregate_id,
            event.sequence = kind.sequence,
        );
        let _entered = span.enter();
        let step = match &envelope {
            AnyEnvelope::Product(e) => {
                offer(products.entry(e.aggregate_id).or_default(), e, &mut report)
            }
            AnyEnvelope::User(e) => offer(users.entry(e.aggregate_id).or_default(), e, &mut report),
        };
        match step {
            Step::Applied => tracing::debug!("event applied"),
            Step::Duplicate => {
                report.duplicates += 1;
                tracing::debug!("event already applied; ignored");
            }
            Step::Parked => {
                report.parked += 1;
                tracing::warn!("event arrived before its predecessor; parked");
            }
            Step::Rejected(e) => {
                drop(_entered);
                reject(tx, consumer, message, &e.to_string()).await?;
                report.rejected += 1;
            }
        }
    }

    let mut dirty_products: Vec<&ProductState> = Vec::new();
    let mut history = History::default();
    for stream in products.values() {
        if let (true, Some(state)) = (stream.dirty, &stream.state) {
            dirty_products.push(state);
            report.changed_products.push((state.id, state.version));
        }
        for wire in &stream.applied {
            history.push(wire);
        }
    }
    let dirty_users: Vec<&UserState> = users
        .values()
        .filter(|s| s.dirty)
        .filter_map(|s| s.state.as_ref())
        .collect();
    let mut parked = ParkedChanges::default();
    parked.collect(&products);
    parked.collect(&users);

    let mut positions = stored;
    let mut offsets = Offsets::default();
    for ((topic, partition), next) in next_offsets {
        let position = positions.entry((topic.clone(), partition)).or_insert(next);
        *position = (*position).max(next);
        offsets.topics.push(topic);
        offsets.partitions.push(partition);
        offsets.next.push(next);
    }

    // Every write of the batch is one set-based prepared statement per table, and they are pipelined:
    // the batch costs a handful of round trips whatever its size.
    futures::try_join!(
        upsert_products(tx, &dirty_products),
        history.insert(tx),
        upsert_users(tx, &dirty_users),
        parked.write(tx),
        offsets.write(tx, consumer),
        announce(tx, report.applied > 0),
    )?;
    Ok((report, positions))
}

pub use platform::read_model::stored_positions;

fn offer<S: Fold>(
    stream: &mut Stream<S>,
    envelope: &Envelope<S::Event>,
    report: &mut BatchReport,
) -> Step {
    let step = stream.offer(envelope);
    if matches!(step, Step::Applied) {
        report.applied += 1;
        stream.drain_parked(report);
    }
    step
}

fn ids(
    decoded: &[(&OwnedMessage, Result<AnyEnvelope, String>)],
    pick: impl Fn(&AnyEnvelope) -> bool,
) -> Vec<Uuid> {
    let set: HashSet<Uuid> = decoded
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|e| pick(e))
        .map(|e| e.kind().aggregate_id)
        .collect();
    set.into_iter().collect()
}

async fn load<S>(
    tx: &Transaction<'_>,
    table: &str,
    columns: &str,
    ids: &[Uuid],
    from_row: fn(&tokio_postgres::Row) -> S,
    id_of: fn(&S) -> Uuid,
) -> Result<HashMap<Uuid, Stream<S>>, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    // FOR UPDATE: during a rebalance two projectors may briefly hold the same partition; the second
    // waits here and then sees the first one's rows, so it recognises the events as applied.
    // ORDER BY id: rows are locked in one order by every projector, so two cannot deadlock on them.
    let statement = tx
        .prepare_cached(&format!(
            "SELECT {columns} FROM {table} WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .await?;
    let rows = tx.query(&statement, &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let state = from_row(row);
            (
                id_of(&state),
                Stream {
                    state: Some(state),
                    ..Stream::default()
                },
            )
        })
        .collect())
}

/// Parked events of the streams `ids`: (aggregate id, sequence, envelope).
async fn load_parked(
    tx: &Transaction<'_>,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, u64, serde_json::Value)>, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached(
            "SELECT aggregate_id, sequence, envelope FROM projection_parked_events
              WHERE aggregate_id = ANY($1) ORDER BY aggregate_id, sequence FOR UPDATE",
        )
        .await?;
    Ok(tx
        .query(&statement, &[&ids])
        .await?
        .iter()
        .map(|row| {
            let Json(envelope): Json<serde_json::Value> = row.get(2);
            (
                row.get(0),
                u64::try_from(row.get::<_, i64>(1)).unwrap_or_default(),
                envelope,
            )
        })
        .collect())
}

fn attach_parked<S: Fold>(
    streams: &mut HashMap<Uuid, Stream<S>>,
    parked: Vec<(Uuid, u64, serde_json::Value)>,
) {
    for (id, sequence, envelope) in parked {
        let stream = streams.entry(id).or_default();
        // A parked event the stream has already passed (its copy arrived and was applied in order)
        // can never apply: it is removed, not kept forever.
        if sequence <= stream.version() {
            stream.parked_removed.insert(sequence);
            continue;
        }
        stream.parked.insert(sequence, envelope);
    }
}

/// Announces the batch to readers waiting for the projection (`platform::db::projection_commits`):
/// PostgreSQL delivers the notification when the transaction commits, and never if it rolls back.
async fn announce(tx: &Transaction<'_>, changed: bool) -> Result<(), tokio_postgres::Error> {
    if !changed {
        return Ok(());
    }
    let statement = tx
        .prepare_cached("SELECT pg_notify(left('catalog_projected_' || current_schema(), 63), '')")
        .await?;
    tx.execute(&statement, &[]).await?;
    Ok(())
}

/// Rows for `product_events`, as columns.
#[derive(Default)]
struct History<'a> {
    ids: Vec<Uuid>,
    sequences: Vec<i64>,
    event_ids: Vec<Uuid>,
    types: Vec<&'a str>,
    occurred: Vec<chrono::DateTime<chrono::Utc>>,
    envelopes: Vec<Json<&'a events::WireEnvelope>>,
}

impl<'a> History<'a> {
    fn push(&mut self, wire: &'a events::WireEnvelope) {
        self.ids.push(wire.aggregate_id);
        self.sequences
            .push(i64::try_from(wire.sequence).unwrap_or(i64::MAX));
        self.event_ids.push(wire.event_id);
        self.types.push(&wire.event_type);
        self.occurred.push(wire.occurred_at);
        self.envelopes.push(Json(wire));
    }

    async fn insert(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let statement = tx
            .prepare_cached(
                "INSERT INTO product_events
                    (aggregate_id, sequence, event_id, event_type, occurred_at, envelope)
                 SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::text[],
                                      $5::timestamptz[], $6::jsonb[])
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(
            &statement,
            &[
                &self.ids,
                &self.sequences,
                &self.event_ids,
                &self.types,
                &self.occurred,
                &self.envelopes,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Parked events to delete (now applied) and to insert (newly parked), as columns.
#[derive(Default)]
struct ParkedChanges<'a> {
    removed_ids: Vec<Uuid>,
    removed_sequences: Vec<i64>,
    added_ids: Vec<Uuid>,
    added_sequences: Vec<i64>,
    added_envelopes: Vec<Json<&'a serde_json::Value>>,
}

impl<'a> ParkedChanges<'a> {
    fn collect<S>(&mut self, streams: &'a HashMap<Uuid, Stream<S>>) {
        for (id, stream) in streams {
            for &sequence in &stream.parked_removed {
                self.removed_ids.push(*id);
                self.removed_sequences
                    .push(i64::try_from(sequence).unwrap_or(i64::MAX));
            }
            for sequence in &stream.parked_added {
                self.added_ids.push(*id);
                self.added_sequences
                    .push(i64::try_from(*sequence).unwrap_or(i64::MAX));
                self.added_envelopes.push(Json(&stream.parked[sequence]));
            }
        }
    }

    async fn write(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if !self.removed_ids.is_empty() {
            let statement = tx
                .prepare_cached(
                    "DELETE FROM projection_parked_events p
                      USING unnest($1::uuid[], $2::int8[]) AS d(aggregate_id, sequence)
                      WHERE p.aggregate_id = d.aggregate_id AND p.sequence = d.sequence",
                )
                .await?;
            tx.execute(&statement, &[&self.removed_ids, &self.removed_sequences])
                .await?;
        }
        if !self.added_ids.is_empty() {
            let statement = tx
                .prepare_cached(
                    "INSERT INTO projection_parked_events (aggregate_id, sequence, envelope)
                     SELECT * FROM unnest($1::uuid[], $2::int8[], $3::jsonb[])
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            tx.execute(
                &statement,
                &[
                    &self.added_ids,
                    &self.added_sequences,
                    &self.added_envelopes,
                ],
            )
            .await?;
        }
        Ok(())
    }
}

/// The next offset of each partition in the batch, as columns.
#[derive(Default)]
struct Offsets {
    topics: Vec<String>,
    partitions: Vec<i32>,
    next: Vec<i64>,
}

impl Offsets {
    async fn write(
        &self,
        tx: &Transaction<'_>,
        consumer: &str,
    ) -> Result<(), tokio_postgres::Error> {
        if self.topics.is_empty() {
            return Ok(());
        }
        let statement = tx
            .prepare_cached(
                "INSERT INTO projection_offsets (consumer, topic, partition, next_offset)
                 SELECT $1, * FROM unnest($2::text[], $3::int4[], $4::int8[])
                 ON CONFLICT (consumer, topic, partition) DO UPDATE
                    SET next_offset = GREATEST(projection_offsets.next_offset, EXCLUDED.next_offset),
                        updated_at = now()",
            )
            .await?;
        tx.execute(
            &statement,
            &[&consumer, &self.topics, &self.partitions, &self.next],
        )
        .await?;
        Ok(())
    }
}

/// Keeps `message` in `projection_rejected` with `reason` and moves its partition's stored offset past
/// it, in `tx`: for a message the database refused when applied alone.
pub async fn reject_alone(
    tx: &Transaction<'_>,
    consumer: &str,
    message: &OwnedMessage,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    reject(tx, consumer, message, reason).await?;
    Offsets {
        topics: vec![message.topic().to_owned()],
        partitions: vec![message.partition()],
        next: vec![message.offset() + 1],
    }
    .write(tx, consumer)
    .await
}

async fn reject(
    tx: &Transaction<'_>,
    consumer: &str,
    message: &OwnedMessage,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    tracing::error!(
        kafka.topic = message.topic(),
        kafka.partition = message.partition(),
        kafka.offset = message.offset(),
        reason,
        "message cannot be projected; kept in projection_rejected"
    );
    tx.execute(
        "INSERT INTO projection_rejected (consumer, topic, partition, \"offset\", key, payload, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        &[
            &consumer,
            &message.topic(),
            &message.partition(),
            &message.offset(),
            &message.key(),
            &message.payload(),
            &reason,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_event_that_cannot_be_read_stays_parked() {
        let mut stream: Stream<events::ProductState> = Stream::default();
        stream
            .parked
            .insert(1, serde_json::json!({"not": "an envelope"}));
        stream.parked_added.insert(1);
        let mut report = BatchReport::default();
        stream.drain_parked(&mut report);
        assert!(stream.parked.contains_key(&1), "kept, not dropped");
        assert!(stream.parked_added.contains(&1), "still written as parked");
        assert!(
            stream.parked_removed.is_empty(),
            "not deleted from the table"
        );
        assert_eq!(report.applied, 0);
    }
}
