//! Request body extraction with the API's own errors (415, 413, 400, 422 naming fields).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};

use crate::domain::RawFields;
use crate::error::ApiError;

/// A JSON object body, split into raw top-level fields, plus the exact bytes (for idempotency hashing).
pub struct JsonFields {
    /// The top-level fields.
    pub fields: RawFields,
    /// The body as received.
    pub bytes: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for JsonFields {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        let fields: RawFields = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::Validation(vec![crate::domain::FieldError::new(
                    "body",
                    "must be a JSON object",
                )])
            }
            _ => ApiError::MalformedJson(e.to_string()),
        })?;
        Ok(Self { fields, bytes })
    }
}

/// The configured body limit, put in request extensions so rejections can say it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);
