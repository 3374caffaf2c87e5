//! The envelope every event travels in, and decoding from the wire with upcasting.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{ProductEvent, UserEvent, upcast};

/// Namespace of the UUIDv5 event ids, so that the same (aggregate, sequence) always names the same event.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a4e_9b7d_4c1e_8a35_0d2f_7e91_b4c6);

/// The deterministic id of the event at `sequence` in the stream of `aggregate_id`.
///
/// A command that is re-sent (client retry with the same `Idempotency-Key`, outbox relay after a crash)
/// produces byte-identical events with the same ids, which is what lets every consumer deduplicate.
pub fn event_id_for(aggregate_id: Uuid, sequence: u64) -> Uuid {
    Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{aggregate_id}/{sequence}").as_bytes(),
    )
}

/// Which kind of aggregate a stream belongs to; each has its own topic.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateType {
    /// A user (`UserRegistered`, …), on the users topic.
    User,
    /// A product (`ProductCreated`, `ImagesRequested`, …), on the products topic.
    Product,
}

impl AggregateType {
    /// The name used on the wire and in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::User => "user",
            AggregateType::Product => "product",
        }
    }
}

/// Why bytes from a topic could not be read as an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a JSON envelope of the expected shape.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The envelope names an event type this version of the contract does not know.
    #[error("unknown event type {event_type:?} for aggregate {aggregate_type:?}")]
    UnknownEventType {
        /// Aggregate type named in the envelope.
        aggregate_type: AggregateType,
        /// Event type named in the envelope.
        event_type: String,
    },
    /// The schema version is newer than this build understands (upgrade the consumer).
    #[error("event type {event_type} has schema version {found}, newest known is {newest}")]
    UnsupportedVersion {
        /// Event type named in the envelope.
        event_type: String,
        /// Schema version found.
        found: u32,
        /// Newest version this build knows.
        newest: u32,
    },
    /// The envelope says one aggregate type, the caller expected another.
    #[error("expected a {expected:?} event, got a {found:?} event")]
    WrongAggregate {
        /// What the caller asked for.
        expected: AggregateType,
        /// What the envelope says.
        found: AggregateType,
    },
    /// Sequence numbers start at 1.
    #[error("sequence must be at least 1")]
    ZeroSequence,
}

/// An event payload of one aggregate type: an enum with one variant per event type.
pub trait DomainEvent: Sized {
    /// The aggregate type whose stream these events belong to.
    const AGGREGATE_TYPE: AggregateType;
    /// The event type name on the wire, e.g. `ProductCreated`.
    fn event_type(&self) -> &'static str;
    /// The schema version this build writes for this event type.
    fn schema_version(&self) -> u32;
    /// The payload as JSON (`data` in the envelope).
    fn to_data(&self) -> Value;
    /// Reads a payload that [`upcast`] has already brought to the current schema version.
    fn from_data(event_type: &str, data: Value) -> Result<Self, DecodeError>;
}

/// The envelope exactly as it is on the wire (JSON body of every Kafka message).
///
/// `data` is the payload at `schema_version`; readers go through [`Envelope::from_wire`], which upcasts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEnvelope {
    /// Unique, deterministic id of the event (see [`event_id_for`]).
    pub event_id: Uuid,
    /// Event type name, e.g. `ProductCreated`.
    pub event_type: String,
    /// Version of the payload schema for this event type.
    pub schema_version: u32,
    /// Aggregate type of the stream.
    pub aggregate_type: AggregateType,
    /// Id of the aggregate; also the Kafka message key.
    pub aggregate_id: Uuid,
    /// Position of the event in its aggregate's stream, from 1, without gaps.
    pub sequence: u64,
    /// When the fact happened (RFC 3339, UTC, always six fractional digits).
    #[serde(with = "rfc3339_micros")]
    pub occurred_at: DateTime<Utc>,
    /// Id of the request or event that caused this one, for tracing across services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Who caused the event (audit trail): a user id, `admin:<key id>`, or `system:image-worker` /
    /// `system:redrive`. Optional: events written before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The payload.
    pub data: Value,
}

/// A decoded event with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<E> {
    /// Unique, deterministic id of the event.
    pub event_id: Uuid,
    /// Id of the aggregate whose stream this event is in.
    pub aggregate_id: Uuid,
    /// Position in the aggregate's stream, from 1.
    pub sequence: u64,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// Id of the request or event that caused this one.
    pub correlation_id: Option<String>,
    /// Who caused the event (see [`WireEnvelope::actor`]).
    pub actor: Option<String>,
    /// The payload.
    pub event: E,
}

impl<E: DomainEvent> Envelope<E> {
    /// A new event at `sequence` of `aggregate_id`, with its deterministic id.
    ///
    /// `occurred_at` is truncated to microseconds so it survives a round trip through PostgreSQL.
    pub fn new(
        aggregate_id: Uuid,
        sequence: u64,
        occurred_at: DateTime<Utc>,
        correlation_id: Option<String>,
        event: E,
    ) -> Self {
        let micros = occurred_at.timestamp_micros();
        let occurred_at = DateTime::from_timestamp_micros(micros).unwrap_or(occurred_at);
        Self {
            event_id: event_id_for(aggregate_id, sequence),
            aggregate_id,
            sequence,
            occurred_at,
            correlation_id,
            actor: None,
            event,
        }
    }

    /// The same event, recording who caused it.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// The envelope as it goes on the wire.
    pub fn to_wire(&self) -> WireEnvelope {
        WireEnvelope {
            event_id: self.event_id,
            event_type: self.event.event_type().to_owned(),
            schema_version: self.event.schema_version(),
            aggregate_type: E::AGGREGATE_TYPE,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id.clone(),
            actor: self.actor.clone(),
            data: self.event.to_data(),
        }
    }

    /// The JSON bytes of the wire envelope.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of plain fields and a `Value` cannot fail.
        serde_json::to_vec(&self.to_wire()).expect("envelope serialises")
    }

    /// Reads a wire envelope of this aggregate type, upcasting old schema versions.
    pub fn from_wire(wire: WireEnvelope) -> Result<Self, DecodeError> {
        if wire.aggregate_type != E::AGGREGATE_TYPE {
            return Err(DecodeError::WrongAggregate {
                expected: E::AGGREGATE_TYPE,
                found: wire.aggregate_type,
            });
        }
        if wire.sequence == 0 {
            return Err(DecodeError::ZeroSequence);
        }
        let data = upcast(
            wire.aggregate_type,
            &wire.event_type,
            wire.schema_version,
            wire.data,
        )?;
        Ok(Self {
            event_id: wire.event_id,
            aggregate_id: wire.aggregate_id,
            sequence: wire.sequence,
            occurred_at: wire.occurred_at,
            correlation_id: wire.correlation_id,
            actor: wire.actor,
            event: E::from_data(&wire.event_type, data)?,
        })
    }

    /// Reads JSON bytes of a wire envelope of this aggregate type.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::from_wire(serde_json::from_slice(bytes)?)
    }
}

/// An event of any aggregate type, for consumers that read several topics.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyEnvelope {
    /// An event of a user stream.
    User(Envelope<UserEvent>),
    /// An event of a product stream.
    Product(Envelope<ProductEvent>),
}

/// Just the routing facts of an event, whatever its aggregate type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKind {
    /// Aggregate type of the stream.
    pub aggregate_type: AggregateType,
    /// Event type name.
    pub event_type: &'static str,
    /// Aggregate id.
    pub aggregate_id: Uuid,
    /// Sequence in the aggregate's stream.
    pub sequence: u64,
}

impl AnyEnvelope {
    /// Reads JSON bytes of a wire envelope of any aggregate type.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        let wire: WireEnvelope = serde_json::from_slice(bytes)?;
        Ok(match wire.aggregate_type {
            AggregateType::User => AnyEnvelope::User(Envelope::from_wire(wire)?),
            AggregateType::Product => AnyEnvelope::Product(Envelope::from_wire(wire)?),
        })
    }

    /// The wire form of the event.
    pub fn to_wire(&self) -> WireEnvelope {
        match self {
            AnyEnvelope::User(e) => e.to_wire(),
            AnyEnvelope::Product(e) => e.to_wire(),
        }
    }

    /// Routing facts: aggregate, event type, sequence.
    pub fn kind(&self) -> EventKind {
        match self {
            AnyEnvelope::User(e) => EventKind {
                aggregate_type: AggregateType::User,
                event_type: e.event.event_type(),
                aggregate_id: e.aggregate_id,
                sequence: e.sequence,
            },
            AnyEnvelope::Product(e) => EventKind {
                aggregate_type: AggregateType::Product,
                event_type: e.event.event_type(),
                aggregate_id: e.aggregate_id,
                sequence: e.sequence,
            },
        }
    }
}

/// `occurred_at` on the wire: RFC 3339 in UTC with exactly six fractional digits, so the same instant is
/// always the same bytes.
mod rfc3339_micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}
