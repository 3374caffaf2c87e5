//! HTTP routes, one module per resource; each exposes `router()`.

pub(crate) mod contract;
pub(crate) mod health;
pub(crate) mod images;
pub(crate) mod products;
pub(crate) mod users;

use axum::http::HeaderMap;
use uuid::Uuid;

use crate::domain::FieldError;
use crate::error::ApiError;

/// Reads the optional `Idempotency-Key` header: 1–255 visible ASCII characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::Validation(vec![FieldError::new(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )])),
    }
}

/// Parses an `{id}` path segment.
pub(crate) fn path_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::Validation(vec![FieldError::new("id", "must be a UUID")]))
}

/// The request id set by the middleware (for `correlation_id` on events).
pub(crate) fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
