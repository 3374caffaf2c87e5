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
    /// ISO 4217 currency of the price (schema version 2; version 1 events were all in `EUR`).
    pub currency: String,
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
/// Follows the `ProductCreated` that named them (sequence 2; a product without images has one with an
/// empty list, so every product stream has the same shape), or is appended later by a re-drive from
/// the dead-letter topic for the images that failed. Its sequence + 1 is reserved for the
/// `ImagesProcessed` that answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesRequested {
    /// The images to process.
    pub images: Vec<ImageRef>,
}

/// Outcome of one source image in an [`ImagesProcessed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageOutcomeStatus {
    /// Variants were stored; see `variants`.
    Ready,
    /// The image could not be processed; see `error_class` and `reason`.
    Failed,
}

/// One stored rendition of a source image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVariant {
    /// Position of the source image in `product_images`.
    pub position: u32,
    /// Variant name, e.g. `thumb` or `large`.
    pub variant: String,
    /// Encoding: `webp` or `jpeg`.
    pub format: String,
    /// Where the variant can be fetched.
    pub url: String,
    /// Object key in the image store (content-addressed: hash of the source bytes and the settings).
    pub key: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Size of the encoded file in bytes.
    pub bytes: u64,
}

/// What happened to one source image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOutcome {
    /// Position of the source image in `product_images`.
    pub position: u32,
    /// The source URL.
    pub url: String,
    /// Ready or failed.
    pub status: ImageOutcomeStatus,
    /// The stored variants (empty when failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<ImageVariant>,
    /// Machine-readable failure class, e.g. `http_4xx`, `not_an_image`, `too_large`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// Why it failed, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The image worker finished the job of one `ImagesRequested`: every image of it is ready or failed.
///
/// Always at the sequence right after the `ImagesRequested` it answers (`request_sequence + 1`), with
/// the id that sequence implies, so a job run twice produces the same event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesProcessed {
    /// Sequence of the `ImagesRequested` this answers.
    pub request_sequence: u64,
    /// One outcome per requested image, by position.
    pub images: Vec<ImageOutcome>,
}

/// Every event of a product stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductEvent {
    /// See [`ProductCreated`].
    Created(ProductCreated),
    /// See [`ImagesRequested`].
    ImagesRequested(ImagesRequested),
    /// See [`ImagesProcessed`].
    ImagesProcessed(ImagesProcessed),
}

impl DomainEvent for ProductEvent {
    const AGGREGATE_TYPE: AggregateType = AggregateType::Product;

    fn event_type(&self) -> &'static str {
        match self {
            ProductEvent::Created(_) => "ProductCreated",
            ProductEvent::ImagesRequested(_) => "ImagesRequested",
            ProductEvent::ImagesProcessed(_) => "ImagesProcessed",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            ProductEvent::Created(_) => 2,
            ProductEvent::ImagesRequested(_) | ProductEvent::ImagesProcessed(_) => 1,
        }
    }

    fn to_data(&self) -> Value {
        match self {
            ProductEvent::Created(e) => serde_json::to_value(e),
            ProductEvent::ImagesRequested(e) => serde_json::to_value(e),
            ProductEvent::ImagesProcessed(e) => serde_json::to_value(e),
        }
        .expect("event payload serialises")
    }

    fn from_data(event_type: &str, data: Value) -> Result<Self, DecodeError> {
        match event_type {
            "ProductCreated" => Ok(ProductEvent::Created(serde_json::from_value(data)?)),
            "ImagesRequested" => Ok(ProductEvent::ImagesRequested(serde_json::from_value(data)?)),
            "ImagesProcessed" => Ok(ProductEvent::ImagesProcessed(serde_json::from_value(data)?)),
            other => Err(DecodeError::UnknownEventType {
                aggregate_type: AggregateType::Product,
                event_type: other.to_owned(),
            }),
        }
    }
}
