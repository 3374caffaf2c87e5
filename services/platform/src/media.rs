//! HTTP metadata of stored image variants, the same wherever they are served from (S3 or the API's
//! development route).

/// `Cache-Control` of every stored variant: its key names its content (source hash and encoding
/// settings), so it never changes.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The MIME type of a stored variant, from its key's extension.
pub fn content_type_of(key: &str) -> &'static str {
    match key.rsplit('.').next() {
        Some("webp") => "image/webp",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}
