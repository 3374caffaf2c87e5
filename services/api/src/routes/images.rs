//! `GET /images/{shard}/{hash}/{file}`: the image worker's local store, read-only, for development.
//!
//! With `IMAGE_STORE=local` (as `just dev` runs) variants are files on the worker's machine; with
//! `API_LOCAL_IMAGES_DIR` set to the same directory and `IMAGE_PUBLIC_BASE_URL` to this API, the URLs in
//! `compressed_product_images` open in a browser. Production serves variants from S3 (or a CDN in front
//! of it) instead, with the same headers. Off (404) unless configured.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(local_image))
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A stored image variant from the local image store (development only).
#[utoipa::path(
    get, path = "/images/{shard}/{hash}/{file}", tag = "products",
    params(
        ("shard" = String, Path, description = "First two hex digits of the source's SHA-256."),
        ("hash" = String, Path, description = "The source's SHA-256 (hex)."),
        ("file" = String, Path, description = "The variant's settings and extension, e.g. `fit-1024-1024-q80.webp`."),
    ),
    responses(
        (status = 200, description = "The variant, with its `Content-Type` and `Cache-Control: public, \
            max-age=31536000, immutable`.", content_type = "image/webp", body = Vec<u8>),
        (status = 404, description = "No such variant, or the local store is not served \
            (`API_LOCAL_IMAGES_DIR` unset) (`not_found`).", body = ErrorBody),
    ),
)]
async fn local_image(
    State(state): State<AppState>,
    Path((shard, hash, file)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let Some(dir) = &state.local_images else {
        return Err(ApiError::NotFound("image"));
    };
    let file_ok = !file.starts_with('.')
        && !file.is_empty()
        && file.len() <= 200
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !is_hex(&shard, 2) || !is_hex(&hash, 64) || !hash.starts_with(&shard) || !file_ok {
        return Err(ApiError::NotFound("image"));
    }
    let path = dir.join("images").join(&shard).join(&hash).join(&file);
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound("image"));
        }
        Err(e) => return Err(ApiError::Internal(format!("local image store: {e}"))),
    };
    Ok((
        [
            (
                header::CONTENT_TYPE,
                platform::media::content_type_of(&file),
            ),
            (header::CACHE_CONTROL, platform::media::IMMUTABLE),
        ],
        bytes,
    )
        .into_response())
}
