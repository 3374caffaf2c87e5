//! HTTP routes, one module per resource; each exposes `router()`.

pub(crate) mod health;
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

/// Reads a projected row, waiting (up to `state.read_wait`) until it reaches the version this API
/// accepted for it, if it accepted one: read-your-writes for clients that GET right after a POST.
///
/// Reads `columns` of `table` (whose first column is `id`) and the version the command log accepted for
/// that id; the row's columns are NULL while it is not projected.
///
/// `min_version` (0 for none) is a version the caller asks for explicitly; the wait is for the larger of
/// it and the accepted version. When time runs out the row is returned as it is (callers compare).
pub(crate) async fn read_projected<T>(
    state: &crate::state::AppState,
    table: &str,
    columns: &str,
    id: Uuid,
    min_version: u64,
    from_row: fn(&tokio_postgres::Row) -> T,
    version_of: fn(&T) -> u64,
) -> Result<Option<T>, ApiError> {
    let deadline = tokio::time::Instant::now() + state.read_wait;
    let client = state.pool.get().await?;
    let sql = format!(
        "SELECT {columns},
                (SELECT (c.response->>'version')::bigint FROM api_commands c WHERE c.id = $1)
           FROM (SELECT $1::uuid AS wanted) w LEFT JOIN {table} ON {table}.id = w.wanted"
    );
    let statement = client.prepare_cached(&sql).await?;
    loop {
        let row = client.query_one(&statement, &[&id]).await?;
        let accepted: Option<i64> = row.get(row.len() - 1);
        let projected = row
            .get::<_, Option<Uuid>>(0)
            .is_some()
            .then(|| from_row(&row));
        let wanted = accepted
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0)
            .max(min_version);
        let caught_up = match &projected {
            // Unknown and never accepted here: nothing to wait for (unless a version was asked for).
            None => accepted.is_none() && min_version == 0,
            Some(value) => version_of(value) >= wanted,
        };
        if caught_up || tokio::time::Instant::now() >= deadline {
            return Ok(projected);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
