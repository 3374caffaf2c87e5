//! Kafka header names and values for an event.
//!
//! The envelope metadata travels twice: in the JSON body, and as headers so that a consumer (or a
//! generic tool) can route and filter without parsing the body. The header names follow the CloudEvents
//! Kafka protocol binding (`ce_` prefix, lower-case extension attribute names).

use crate::WireEnvelope;

/// Header names used on every event message.
pub mod header_names {
    /// CloudEvents spec version, always `1.0`.
    pub const SPEC_VERSION: &str = "ce_specversion";
    /// Event id (UUID).
    pub const ID: &str = "ce_id";
    /// The service that produced the event, e.g. `/catalog/api`.
    pub const SOURCE: &str = "ce_source";
    /// Event type, e.g. `ProductCreated`.
    pub const TYPE: &str = "ce_type";
    /// When the fact happened, RFC 3339.
    pub const TIME: &str = "ce_time";
    /// The aggregate id (also the message key).
    pub const SUBJECT: &str = "ce_subject";
    /// Extension: aggregate type (`user`, `product`).
    pub const AGGREGATE_TYPE: &str = "ce_aggregatetype";
    /// Extension: sequence of the event in its aggregate's stream.
    pub const SEQUENCE: &str = "ce_sequence";
    /// Extension: schema version of the payload.
    pub const SCHEMA_VERSION: &str = "ce_schemaversion";
    /// Content type of the body, `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
}

/// One header: a static name and its value.
pub type HeaderName = &'static str;

impl WireEnvelope {
    /// The headers to put on the Kafka message carrying this envelope, in a fixed order.
    pub fn headers(&self, source: &str) -> Vec<(HeaderName, String)> {
        use header_names::*;
        vec![
            (SPEC_VERSION, "1.0".to_owned()),
            (ID, self.event_id.to_string()),
            (SOURCE, source.to_owned()),
            (TYPE, self.event_type.clone()),
            (
                TIME,
                self.occurred_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
            (SUBJECT, self.aggregate_id.to_string()),
            (AGGREGATE_TYPE, self.aggregate_type.as_str().to_owned()),
            (SEQUENCE, self.sequence.to_string()),
            (SCHEMA_VERSION, self.schema_version.to_string()),
            (CONTENT_TYPE, "application/json".to_owned()),
        ]
    }
}
