//! The OpenAPI 3.1 description of the HTTP API (`GET /openapi.json`) and its browsable page (`/docs`).
//!
//! The document is generated from the handlers: each route is registered through `utoipa_axum::routes!`
//! from the same `#[utoipa::path]` annotation that describes it, so a route cannot exist undocumented
//! or be documented at a path it is not served on. Representations come from the types the API
//! serialises (`events::ProductState`, `events::UserState`, `ErrorBody`, the page types); request
//! bodies, which handlers read field by field to name every bad one, are described by the types below,
//! and the integration tests check real answers against the document.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

use crate::domain::FieldError;
use crate::error::ErrorBody;

/// The document's static parts; paths are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Catalog API",
        description = "Products and users of the event-sourced catalog. Writes are appended to the \
            Kafka log and answered once the broker acknowledged them; reads come from the PostgreSQL \
            projection (through the Redis cache). Every error is JSON with a stable `code`; 4xx bodies \
            name each bad field in `errors`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "products", description = "Create, read, edit and delete products; their history and change feed."),
        (name = "users", description = "Users and their API keys."),
        (name = "operations", description = "Probes for orchestrators."),
        (name = "contract", description = "The published event contract (AsyncAPI and JSON Schemas)."),
    ),
    components(schemas(ErrorBody, FieldError)),
    modifiers(&Security),
)]
pub(crate) struct ApiDoc;

/// The credentials the API accepts.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`ck_…`, from POST /users or POST /users/{id}/api-keys), an admin \
                         key, or an HS256 JWT whose `sub` is a user id.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Answers any route can give, from the middleware every route runs behind: 429 when the client
/// address already has `API_CLIENT_CONCURRENCY` requests in progress, 503 when the request timed out or
/// a dependency is unavailable.
struct SharedAnswers;

impl Modify for SharedAnswers {
    fn modify(&self, doc: &mut Document) {
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ];
            for operation in operations.into_iter().flatten() {
                add_if_absent(
                    operation,
                    "429",
                    "Too many requests in progress from this address (`too_many_in_flight`) or the \
                     caller's rate limit is spent (`rate_limited`); see `Retry-After`.",
                );
                add_if_absent(
                    operation,
                    "503",
                    "A dependency is unavailable or the request timed out (`unavailable`); safe to \
                     retry (with the same `Idempotency-Key` for writes).",
                );
            }
        }
    }
}

fn add_if_absent(operation: &mut Operation, status: &str, description: &str) {
    if operation.responses.responses.contains_key(status) {
        return;
    }
    let response: RefOr<Response> = ResponseBuilder::new()
        .description(description)
        .content("application/json", error_content())
        .into();
    operation
        .responses
        .responses
        .insert(status.to_owned(), response);
}

fn error_content() -> utoipa::openapi::Content {
    utoipa::openapi::ContentBuilder::new()
        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
        .build()
}

/// An exact decimal price: a string such as `"19.99"` (recommended: never rounded by a JSON parser) or
/// a JSON number; at most two decimal places, not negative, below 10^10.
pub(crate) struct PriceInput;

impl utoipa::PartialSchema for PriceInput {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^[0-9]+(\.[0-9]+)?$"))
                    .examples(["19.99"]),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(0.0)),
            )
            .description(Some(
                "An exact decimal price: a string such as \"19.99\" (recommended: never rounded by a \
                 JSON parser) or a JSON number; at most two decimal places, not negative, below 10^10.",
            ))
            .into()
    }
}

impl ToSchema for PriceInput {}

/// Body of `POST /products`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct CreateProduct {
    /// Owner; the caller when absent (required with an admin credential, which may name any user).
    user_id: Option<Uuid>,
    /// Trimmed; 1–200 characters.
    #[schema(min_length = 1, max_length = 200, example = "Oak desk")]
    product_name: String,
    /// Trimmed; at most 5000 characters.
    #[serde(default)]
    #[schema(max_length = 5000)]
    product_description: Option<String>,
    /// The price.
    product_price: PriceInput,
    /// Source image URLs (http or https, no credentials, at most 2048 characters each), at most 10,
    /// no duplicates. Each is downloaded and compressed by the image worker.
    #[serde(default)]
    #[schema(max_items = 10, example = json!(["https://example.com/desk.jpg"]))]
    product_images: Option<Vec<String>>,
}

/// Body of `PATCH /products/{id}`: a JSON merge patch (RFC 7396). An absent field stays as it is;
/// `null` empties the description or the image list (and is refused for the name and the price).
/// `user_id` and any other field are refused (422).
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct PatchProduct {
    /// New name; 1–200 characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    product_name: String,
    /// New description; `null` empties it.
    #[serde(default)]
    #[schema(max_length = 5000)]
    product_description: Option<String>,
    /// New price.
    #[serde(default)]
    product_price: PriceInput,
    /// The new image list. URLs already processed keep their variants; new ones are processed; `null`
    /// removes every image.
    #[serde(default)]
    #[schema(max_items = 10)]
    product_images: Option<Vec<String>>,
}

/// Body of `POST /users`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct CreateUser {
    /// Display name; 1–100 characters.
    #[schema(min_length = 1, max_length = 100, example = "Ada Lovelace")]
    name: String,
    /// E-mail address, unique (compared case-insensitively, Unicode NFC).
    #[schema(max_length = 254, example = "ada@example.com")]
    email: String,
}

/// `201` of `POST /users`: the user and its first API key, shown only in this answer.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct UserCreated {
    /// User id.
    id: Uuid,
    /// Display name.
    name: String,
    /// E-mail address.
    email: String,
    /// Version of the user (1).
    version: u64,
    /// When the user registered.
    created_at: chrono::DateTime<chrono::Utc>,
    /// When the last event happened.
    updated_at: chrono::DateTime<chrono::Utc>,
    /// The secret key (`ck_…`): send as `Authorization: Bearer <key>`. Absent when the answer is an
    /// idempotent replay (`Idempotent-Replayed: true`): keys are never stored in clear.
    api_key: Option<String>,
    /// Id of the key (to revoke it).
    api_key_id: Option<Uuid>,
}

/// `201` of `POST /users/{id}/api-keys`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct KeyIssued {
    /// Id of the key (to revoke it).
    id: Uuid,
    /// The user it belongs to.
    user_id: Uuid,
    /// The secret key, shown only in this answer.
    api_key: String,
}

/// Answer of `GET /healthz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Health {
    /// `ok`, or `wedged` (503) when no database connection comes back.
    status: String,
    /// Why it is wedged.
    reason: Option<String>,
}

/// Answer of `GET /readyz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Readiness {
    /// `ready` or `unavailable` (503).
    status: String,
    /// Each dependency: `ok` or what failed.
    checks: ReadinessChecks,
}

/// The dependencies `GET /readyz` checks.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct ReadinessChecks {
    /// PostgreSQL.
    postgres: String,
    /// The Kafka brokers and the event topics.
    kafka: String,
}

/// The finished document: `routed` is [`ApiDoc`] with every route's operation merged in by the
/// routers; the answers every route shares are added to each operation.
pub(crate) fn finish(mut routed: Document) -> Document {
    SharedAnswers.modify(&mut routed);
    routed
}

/// The `{id}` of a product route.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct ProductId(
    /// The product id (a UUID).
    Uuid,
);

/// The `{id}` of a user route.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct UserId(
    /// The user id (a UUID).
    Uuid,
);

/// Optimistic concurrency for a change.
#[derive(utoipa::IntoParams)]
#[into_params(names("If-Match"), parameter_in = Header)]
#[allow(dead_code)]
pub(crate) struct IfMatch(
    /// The version the change is made against, as the `ETag` gave it (`"3"`); 412 when the product
    /// has moved on. Absent or `*`: no check.
    Option<String>,
);

/// Safe retries of a write.
#[derive(utoipa::IntoParams)]
#[into_params(names("Idempotency-Key"), parameter_in = Header)]
#[allow(dead_code)]
pub(crate) struct IdempotencyKey(
    /// 1–255 visible ASCII characters. A retry with the same key and body gets the first answer
    /// (`Idempotent-Replayed: true`) and appends nothing; the same key with another body is 422.
    Option<String>,
);

/// The rendered document, shared by the route that serves it.
#[derive(Clone)]
pub(crate) struct Rendered(pub(crate) bytes::Bytes);

/// This document (OpenAPI 3.1).
#[utoipa::path(
    get, path = "/openapi.json", tag = "contract",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object)),
)]
pub(crate) async fn openapi_json(
    axum::Extension(doc): axum::Extension<Rendered>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.0,
    )
        .into_response()
}

/// The routes with their document: `/openapi.json` serves it and `/docs` browses it (Swagger UI,
/// bundled in the binary: the page loads nothing from the internet).
pub(crate) fn with_docs<S: Clone + Send + Sync + 'static>(
    routes: utoipa_axum::router::OpenApiRouter<S>,
) -> axum::Router<S> {
    let (router, doc) = with_own_route(routes);
    let rendered = Rendered(bytes::Bytes::from(render(&finish(doc))));
    let ui = utoipa_swagger_ui::SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::new(["/openapi.json"]).try_it_out_enabled(true));
    router
        .layer(axum::Extension(rendered))
        .merge(axum::Router::from(ui))
}

/// `routes` plus the route serving the document, split into the router and the document.
pub(crate) fn with_own_route<S: Clone + Send + Sync + 'static>(
    routes: utoipa_axum::router::OpenApiRouter<S>,
) -> (axum::Router<S>, Document) {
    routes
        .routes(utoipa_axum::routes!(openapi_json))
        .split_for_parts()
}

/// The document as served: pretty JSON with a final newline.
pub(crate) fn render(doc: &Document) -> String {
    let mut text = doc.to_pretty_json().expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` is the served document, so that changes to the API show in review as a
    /// diff of the contract. `UPDATE_OPENAPI=1 cargo test -p api openapi` rewrites it.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let current = crate::openapi_document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &current).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == current,
            "docs/openapi.json is out of date: run `UPDATE_OPENAPI=1 cargo test -p api openapi`"
        );
    }
}
