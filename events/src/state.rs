//! The reference fold: how the state of a user or product follows from its events.
//!
//! Pure and synchronous. The projector applies it to rows, the API uses it to answer a command with the
//! state it will read back, and a downstream consumer can use it to know exactly what an event means.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Envelope, ImageOutcomeStatus, ImageVariant, ProductEvent, UserEvent};

/// Why an event cannot be applied to a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The event is at or below the state's version: already applied (a duplicate delivery).
    #[error("event {sequence} is already applied (state is at version {version})")]
    AlreadyApplied {
        /// Sequence of the event.
        sequence: u64,
        /// Version of the state.
        version: u64,
    },
    /// The event is further ahead than the next one: an earlier event has not arrived yet.
    #[error("event {sequence} is ahead of version {version}: an earlier event is missing")]
    Gap {
        /// Sequence of the event.
        sequence: u64,
        /// Version of the state.
        version: u64,
    },
    /// The event cannot start a stream (only a creation event can).
    #[error("{0} cannot be the first event of a stream")]
    NotACreation(&'static str),
    /// A creation event for a stream that already exists.
    #[error("{0} can only be the first event of a stream")]
    NotFirst(&'static str),
    /// An event after the product was deleted (a deletion is the last event of a stream).
    #[error("{0} cannot follow the deletion of the product")]
    AfterDeletion(&'static str),
}

/// Processing status of one source image.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatusKind {
    /// Requested, not yet processed.
    Pending,
    /// Processed; its variants are in `compressed_product_images`.
    Ready,
    /// Could not be processed; see `reason`.
    Failed,
}

/// One source image of a product and how far its processing got.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    /// Position in `product_images`, from 0.
    pub position: u32,
    /// The source URL.
    pub url: String,
    /// Processing status.
    pub status: ImageStatusKind,
    /// Machine-readable failure class, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// Why processing failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// BlurHash of the thumbnail, once the image is ready (see `ImageOutcome::placeholder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
}

/// A product as its events describe it; serialises as the API's product representation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductState {
    /// Product id (the aggregate id).
    pub id: Uuid,
    /// Owning user.
    pub user_id: Uuid,
    /// Name.
    pub product_name: String,
    /// Description.
    pub product_description: String,
    /// Exact price, serialised as a string with two decimals.
    #[serde(with = "rust_decimal::serde::str")]
    pub product_price: Decimal,
    /// ISO 4217 currency of the price.
    pub product_currency: String,
    /// Source image URLs, in order.
    pub product_images: Vec<String>,
    /// Processing status of each source image.
    pub images: Vec<ImageStatus>,
    /// Stored variants of processed images.
    pub compressed_product_images: Vec<ImageVariant>,
    /// Sequence of the last event applied.
    pub version: u64,
    /// When the product was created.
    pub created_at: DateTime<Utc>,
    /// When the last event happened.
    pub updated_at: DateTime<Utc>,
    /// When the product was deleted (absent while it exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
}

impl ProductState {
    /// The state after the first event of a stream.
    pub fn create(envelope: &Envelope<ProductEvent>) -> Result<Self, ApplyError> {
        let ProductEvent::Created(e) = &envelope.event else {
            return Err(ApplyError::NotACreation(envelope_type(envelope)));
        };
        if envelope.sequence != 1 {
            return Err(ApplyError::Gap {
                sequence: envelope.sequence,
                version: 0,
            });
        }
        Ok(Self {
            id: envelope.aggregate_id,
            user_id: e.user_id,
            product_name: e.product_name.clone(),
            product_description: e.product_description.clone(),
            product_price: e.product_price.round_dp(2),
            product_currency: e.currency.clone(),
            product_images: e.product_images.clone(),
            images: Vec::new(),
            compressed_product_images: Vec::new(),
            version: 1,
            created_at: envelope.occurred_at,
            updated_at: envelope.occurred_at,
            deleted_at: None,
        })
    }

    /// Applies the next event of the stream.
    pub fn apply(&mut self, envelope: &Envelope<ProductEvent>) -> Result<(), ApplyError> {
        check_next(self.version, envelope.sequence)?;
        if self.deleted_at.is_some() {
            return Err(ApplyError::AfterDeletion(envelope_type(envelope)));
        }
        match &envelope.event {
            ProductEvent::Created(_) => return Err(ApplyError::NotFirst("ProductCreated")),
            ProductEvent::ImagesRequested(e) => {
                // A first request lists every image; an edit or a re-drive lists some again. Either way
                // each listed image (by URL, wherever it now stands) becomes pending and loses what an
                // earlier attempt stored.
                for image in &e.images {
                    for position in self.positions_of(&image.url) {
                        self.set_image(
                            ImageStatus {
                                position,
                                url: image.url.clone(),
                                status: ImageStatusKind::Pending,
                                error_class: None,
                                reason: None,
                                placeholder: None,
                            },
                            Vec::new(),
                        );
                    }
                }
            }
            ProductEvent::ImagesProcessed(e) => {
                for outcome in &e.images {
                    // Only images still waiting take an outcome: one removed by an edit meanwhile has
                    // no position any more, and one already answered keeps its answer.
                    let waiting: Vec<u32> = self
                        .positions_of(&outcome.url)
                        .into_iter()
                        .filter(|&p| {
                            self.images
                                .iter()
                                .any(|i| i.position == p && i.status == ImageStatusKind::Pending)
                        })
                        .collect();
                    for position in waiting {
                        let (status, variants) = match outcome.status {
                            ImageOutcomeStatus::Ready => (
                                ImageStatusKind::Ready,
                                outcome
                                    .variants
                                    .iter()
                                    .cloned()
                                    .map(|v| ImageVariant { position, ..v })
                                    .collect(),
                            ),
                            ImageOutcomeStatus::Failed => (ImageStatusKind::Failed, Vec::new()),
                        };
                        self.set_image(
                            ImageStatus {
                                position,
                                url: outcome.url.clone(),
                                status,
                                error_class: outcome.error_class.clone(),
                                reason: outcome.reason.clone(),
                                placeholder: outcome.placeholder.clone(),
                            },
                            variants,
                        );
                    }
                }
            }
            ProductEvent::Updated(e) => {
                if let Some(name) = &e.product_name {
                    self.product_name.clone_from(name);
                }
                if let Some(description) = &e.product_description {
                    self.product_description.clone_from(description);
                }
                if let Some(price) = e.product_price {
                    self.product_price = price.round_dp(2);
                }
                if let Some(urls) = &e.product_images {
                    self.replace_images(urls);
                }
            }
            ProductEvent::Deleted(_) => self.deleted_at = Some(envelope.occurred_at),
        }
        self.version = envelope.sequence;
        self.updated_at = envelope.occurred_at;
        Ok(())
    }

    /// Positions of `url` in `product_images`.
    fn positions_of(&self, url: &str) -> Vec<u32> {
        self.product_images
            .iter()
            .enumerate()
            .filter(|(_, u)| *u == url)
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect()
    }

    /// The URLs that `urls` adds to the current `product_images` (each once, in order).
    pub fn added_images(&self, urls: &[String]) -> Vec<String> {
        let mut added: Vec<String> = Vec::new();
        for url in urls {
            if !self.product_images.contains(url) && !added.contains(url) {
                added.push(url.clone());
            }
        }
        added
    }

    /// A new list of source images: what is known of a URL still listed moves with it to its new
    /// position (status and variants); URLs no longer listed are dropped with their variants; new URLs
    /// are pending (the `ImagesRequested` that follows the edit asks for them).
    fn replace_images(&mut self, urls: &[String]) {
        let mut images = Vec::with_capacity(urls.len());
        let mut variants = Vec::new();
        for (position, url) in urls.iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            let known = self
                .product_images
                .iter()
                .position(|u| u == url)
                .and_then(|old| u32::try_from(old).ok());
            let status = known.and_then(|old| self.images.iter().find(|i| i.position == old));
            match (known, status) {
                (Some(old), Some(status)) => {
                    images.push(ImageStatus {
                        position,
                        ..status.clone()
                    });
                    variants.extend(
                        self.compressed_product_images
                            .iter()
                            .filter(|v| v.position == old)
                            .cloned()
                            .map(|v| ImageVariant { position, ..v }),
                    );
                }
                _ => images.push(ImageStatus {
                    position,
                    url: url.clone(),
                    status: ImageStatusKind::Pending,
                    error_class: None,
                    reason: None,
                    placeholder: None,
                }),
            }
        }
        variants.sort_by(|a, b| {
            (a.position, &a.variant, &a.format).cmp(&(b.position, &b.variant, &b.format))
        });
        self.product_images = urls.to_vec();
        self.images = images;
        self.compressed_product_images = variants;
    }

    /// Replaces what is known of the image at `status.position` (status and stored variants), keeping
    /// both lists in a canonical order so that equal histories give equal states.
    fn set_image(&mut self, status: ImageStatus, variants: Vec<ImageVariant>) {
        let position = status.position;
        self.compressed_product_images
            .retain(|v| v.position != position);
        self.compressed_product_images.extend(variants);
        self.compressed_product_images.sort_by(|a, b| {
            (a.position, &a.variant, &a.format).cmp(&(b.position, &b.variant, &b.format))
        });
        match self.images.iter_mut().find(|i| i.position == position) {
            Some(existing) => *existing = status,
            None => self.images.push(status),
        }
        self.images.sort_by_key(|i| i.position);
    }

    /// Folds a whole stream, from its first event.
    pub fn fold<'a>(
        stream: impl IntoIterator<Item = &'a Envelope<ProductEvent>>,
    ) -> Result<Option<Self>, ApplyError> {
        let mut state: Option<Self> = None;
        for envelope in stream {
            match &mut state {
                None => state = Some(Self::create(envelope)?),
                Some(s) => s.apply(envelope)?,
            }
        }
        Ok(state)
    }
}

/// A user as its events describe it; serialises as the API's user representation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    /// User id (the aggregate id).
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Sequence of the last event applied.
    pub version: u64,
    /// When the user registered.
    pub created_at: DateTime<Utc>,
    /// When the last event happened.
    pub updated_at: DateTime<Utc>,
}

impl UserState {
    /// The state after the first event of a stream.
    pub fn create(envelope: &Envelope<UserEvent>) -> Result<Self, ApplyError> {
        let UserEvent::Registered(e) = &envelope.event;
        if envelope.sequence != 1 {
            return Err(ApplyError::Gap {
                sequence: envelope.sequence,
                version: 0,
            });
        }
        Ok(Self {
            id: envelope.aggregate_id,
            name: e.name.clone(),
            email: e.email.clone(),
            version: 1,
            created_at: envelope.occurred_at,
            updated_at: envelope.occurred_at,
        })
    }

    /// Applies the next event of the stream.
    pub fn apply(&mut self, envelope: &Envelope<UserEvent>) -> Result<(), ApplyError> {
        check_next(self.version, envelope.sequence)?;
        match &envelope.event {
            UserEvent::Registered(_) => Err(ApplyError::NotFirst("UserRegistered")),
        }
    }
}

fn envelope_type(envelope: &Envelope<ProductEvent>) -> &'static str {
    use crate::DomainEvent;
    envelope.event.event_type()
}

fn check_next(version: u64, sequence: u64) -> Result<(), ApplyError> {
    if sequence <= version {
        Err(ApplyError::AlreadyApplied { sequence, version })
    } else if sequence > version + 1 {
        Err(ApplyError::Gap { sequence, version })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ImageOutcome, ImageRef, ImagesProcessed, ImagesRequested, ProductCreated, ProductDeleted,
        ProductUpdated,
    };

    fn created(id: Uuid) -> Envelope<ProductEvent> {
        Envelope::new(
            id,
            1,
            Utc::now(),
            None,
            ProductEvent::Created(ProductCreated {
                user_id: Uuid::nil(),
                product_name: "Desk".into(),
                product_description: String::new(),
                product_price: Decimal::new(34990, 2),
                currency: "EUR".into(),
                product_images: vec!["https://x.example/a.jpg".into()],
            }),
        )
    }

    fn requested(id: Uuid, seq: u64) -> Envelope<ProductEvent> {
        Envelope::new(
            id,
            seq,
            Utc::now(),
            None,
            ProductEvent::ImagesRequested(ImagesRequested {
                images: vec![ImageRef {
                    position: 0,
                    url: "https://x.example/a.jpg".into(),
                }],
            }),
        )
    }

    #[test]
    fn given_created_when_images_requested_then_images_are_pending() {
        let id = Uuid::now_v7();
        let state = ProductState::fold([&created(id), &requested(id, 2)])
            .unwrap()
            .unwrap();
        assert_eq!(state.version, 2);
        assert_eq!(state.images.len(), 1);
        assert_eq!(state.images[0].status, ImageStatusKind::Pending);
        assert_eq!(state.product_price.to_string(), "349.90");
    }

    #[test]
    fn duplicates_and_gaps_are_refused_without_changing_state() {
        let id = Uuid::now_v7();
        let mut state = ProductState::create(&created(id)).unwrap();
        let before = state.clone();
        assert_eq!(
            state.apply(&requested(id, 3)),
            Err(ApplyError::Gap {
                sequence: 3,
                version: 1
            })
        );
        assert_eq!(
            state.apply(&created(id)),
            Err(ApplyError::AlreadyApplied {
                sequence: 1,
                version: 1
            })
        );
        assert_eq!(state, before);
        assert!(ProductState::create(&requested(id, 2)).is_err());
    }

    fn at(id: Uuid, seq: u64, event: ProductEvent) -> Envelope<ProductEvent> {
        Envelope::new(id, seq, Utc::now(), None, event)
    }

    fn processed(url: &str, position: u32) -> ProductEvent {
        ProductEvent::ImagesProcessed(ImagesProcessed {
            request_sequence: 2,
            request_event_id: None,
            images: vec![ImageOutcome {
                position,
                url: url.into(),
                status: ImageOutcomeStatus::Ready,
                variants: vec![ImageVariant {
                    position,
                    variant: "thumb".into(),
                    format: "webp".into(),
                    url: format!("{url}.webp"),
                    key: "k".into(),
                    width: 1,
                    height: 1,
                    bytes: 1,
                }],
                error_class: None,
                reason: None,
                placeholder: Some("LKO2?U%2Tw=w]~RBVZRi};RPxuwH".into()),
            }],
        })
    }

    fn images(urls: &[&str]) -> ProductEvent {
        ProductEvent::Updated(ProductUpdated {
            product_images: Some(urls.iter().map(|u| (*u).to_owned()).collect()),
            ..ProductUpdated::default()
        })
    }

    const A: &str = "https://x.example/a.jpg";
    const B: &str = "https://x.example/b.jpg";

    #[test]
    fn given_a_ready_image_when_images_are_edited_then_it_keeps_its_variants_at_its_new_position() {
        let id = Uuid::now_v7();
        let mut state = ProductState::fold([&created(id), &requested(id, 2)])
            .unwrap()
            .unwrap();
        state.apply(&at(id, 3, processed(A, 0))).unwrap();
        assert_eq!(
            state.images[0].placeholder.as_deref(),
            Some("LKO2?U%2Tw=w]~RBVZRi};RPxuwH"),
            "the read model carries the outcome's placeholder"
        );
        state.apply(&at(id, 4, images(&[B, A]))).unwrap();
        assert_eq!(state.product_images, [B, A]);
        assert_eq!(state.images[0].status, ImageStatusKind::Pending);
        assert_eq!(state.images[0].placeholder, None);
        assert_eq!(state.images[1].status, ImageStatusKind::Ready);
        assert!(
            state.images[1].placeholder.is_some(),
            "a moved image keeps it"
        );
        assert_eq!(state.compressed_product_images.len(), 1);
        assert_eq!(state.compressed_product_images[0].position, 1);
        assert_eq!(
            state.added_images(&[B.into(), A.into()]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn given_an_image_removed_while_processing_when_its_result_arrives_then_it_is_ignored() {
        let id = Uuid::now_v7();
        let mut state = ProductState::fold([&created(id), &requested(id, 2)])
            .unwrap()
            .unwrap();
        state.apply(&at(id, 3, images(&[B]))).unwrap();
        state.apply(&at(id, 4, processed(A, 0))).unwrap();
        assert_eq!(state.version, 4);
        assert_eq!(state.images.len(), 1);
        assert_eq!(state.images[0].url, B);
        assert_eq!(state.images[0].status, ImageStatusKind::Pending);
        assert!(state.compressed_product_images.is_empty());
    }

    #[test]
    fn given_fields_updated_then_only_those_change_and_a_deletion_ends_the_stream() {
        let id = Uuid::now_v7();
        let mut state = ProductState::fold([&created(id), &requested(id, 2)])
            .unwrap()
            .unwrap();
        let update = ProductEvent::Updated(ProductUpdated {
            product_price: Some(Decimal::new(1999, 2)),
            ..ProductUpdated::default()
        });
        state.apply(&at(id, 3, update)).unwrap();
        assert_eq!(state.product_price.to_string(), "19.99");
        assert_eq!(state.product_name, "Desk");
        state
            .apply(&at(id, 4, ProductEvent::Deleted(ProductDeleted {})))
            .unwrap();
        assert!(state.deleted_at.is_some());
        assert_eq!(
            state.apply(&at(id, 5, processed(A, 0))),
            Err(ApplyError::AfterDeletion("ImagesProcessed"))
        );
    }
}
