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
/// empty list, so every product stream has the same shape); later ones come from an edit that added
/// images (`ProductUpdated`) or from a re-drive of images that failed. The `ImagesProcessed` that
/// answers it comes at some later sequence and names it by event id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesRequested {
    /// The images to process.
    pub images: Vec<ImageRef>,
}

/// Outcome of one source image in an [`ImagesProcessed`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageOutcomeStatus {
    /// Variants were stored; see `variants`.
    Ready,
    /// The image could not be processed; see `error_class` and `reason`.
    Failed,
}

/// One stored rendition of a source image.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// A BlurHash (<https://blurha.sh>) of the thumbnail, for clients to paint before the image loads
    /// (ready images; optional: absent in events written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
}

/// The image worker finished the job of one `ImagesRequested`: every image of it is ready or failed.
///
/// Appended at the next free sequence of the product stream when the job ends (events may come between
/// the request and its answer). A job answers its request once: the event store refuses a second answer
/// to the same `request_event_id`, so a job run twice appends one event. Outcomes apply by URL to the
/// images still waiting for them; an image removed by an edit meanwhile ignores its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesProcessed {
    /// Sequence of the `ImagesRequested` this answers.
    pub request_sequence: u64,
    /// Event id of the `ImagesRequested` this answers (absent in events appended before edits existed,
    /// which always answered the request at `request_sequence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_event_id: Option<Uuid>,
    /// One outcome per requested image, by position at request time.
    pub images: Vec<ImageOutcome>,
}

/// Fields of a product were changed by its owner. Carries only the fields that changed.
///
/// A change of `product_images` keeps what is known of every URL still listed (a processed image keeps
/// its variants, whatever its new position), drops the images and variants of URLs no longer listed,
/// and is followed by an `ImagesRequested` for the URLs that are new.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProductUpdated {
    /// New name, if it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
    /// New description, if it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_description: Option<String>,
    /// New price (exact, as a JSON string), if it changed; the currency does not change.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub product_price: Option<Decimal>,
    /// The new list of source image URLs, in order, if it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_images: Option<Vec<String>>,
}

/// The product was withdrawn by its owner: the last event of its stream. Its history stays readable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProductDeleted {}

/// Every event of a product stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductEvent {
    /// See [`ProductCreated`].
    Created(ProductCreated),
    /// See [`ImagesRequested`].
    ImagesRequested(ImagesRequested),
    /// See [`ImagesProcessed`].
    ImagesProcessed(ImagesProcessed),
    /// See [`ProductUpdated`].
    Updated(ProductUpdated),
    /// See [`ProductDeleted`].
    Deleted(ProductDeleted),
}

impl DomainEvent for ProductEvent {
    const AGGREGATE_TYPE: AggregateType = AggregateType::Product;

    fn event_type(&self) -> &'static str {
        match self {
            ProductEvent::Created(_) => "ProductCreated",
            ProductEvent::ImagesRequested(_) => "ImagesRequested",
            ProductEvent::ImagesProcessed(_) => "ImagesProcessed",
            ProductEvent::Updated(_) => "ProductUpdated",
            ProductEvent::Deleted(_) => "ProductDeleted",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            ProductEvent::Created(_) => 2,
            ProductEvent::ImagesRequested(_)
            | ProductEvent::ImagesProcessed(_)
            | ProductEvent::Updated(_)
            | ProductEvent::Deleted(_) => 1,
        }
    }

    fn to_data(&self) -> Value {
        match self {
            ProductEvent::Created(e) => serde_json::to_value(e),
            ProductEvent::ImagesRequested(e) => serde_json::to_value(e),
            ProductEvent::ImagesProcessed(e) => serde_json::to_value(e),
            ProductEvent::Updated(e) => serde_json::to_value(e),
            ProductEvent::Deleted(e) => serde_json::to_value(e),
        }
        .expect("event payload serialises")
    }

    fn from_data(event_type: &str, data: Value) -> Result<Self, DecodeError> {
        match event_type {
            "ProductCreated" => Ok(ProductEvent::Created(serde_json::from_value(data)?)),
            "ImagesRequested" => Ok(ProductEvent::ImagesRequested(serde_json::from_value(data)?)),
            "ImagesProcessed" => Ok(ProductEvent::ImagesProcessed(serde_json::from_value(data)?)),
            "ProductUpdated" => Ok(ProductEvent::Updated(serde_json::from_value(data)?)),
            "ProductDeleted" => Ok(ProductEvent::Deleted(serde_json::from_value(data)?)),
            other => Err(DecodeError::UnknownEventType {
                aggregate_type: AggregateType::Product,
                event_type: other.to_owned(),
            }),
        }
    }
}
