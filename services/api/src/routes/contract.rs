//! The published event contract, served as files: `GET /asyncapi.yaml` and the JSON Schemas it refers
//! to (`GET /schemas/{name}`, `GET /schemas/pipeline/{name}`), so the relative references in the
//! AsyncAPI document resolve against the API as they do in the repository.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
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

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(asyncapi))
        .routes(routes!(event_schema))
        .routes(routes!(pipeline_schema))
}

/// The AsyncAPI 3 document of the event topics.
#[utoipa::path(
    get, path = "/asyncapi.yaml", tag = "contract",
    responses((status = 200, description = "The AsyncAPI document.", content_type = "application/yaml", body = String)),
)]
async fn asyncapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], ASYNCAPI).into_response()
}

/// The JSON Schema of one event payload version, e.g. `ProductCreated.v2.json`.
#[utoipa::path(
    get, path = "/schemas/{name}", tag = "contract",
    params(("name" = String, Path, description = "File name, e.g. `ProductUpdated.v1.json`.")),
    responses(
        (status = 200, description = "The schema.", content_type = "application/schema+json", body = Object),
        (status = 404, description = "No such schema (`not_found`).", body = ErrorBody),
    ),
)]
async fn event_schema(Path(name): Path<String>) -> Result<Response, ApiError> {
    schema(name)
}

/// The JSON Schema of an internal pipeline message (image jobs, dead letters).
#[utoipa::path(
    get, path = "/schemas/pipeline/{name}", tag = "contract",
    params(("name" = String, Path, description = "File name, e.g. `DeadLetter.v1.json`.")),
    responses(
        (status = 200, description = "The schema.", content_type = "application/schema+json", body = Object),
        (status = 404, description = "No such schema (`not_found`).", body = ErrorBody),
    ),
)]
async fn pipeline_schema(Path(name): Path<String>) -> Result<Response, ApiError> {
    schema(format!("pipeline/{name}"))
}

fn schema(name: String) -> Result<Response, ApiError> {
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
