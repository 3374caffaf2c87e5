//! The API's error type: each variant is one HTTP status and one stable `code`.
//!
//! Bodies are JSON: `{"code", "message", "errors": [{"field", "message"}], "request_id"}`. 4xx messages
//! say what the client must change; 5xx messages never carry internal detail (that goes to the log,
//! under the same request id).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::FieldError;

tokio::task_local! {
    /// The id of the request being served, set by the request-id middleware for error bodies.
    pub(crate) static REQUEST_ID: String;
}

/// Everything a handler can answer other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422: one or more fields are invalid; each is named.
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    /// 400: the body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    /// 415: the body is not declared as `application/json`.
    #[error("the body must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 413: the body is larger than the configured limit.
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 401: no credential, or one that is unknown, revoked, expired or wrongly signed.
    #[error("a valid credential is required: send Authorization: Bearer <API key or token>")]
    Unauthenticated,
    /// 403: the caller may not act on this resource (another user's product, or another `user_id`).
    #[error("{0}")]
    Forbidden(&'static str),
    /// 429: the caller's rate limit is spent; retry after this many seconds.
    #[error("too many requests; retry after {retry_after} s")]
    RateLimited {
        /// Seconds until a request is allowed again.
        retry_after: u64,
    },
    /// 429: this client address already has `API_CLIENT_CONCURRENCY` requests in progress.
    #[error("too many requests in progress from this client; retry when one has finished")]
    TooManyInFlight,
    /// 404: no such resource.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: the request conflicts with existing state (the field is named).
    #[error("{}", .0.message)]
    Conflict(FieldError),
    /// 422: an `Idempotency-Key` was reused with a different request.
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    /// 412: `If-Match` names a version that is not the product's current one.
    #[error("the product is at version {current}, not the version in If-Match")]
    VersionMismatch {
        /// The current version.
        current: u64,
    },
    /// 410: the product was deleted.
    #[error("the product was deleted")]
    Gone {
        /// When it was deleted.
        deleted_at: chrono::DateTime<chrono::Utc>,
    },
    /// 503: the projection has not reached the version asked for (`min_version`) in time.
    #[error("version {wanted} is not projected yet (current version {current}); retry shortly")]
    ProjectionBehind {
        /// The version asked for.
        wanted: u64,
        /// The version projected.
        current: u64,
    },
    /// 503: a dependency (database, broker) is unavailable; safe to retry with the same
    /// `Idempotency-Key`.
    #[error("a dependency is unavailable: {0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Unavailable(format!("postgres pool: {e}"))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        // Constraint violations are mapped where they are expected (see the command log); anything
        // else reaching here is either the server being away or a bug.
        // The server going away (SQLSTATE class 08 connection, 57 operator intervention: a restart
        // or shutdown terminates sessions with 57P01), running short of resources (53), or a
        // transaction it chose to abort (40: serialization failure, deadlock) is transient: 503,
        // retry. Found by the fault suite: a PATCH during a PostgreSQL restart answered 500.
        let transient = e.code().is_none_or(|c| {
            let class = &c.code()[..2];
            matches!(class, "08" | "57" | "53" | "40")
        });
        if e.is_closed() || transient {
            ApiError::Unavailable(format!("postgres: {e}"))
        } else {
            ApiError::Internal(format!("postgres: {e}"))
        }
    }
}

impl From<rdkafka::error::KafkaError> for ApiError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        ApiError::Unavailable(format!("kafka: {e}"))
    }
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `validation_failed`.
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
    /// The bad fields, for 409 and 422.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The product's current version (412 `version_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// When the product was deleted (410 `gone`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The request id (also in the `x-request-id` response header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ApiError {
    /// The status and code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::TooManyInFlight => (StatusCode::TOO_MANY_REQUESTS, "too_many_in_flight"),
            ApiError::VersionMismatch { .. } => {
                (StatusCode::PRECONDITION_FAILED, "version_mismatch")
            }
            ApiError::Gone { .. } => (StatusCode::GONE, "gone"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::ProjectionBehind { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "projection_behind")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let request_id = REQUEST_ID.try_with(Clone::clone).ok();
        let current_version = match &self {
            ApiError::VersionMismatch { current } => Some(*current),
            _ => None,
        };
        let retry_after = match &self {
            ApiError::RateLimited { retry_after } => Some(*retry_after),
            ApiError::TooManyInFlight => Some(1),
            _ => None,
        };
        let unauthenticated = matches!(self, ApiError::Unauthenticated);
        let deleted_at = match &self {
            ApiError::Gone { deleted_at } => Some(*deleted_at),
            _ => None,
        };
        let (message, errors) = match self {
            ApiError::Validation(errors) => (
                format!(
                    "invalid field(s): {}",
                    errors
                        .iter()
                        .map(|e| e.field.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                errors,
            ),
            ApiError::Conflict(field) => (field.message.clone(), vec![field]),
            ApiError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "dependency unavailable");
                (
                    "a dependency is unavailable; retry later with the same Idempotency-Key".into(),
                    vec![],
                )
            }
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (
                    "internal error; quote the request_id when reporting it".into(),
                    vec![],
                )
            }
            other => (other.to_string(), vec![]),
        };
        let body = ErrorBody {
            code,
            message,
            errors,
            current_version,
            deleted_at,
            request_id,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(seconds));
        }
        if unauthenticated {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(current) = current_version {
            if let Ok(etag) = axum::http::HeaderValue::from_str(&format!("\"{current}\"")) {
                response
                    .headers_mut()
                    .insert(axum::http::header::ETAG, etag);
            }
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}
