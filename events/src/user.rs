//! Events of the user aggregate.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AggregateType, DecodeError, DomainEvent};

/// A user signed up. Always sequence 1 of a user stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// Display name, trimmed, 1–100 characters.
    pub name: String,
    /// E-mail address as given (trimmed); compared case-insensitively.
    pub email: String,
}

/// Every event of a user stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    /// See [`UserRegistered`].
    Registered(UserRegistered),
}

impl DomainEvent for UserEvent {
    const AGGREGATE_TYPE: AggregateType = AggregateType::User;

    fn event_type(&self) -> &'static str {
        match self {
            UserEvent::Registered(_) => "UserRegistered",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            UserEvent::Registered(_) => 1,
        }
    }

    fn to_data(&self) -> Value {
        match self {
            UserEvent::Registered(e) => serde_json::to_value(e),
        }
        .expect("event payload serialises")
    }

    fn from_data(event_type: &str, data: Value) -> Result<Self, DecodeError> {
        match event_type {
            "UserRegistered" => Ok(UserEvent::Registered(serde_json::from_value(data)?)),
            other => Err(DecodeError::UnknownEventType {
                aggregate_type: AggregateType::User,
                event_type: other.to_owned(),
            }),
        }
    }
}
