//! The published event contract, served as files: `GET /asyncapi.yaml` and the JSON Schemas it refers
//! to (`GET /schemas/{name}`, `GET /schemas/pipeline/{name}`), so the relative references in the
//! AsyncAPI document resolve against the API as they do in the repository.

use axum::Router;
use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;

const ASYNCAPI: &str = include_str!("../../../../events/asyncapi.yaml");

/// Every schema file, by its path under `events/schemas/`.
const SCHEMAS: &[(&str, &str)] = &[
    (
        "UserRegistered.v1.json",
        include_str!("../../../../events/schemas/UserRegistered.v1.json"),
    ),
    (
        "ProductCreated.v1.json",
        include_str!("../../../../events/schemas/ProductCreated.v1.json"),
    ),
    (
        "ProductCreated.v2.json",
        include_str!("../../../../events/schemas/ProductCreated.v2.json"),
    ),
    (
        "ImagesRequested.v1.json",
        include_str!("../../../../events/schemas/ImagesRequested.v1.json"),
    ),
    (
        "ImagesProcessed.v1.json",
        include_str!("../../../../events/schemas/ImagesProcessed.v1.json"),
    ),
    (
        "ProductUpdated.v1.json",
        include_str!("../../../../events/schemas/ProductUpdated.v1.json"),
    ),
    (
        "ProductDeleted.v1.json",
        include_str!("../../../../events/schemas/ProductDeleted.v1.json"),
    ),
    (
        "pipeline/ImageJob.v1.json",
        include_str!("../../../../events/schemas/pipeline/ImageJob.v1.json"),
    ),
    (
        "pipeline/DeadLetter.v1.json",
        include_str!("../../../../events/schemas/pipeline/DeadLetter.v1.json"),
    ),
];

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/asyncapi.yaml", get(asyncapi))
        .route(
            "/schemas/{name}",
            get(|Path(name): Path<String>| schema(name)),
        )
        .route(
            "/schemas/pipeline/{name}",
            get(|Path(name): Path<String>| schema(format!("pipeline/{name}"))),
        )
}

async fn asyncapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], ASYNCAPI).into_response()
}

async fn schema(name: String) -> Result<Response, ApiError> {
    SCHEMAS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| {
            ([(header::CONTENT_TYPE, "application/schema+json")], *text).into_response()
        })
        .ok_or(ApiError::NotFound("schema"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_schema_file_is_served() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../events/schemas");
        let mut on_disk = Vec::new();
        for sub in ["", "pipeline/"] {
            for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                if name.ends_with(".json") {
                    on_disk.push(format!("{sub}{name}"));
                }
            }
        }
        on_disk.sort();
        let mut served: Vec<String> = super::SCHEMAS
            .iter()
            .map(|(n, _)| (*n).to_owned())
            .collect();
        served.sort();
        assert_eq!(served, on_disk);
    }
}
