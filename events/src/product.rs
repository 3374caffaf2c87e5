//! Events of the product aggregate.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{AggregateType, DecodeError, DomainEvent};

/// A product was created by a user. Always sequence 1 of a product stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductCreated {
    /// The owning user.
    pub user_id: Uuid,
    /// Name, trimmed, 1–200 characters.
    pub product_name: String,
    /// Free text, at most 5000 characters (may be empty).
    pub product_description: String,
    /// Exact price with at most two decimal places, as a JSON string (`"19.99"`), never a float.
    #[serde(with = "rust_decimal::serde::str")]
    pub product_price: Decimal,
    /// Source image URLs (http/https) in the order the client gave them.
    pub product_images: Vec<String>,
}

/// One source image to process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Position of the image in `product_images`, from 0.
    pub position: u32,
    /// The source URL.
    pub url: String,
}

/// The images of a product were submitted for processing (the image worker's job).
///
/// Follows the `ProductCreated` that named them; a product without images has one with an empty list,
/// so every product stream has the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesRequested {
    /// The images to process.
    pub images: Vec<ImageRef>,
}

/// Every event of a product stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductEvent {
    /// See [`ProductCreated`].
    Created(ProductCreated),
    /// See [`ImagesRequested`].
    ImagesRequested(ImagesRequested),
}

impl DomainEvent for ProductEvent {
    const AGGREGATE_TYPE: AggregateType = AggregateType::Product;

    fn event_type(&self) -> &'static str {
        match self {
            ProductEvent::Created(_) => "ProductCreated",
            ProductEvent::ImagesRequested(_) => "ImagesRequested",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            ProductEvent::Created(_) | ProductEvent::ImagesRequested(_) => 1,
        }
    }

    fn to_data(&self) -> Value {
        match self {
            ProductEvent::Created(e) => serde_json::to_value(e),
            ProductEvent::ImagesRequested(e) => serde_json::to_value(e),
        }
        .expect("event payload serialises")
    }

    fn from_data(event_type: &str, data: Value) -> Result<Self, DecodeError> {
        match event_type {
            "ProductCreated" => Ok(ProductEvent::Created(serde_json::from_value(data)?)),
            "ImagesRequested" => Ok(ProductEvent::ImagesRequested(serde_json::from_value(data)?)),
            other => Err(DecodeError::UnknownEventType {
                aggregate_type: AggregateType::Product,
                event_type: other.to_owned(),
            }),
        }
    }
}
