//! The unit of work: one `ImagesRequested` of one product, and how far it got.
//!
//! A job travels through the retry topics as JSON (this struct), carrying the outcomes of the images
//! already finished, so a retry only redoes what failed.

use chrono::{DateTime, Utc};
use events::{ImageOutcome, ImageOutcomeStatus, ImageRef};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why an image could not be processed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Machine-readable class: `timeout`, `connect`, `http_5xx`, `http_4xx`, `origin_unavailable`,
    /// `storage`, `corrupt`, `unprocessable`,
    /// `forbidden_address`, `too_large`, `not_an_image`, `decode`, `too_many_pixels`, `invalid_url`,
    /// `redirect`, `transport`.
    pub class: String,
    /// For a person.
    pub message: String,
    /// Whether the retry ladder should try again.
    pub retryable: bool,
}

impl Failure {
    /// A failure that will not go away by itself (404, not an image, too large, forbidden address …).
    pub fn permanent(class: &str, message: impl Into<String>) -> Self {
        Self {
            class: class.to_owned(),
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure worth retrying later (timeouts, 5xx, connection refused, storage unavailable).
    pub fn retryable(class: &str, message: impl Into<String>) -> Self {
        Self {
            class: class.to_owned(),
            message: message.into(),
            retryable: true,
        }
    }
}

/// One `ImagesRequested` being processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The product.
    pub product_id: Uuid,
    /// Sequence of the `ImagesRequested` (its event id follows from it); the result is appended at the
    /// product stream's next free sequence when the job ends.
    pub request_sequence: u64,
    /// Correlation id to carry on to the result (the request's event id).
    pub correlation_id: String,
    /// Every image the request named.
    pub images: Vec<ImageRef>,
    /// Outcomes of the images already finished (ready, or failed for good).
    pub done: Vec<ImageOutcome>,
    /// Attempts made so far (1 after the first).
    pub attempt: u32,
    /// When the first retryable failure happened.
    pub first_failure_at: Option<DateTime<Utc>>,
    /// The last retryable failure, per position still pending.
    pub last_failures: Vec<(u32, Failure)>,
}

impl Job {
    /// The images without an outcome yet.
    pub fn pending(&self) -> Vec<ImageRef> {
        self.images
            .iter()
            .filter(|i| !self.done.iter().any(|d| d.position == i.position))
            .cloned()
            .collect()
    }

    /// Records a failed outcome for `image`.
    pub fn fail(&mut self, image: &ImageRef, failure: &Failure) {
        self.done.push(ImageOutcome {
            position: image.position,
            url: image.url.clone(),
            status: ImageOutcomeStatus::Failed,
            variants: Vec::new(),
            error_class: Some(failure.class.clone()),
            reason: Some(failure.message.clone()),
            placeholder: None,
        });
    }
}

/// One image on the dead-letter topic: enough to understand and to re-drive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The product.
    pub product_id: Uuid,
    /// Sequence of the `ImagesRequested` whose job failed.
    pub request_sequence: u64,
    /// The image.
    pub image: ImageRef,
    /// Why it failed.
    pub failure: Failure,
    /// Attempts made.
    pub attempts: u32,
    /// When it first failed.
    pub first_failure_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_pipeline_examples_are_what_the_worker_reads_and_writes() {
        let job: Job = serde_json::from_str(include_str!(
            "../../../events/examples/pipeline/ImageJob.v1.json"
        ))
        .unwrap();
        let letter: DeadLetter = serde_json::from_str(include_str!(
            "../../../events/examples/pipeline/DeadLetter.v1.json"
        ))
        .unwrap();
        // Written back, they have exactly the example's fields.
        for (written, example) in [
            (
                serde_json::to_value(&job).unwrap(),
                include_str!("../../../events/examples/pipeline/ImageJob.v1.json"),
            ),
            (
                serde_json::to_value(&letter).unwrap(),
                include_str!("../../../events/examples/pipeline/DeadLetter.v1.json"),
            ),
        ] {
            let example: serde_json::Value = serde_json::from_str(example).unwrap();
            let keys = |v: &serde_json::Value| {
                let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
                k.sort();
                k
            };
            assert_eq!(keys(&written), keys(&example));
        }
        assert_eq!(job.pending().len(), 1);
    }
}
