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
        (AggregateType::Product, "ProductCreated") => Some(2),
        (
            AggregateType::Product,
            "ImagesRequested" | "ImagesProcessed" | "ProductUpdated" | "ProductDeleted",
        ) => Some(1),
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
    let mut data = data;
    for from in version..newest {
        data = match (aggregate_type, event_type, from) {
            (AggregateType::Product, "ProductCreated", 1) => product_created_v1_to_v2(data),
            // Every other (type, version) below the newest would need a step here.
            _ => data,
        };
    }
    Ok(data)
}

/// `ProductCreated` v2 names the price's currency. Every v1 price was in euros.
fn product_created_v1_to_v2(mut data: Value) -> Value {
    if let Value::Object(fields) = &mut data {
        fields
            .entry("currency")
            .or_insert_with(|| Value::String("EUR".to_owned()));
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_product_created_reads_as_v2_in_euros() {
        let v1 = serde_json::json!({"user_id": "x", "product_price": "1.00"});
        let v2 = upcast(AggregateType::Product, "ProductCreated", 1, v1).unwrap();
        assert_eq!(v2["currency"], "EUR");
        assert_eq!(v2["product_price"], "1.00");
        let current = serde_json::json!({"currency": "USD"});
        assert_eq!(
            upcast(AggregateType::Product, "ProductCreated", 2, current.clone()).unwrap(),
            current
        );
    }
}
