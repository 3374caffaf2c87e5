//! The catalog's public event contract.
//!
//! Everything another team may depend on lives here and nowhere else: the envelope every event travels
//! in, the payload of each event type, the upcasters that read old schema versions as the current one,
//! and the Kafka header names. The crate does no I/O so that any consumer can take it as a dependency.
//!
//! The JSON shape is a public, versioned contract: it changes only by adding optional fields or by a new
//! schema version with an upcaster (see [`upcast`]). `events/schemas/` holds a JSON Schema and
//! `events/examples/` an example for every event type; the crate's tests keep them in step with the code.

mod envelope;
mod headers;
mod product;
mod state;
mod upcast;
mod user;

pub use envelope::{
    AggregateType, AnyEnvelope, DecodeError, DomainEvent, Envelope, EventKind, WireEnvelope,
    event_id_for,
};
pub use headers::{HeaderName, header_names};
pub use product::{
    ImageOutcome, ImageOutcomeStatus, ImageRef, ImageVariant, ImagesProcessed, ImagesRequested,
    ProductCreated, ProductDeleted, ProductEvent, ProductUpdated,
};
pub use state::{ApplyError, ImageStatus, ImageStatusKind, ProductState, UserState};
pub use upcast::upcast;
pub use user::{UserEvent, UserRegistered};

/// Exact decimal type used for prices on the wire (serialised as a JSON string, e.g. `"19.99"`).
pub use rust_decimal::Decimal;
