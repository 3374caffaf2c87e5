//! Upcasters: read every schema version ever published as the current one.
//!
//! A change to an event's JSON that is not purely additive gets a new schema version and one step here
//! that rewrites the previous version's `data` into the new shape. Consumers only ever see the current
//! shape, and the log is never rewritten.

use serde_json::Value;

use crate::{AggregateType, DecodeError};

/// The newest schema version of each event type this build knows, or `None` for an unknown type.
fn newest_version(aggregate_type: AggregateType, event_type: &str) -> Option<u32> {
    match (aggregate_type, event_type) {
        (AggregateType::User, "UserRegistered") => Some(1),
        (AggregateType::Product, "ProductCreated" | "ImagesRequested" | "ImagesProcessed") => {
            Some(1)
        }
        _ => None,
    }
}

/// Brings `data` of `event_type` at `version` up to the newest schema version, one step at a time.
pub fn upcast(
    aggregate_type: AggregateType,
    event_type: &str,
    version: u32,
    data: Value,
) -> Result<Value, DecodeError> {
    let newest = newest_version(aggregate_type, event_type).ok_or_else(|| {
        DecodeError::UnknownEventType {
            aggregate_type,
            event_type: event_type.to_owned(),
        }
    })?;
    if version == 0 || version > newest {
        return Err(DecodeError::UnsupportedVersion {
            event_type: event_type.to_owned(),
            found: version,
            newest,
        });
    }
    // Every event type is still at version 1: there is no step to apply yet. A step is written as
    // `(AggregateType::Product, "ProductCreated", 1) => v1_to_v2(data)` in a loop up to `newest`.
    Ok(data)
}
