//! `POST /products`, `GET /products/{id}`, `GET /products?user_id=…`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use events::{
    Decimal, Envelope, ImageRef, ImagesRequested, ProductCreated, ProductEvent, ProductState,
};
use platform::read_model::{PRODUCT_COLUMNS, product_from_row};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{idempotency_key, path_id, request_id};
use crate::auth::{self, Caller, ClientAddr, Writer};
use crate::commands::{self, Command, Decision};
use crate::domain::{FieldError, NewProduct, Price, ProductPatch};
use crate::error::ApiError;
use crate::error::ErrorBody;
use crate::extract::JsonFields;
use crate::openapi::{IdempotencyKey, IfMatch, ProductId};
use crate::routes::users::user_exists;
use crate::state::AppState;

const ROUTE: &str = "POST /products";
/// Default page size of the product list.
pub(crate) const DEFAULT_LIMIT: i64 = 50;
/// Largest page size of the product list.
pub(crate) const MAX_LIMIT: i64 = 250;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_product, list_products))
        .routes(routes!(get_product, patch_product, delete_product))
        .routes(routes!(list_events))
}

/// Creates a product: appends `ProductCreated` then `ImagesRequested` to the product's stream and
/// answers 201 with the product as it will read back once both are acknowledged.
#[utoipa::path(
    post, path = "/products", tag = "products",
    request_body(content = crate::openapi::CreateProduct, content_type = "application/json"),
    params(IdempotencyKey),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created: both events are in the log. `Location` names the product; \
            an idempotent replay carries `Idempotent-Replayed: true`.", body = ProductState,
            headers(("Location" = String, description = "/products/{id}"))),
        (status = 400, description = "The body is not JSON (`malformed_json`).", body = ErrorBody),
        (status = 401, description = "No valid credential (`unauthenticated`).", body = ErrorBody),
        (status = 403, description = "`user_id` names another user (`forbidden`).", body = ErrorBody),
        (status = 413, description = "The body is larger than `API_MAX_BODY_BYTES` (`payload_too_large`).", body = ErrorBody),
        (status = 415, description = "Not sent as `application/json` (`unsupported_media_type`).", body = ErrorBody),
        (status = 422, description = "Invalid fields, each named in `errors` (`validation_failed`), or an \
            `Idempotency-Key` reused with another body (`idempotency_key_reused`).", body = ErrorBody),
    ),
)]
async fn create_product(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    body: JsonFields,
) -> Result<Response, ApiError> {
    let writer = auth::authenticate_writer(&state, &headers, client).await?;
    let answer = create(&state, &writer, &headers, body).await;
    writer.settle(&state, answer).await
}

async fn create(
    state: &AppState,
    writer: &Writer,
    headers: &HeaderMap,
    body: JsonFields,
) -> Result<Response, ApiError> {
    let caller = writer.caller();
    let key = idempotency_key(headers)?;
    let new = NewProduct::parse(&body.fields).map_err(ApiError::Validation)?;
    let owner = match (new.user_id, caller.user_id()) {
        (Some(owner), _) if caller.may_act_for(owner) => owner,
        (Some(_), _) => {
            return Err(ApiError::Forbidden(
                "user_id names another user: products are created for the caller",
            ));
        }
        (None, Some(me)) => me,
        (None, None) => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "user_id",
                "is required for an admin credential",
            )]));
        }
    };
    let hash = commands::request_hash(ROUTE, None, &body.bytes);
    if let Some(outcome) = commands::replay_if_known(
        state,
        ROUTE,
        key.as_deref(),
        &hash,
        writer.key_check().as_deref(),
    )
    .await?
    {
        return Ok(commands::created(outcome, "/products"));
    }
    // A user's own credential proves the user exists; an admin naming a user is checked.
    if caller.user_id() != Some(owner) && !user_exists(state, owner).await? {
        return Err(ApiError::Validation(vec![FieldError::new(
            "user_id",
            "no user with this id",
        )]));
    }
    let id = Uuid::now_v7();
    let (events, product) = product_events(
        id,
        new,
        owner,
        Utc::now(),
        request_id(headers),
        &caller.actor(),
    )?;
    let command = Command {
        id,
        aggregate_id: id,
        route: ROUTE,
        idempotency_key: key,
        request_hash: hash,
        email_claim: None,
        key_grant: None,
        creates: true,
        key_check: writer.key_check(),
    };
    let product = serde_json::to_value(&product).expect("product serialises");
    let mut events = Some(events);
    let outcome = commands::execute(state, command, |head| {
        // A creation decides once: a fresh id has no head (one that has is a conflict).
        match (head, events.take()) {
            (None, Some(events)) => Ok(Decision {
                expected: 0,
                events,
                head: product.clone(),
                response: product.clone(),
            }),
            _ => Err(ApiError::Conflict(FieldError::new("id", "already exists"))),
        }
    })
    .await?;
    Ok(commands::created(outcome, "/products"))
}

/// The two events of a new product, and the state they fold to.
fn product_events(
    id: Uuid,
    new: NewProduct,
    owner: Uuid,
    now: DateTime<Utc>,
    correlation_id: Option<String>,
    actor: &str,
) -> Result<(Vec<events::WireEnvelope>, ProductState), ApiError> {
    let images = new
        .product_images
        .iter()
        .enumerate()
        .map(|(i, url)| ImageRef {
            position: u32::try_from(i).unwrap_or(u32::MAX),
            url: url.clone(),
        })
        .collect();
    let created = Envelope::new(
        id,
        1,
        now,
        correlation_id.clone(),
        ProductEvent::Created(ProductCreated {
            user_id: owner,
            product_name: new.product_name,
            product_description: new.product_description,
            product_price: new.product_price.value(),
            currency: "EUR".into(),
            product_images: new.product_images,
        }),
    )
    .with_actor(actor);
    let requested = Envelope::new(
        id,
        2,
        now,
        correlation_id,
        ProductEvent::ImagesRequested(ImagesRequested { images }),
    )
    .with_actor(actor);
    let product = ProductState::fold([&created, &requested])
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::Internal("empty product stream".into()))?;
    Ok((vec![created.to_wire(), requested.to_wire()], product))
}

/// Reads `If-Match: "<version>"` (also `W/"<version>"`; `*` means any version).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .ok()
        .filter(|v| *v >= 1)
        .map(Some)
        .ok_or_else(|| {
            ApiError::Validation(vec![FieldError::new(
                "If-Match",
                "must be an ETag this API returned, e.g. \"3\"",
            )])
        })
}

/// The locked head of a product that a command may change: 404 unknown, 410 deleted, 403 when it is
/// not the caller's, 412 when the client's `If-Match` is not the current version.
fn changeable(
    head: Option<(u64, serde_json::Value)>,
    expected: Option<u64>,
    caller: &Caller,
) -> Result<(u64, ProductState), ApiError> {
    let Some((version, state)) = head else {
        return Err(ApiError::NotFound("product"));
    };
    let product: ProductState = serde_json::from_value(state)
        .map_err(|e| ApiError::Internal(format!("unreadable product head: {e}")))?;
    if let Some(deleted_at) = product.deleted_at {
        return Err(ApiError::Gone { deleted_at });
    }
    if !caller.may_act_for(product.user_id) {
        return Err(ApiError::Forbidden("the product belongs to another user"));
    }
    if expected.is_some_and(|e| e != version) {
        return Err(ApiError::VersionMismatch { current: version });
    }
    Ok((version, product))
}

/// The decision to append `changes` to `product` at `version` (by `caller`): their envelopes at the
/// next sequences, and the state they fold to as the new head and the answer.
fn decide_changes(
    version: u64,
    mut product: ProductState,
    changes: Vec<ProductEvent>,
    correlation_id: Option<String>,
    caller: &Caller,
) -> Result<Decision, ApiError> {
    let actor = caller.actor();
    let now = Utc::now();
    let mut wires = Vec::with_capacity(changes.len());
    for (i, event) in changes.into_iter().enumerate() {
        let envelope = Envelope::new(
            product.id,
            version + 1 + i as u64,
            now,
            correlation_id.clone(),
            event,
        )
        .with_actor(actor.clone());
        product
            .apply(&envelope)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        wires.push(envelope.to_wire());
    }
    let value = serde_json::to_value(&product).expect("product serialises");
    Ok(Decision {
        expected: version,
        events: wires,
        head: value.clone(),
        response: value,
    })
}

/// The response of a write that leaves the product readable: 200, the product, its `ETag`.
fn product_response(outcome: commands::Outcome) -> Response {
    let version = outcome.body["version"].as_u64().unwrap_or_default();
    let mut response = Json(outcome.body.clone()).into_response();
    if let Ok(etag) = header::HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    commands::replayed_header(&mut response, &outcome);
    response
}

/// The command of a change to product `id` (its own row id; the stream is the product's).
fn change_of(
    id: Uuid,
    route: &'static str,
    key: Option<String>,
    hash: Vec<u8>,
    writer: &Writer,
) -> Command {
    Command {
        id: Uuid::now_v7(),
        aggregate_id: id,
        route,
        idempotency_key: key,
        request_hash: hash,
        email_claim: None,
        key_grant: None,
        creates: false,
        key_check: writer.key_check(),
    }
}

const PATCH_ROUTE: &str = "PATCH /products/{id}";
const DELETE_ROUTE: &str = "DELETE /products/{id}";

/// Edits a product with a JSON merge patch: appends `ProductUpdated` with the fields that change and,
/// if URLs were added, `ImagesRequested` for them. 200 with the product as it will read back.
#[utoipa::path(
    patch, path = "/products/{id}", tag = "products",
    request_body(content = crate::openapi::PatchProduct, content_type = "application/merge-patch+json"),
    params(ProductId, IfMatch, IdempotencyKey),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed (or nothing to change): the product as it will read back, \
            with its new version.", body = ProductState,
            headers(("ETag" = String, description = "The new version, quoted: \"4\""))),
        (status = 400, description = "The body is not JSON (`malformed_json`).", body = ErrorBody),
        (status = 401, description = "No valid credential (`unauthenticated`).", body = ErrorBody),
        (status = 403, description = "Not the caller's product (`forbidden`).", body = ErrorBody),
        (status = 404, description = "No such product (`not_found`).", body = ErrorBody),
        (status = 410, description = "The product was deleted (`gone`, with `deleted_at`).", body = ErrorBody),
        (status = 412, description = "`If-Match` is not the current version (`version_mismatch`, with \
            `current_version`).", body = ErrorBody),
        (status = 413, description = "The body is too large (`payload_too_large`).", body = ErrorBody),
        (status = 415, description = "Not JSON or merge-patch JSON (`unsupported_media_type`).", body = ErrorBody),
        (status = 422, description = "Invalid, unknown or unchangeable fields, each named \
            (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn patch_product(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonFields,
) -> Result<Response, ApiError> {
    let writer = auth::authenticate_writer(&state, &headers, client).await?;
    let answer = patch(&state, &writer, &id, &headers, body).await;
    writer.settle(&state, answer).await
}

async fn patch(
    state: &AppState,
    writer: &Writer,
    id: &str,
    headers: &HeaderMap,
    body: JsonFields,
) -> Result<Response, ApiError> {
    let caller = writer.caller();
    let id = path_id(id)?;
    let key = idempotency_key(headers)?;
    let expected = if_match(headers)?;
    let patch = ProductPatch::parse(&body.fields).map_err(ApiError::Validation)?;
    let hash = commands::request_hash(PATCH_ROUTE, Some(id), &body.bytes);
    if let Some(outcome) = commands::replay_if_known(
        state,
        PATCH_ROUTE,
        key.as_deref(),
        &hash,
        writer.key_check().as_deref(),
    )
    .await?
    {
        return Ok(product_response(outcome));
    }
    let correlation_id = request_id(headers);
    let command = change_of(id, PATCH_ROUTE, key, hash, writer);
    let outcome = commands::execute(state, command, |head| {
        let (version, product) = changeable(head, expected, caller)?;
        let changes = patch_events(&product, patch.clone());
        decide_changes(version, product, changes, correlation_id.clone(), caller)
    })
    .await?;
    forget_cached(state, id, &outcome).await;
    Ok(product_response(outcome))
}

/// The events a patch appends to `product`: nothing if it changes nothing.
fn patch_events(product: &ProductState, patch: ProductPatch) -> Vec<ProductEvent> {
    let mut update = events::ProductUpdated::default();
    if let Some(name) = patch.product_name.filter(|n| *n != product.product_name) {
        update.product_name = Some(name);
    }
    if let Some(d) = patch
        .product_description
        .filter(|d| *d != product.product_description)
    {
        update.product_description = Some(d);
    }
    if let Some(price) = patch
        .product_price
        .map(Price::value)
        .filter(|p| p.round_dp(2) != product.product_price)
    {
        update.product_price = Some(price);
    }
    let mut added = Vec::new();
    if let Some(urls) = patch
        .product_images
        .filter(|u| *u != product.product_images)
    {
        added = product.added_images(&urls);
        update.product_images = Some(urls);
    }
    if update == events::ProductUpdated::default() {
        return Vec::new();
    }
    let new_images = update.product_images.clone().unwrap_or_default();
    let mut changes = vec![ProductEvent::Updated(update)];
    if !added.is_empty() {
        let images = new_images
            .iter()
            .enumerate()
            .filter(|(_, url)| added.contains(url))
            .map(|(i, url)| ImageRef {
                position: u32::try_from(i).unwrap_or(u32::MAX),
                url: url.clone(),
            })
            .collect();
        changes.push(ProductEvent::ImagesRequested(ImagesRequested { images }));
    }
    changes
}

/// Withdraws a product: appends `ProductDeleted`; 204.
#[utoipa::path(
    delete, path = "/products/{id}", tag = "products",
    params(ProductId, IfMatch, IdempotencyKey),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted: `ProductDeleted` is in the log."),
        (status = 401, description = "No valid credential (`unauthenticated`).", body = ErrorBody),
        (status = 403, description = "Not the caller's product (`forbidden`).", body = ErrorBody),
        (status = 404, description = "No such product (`not_found`).", body = ErrorBody),
        (status = 410, description = "Already deleted (`gone`, with `deleted_at`).", body = ErrorBody),
        (status = 412, description = "`If-Match` is not the current version (`version_mismatch`).", body = ErrorBody),
        (status = 422, description = "A malformed id or header (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn delete_product(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let writer = auth::authenticate_writer(&state, &headers, client).await?;
    let answer = delete(&state, &writer, &id, &headers).await;
    writer.settle(&state, answer).await
}

async fn delete(
    state: &AppState,
    writer: &Writer,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let caller = writer.caller();
    let id = path_id(id)?;
    let key = idempotency_key(headers)?;
    let expected = if_match(headers)?;
    let hash = commands::request_hash(DELETE_ROUTE, Some(id), b"");
    if let Some(outcome) = commands::replay_if_known(
        state,
        DELETE_ROUTE,
        key.as_deref(),
        &hash,
        writer.key_check().as_deref(),
    )
    .await?
    {
        let mut response = StatusCode::NO_CONTENT.into_response();
        commands::replayed_header(&mut response, &outcome);
        return Ok(response);
    }
    let correlation_id = request_id(headers);
    let command = change_of(id, DELETE_ROUTE, key, hash, writer);
    let outcome = commands::execute(state, command, |head| {
        let (version, product) = changeable(head, expected, caller)?;
        let changes = vec![ProductEvent::Deleted(events::ProductDeleted {})];
        decide_changes(version, product, changes, correlation_id.clone(), caller)
    })
    .await?;
    forget_cached(state, id, &outcome).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Before a write is acknowledged: drops this process's in-process entry and raises the Redis floor
/// to the written version, so no cache tier serves or fills an older version from now on (the
/// projector invalidates again once it projects the change).
async fn forget_cached(state: &AppState, id: Uuid, outcome: &commands::Outcome) {
    if let Some(local) = &state.local {
        local.forget(id);
    }
    let version = outcome.body["version"].as_u64().unwrap_or_default();
    if let Some(cache) = &state.cache {
        if let Err(error) = cache.invalidate(id, version).await {
            tracing::warn!(%error, "cannot raise the cache floor after a write");
        }
    }
}

/// A product, with its images' status and stored variants: from the cache when it has it, else from
/// the projection. `ETag` is the version; `If-None-Match` with it answers 304. `?min_version=N` waits
/// (up to `API_READ_WAIT_MS`) for version N and answers 503 `projection_behind` if it does not come.
#[utoipa::path(
    get, path = "/products/{id}", tag = "products",
    params(
        ProductId,
        ("min_version" = Option<u64>, Query, minimum = 1, description = "Wait (up to `API_READ_WAIT_MS`) \
            until the projection has this version: read-your-writes after a write answered it."),
        ("as_of_version" = Option<u64>, Query, minimum = 1, description = "The product as it was right \
            after this version, folded from its history."),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer: 304 \
            when it is still current."),
    ),
    responses(
        (status = 200, description = "The product, with each image's status and the stored variants. \
            `X-Cache` says where it came from (`local`, `redis` or `db`).", body = ProductState,
            headers(("ETag" = String, description = "The version, quoted"))),
        (status = 304, description = "Not modified since the `If-None-Match` version."),
        (status = 404, description = "No such product or version (`not_found`).", body = ErrorBody),
        (status = 410, description = "The product was deleted (`gone`, with `deleted_at`).", body = ErrorBody),
        (status = 422, description = "A malformed id or parameter, or a `min_version` never written \
            (`validation_failed`).", body = ErrorBody),
        (status = 503, description = "`min_version` not projected in time (`projection_behind`) or a \
            dependency is unavailable (`unavailable`).", body = ErrorBody),
    ),
)]
async fn get_product(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let min_version = match params.get("min_version") {
        None => 0,
        Some(raw) => positive(raw, "min_version")?,
    };
    if let Some(raw) = params.get("as_of_version") {
        let version = positive(raw, "as_of_version")?;
        return Ok(Json(product_as_of(&state, id, version).await?).into_response());
    }
    let found = crate::read::product(&state, id, min_version).await?;
    if let Some((_, source)) = &found {
        metrics::counter!("product_reads_total", "source" => source.as_str()).increment(1);
    }
    let Some((product, source)) = found else {
        return Err(ApiError::NotFound("product"));
    };
    if let Some(deleted_at) = product.deleted_at {
        return Err(ApiError::Gone { deleted_at });
    }
    if product.version < min_version {
        return Err(ApiError::ProjectionBehind {
            wanted: min_version,
            current: product.version,
        });
    }
    let etag = format!("\"{}\"", product.version);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == etag || t.trim() == "*" || t.trim() == format!("W/{etag}"))
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], product.json).into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::ETAG,
        header::HeaderValue::from_str(&etag).expect("ASCII"),
    );
    h.insert("x-cache", header::HeaderValue::from_static(source.as_str()));
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    Ok(response)
}

fn positive(raw: &str, field: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().ok().filter(|v| *v >= 1).ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            field,
            "must be a whole number of at least 1",
        )])
    })
}

/// The product as it was right after event `version`: its history folded up to there.
async fn product_as_of(state: &AppState, id: Uuid, version: u64) -> Result<ProductState, ApiError> {
    let client = state.read_pool.get().await?;
    let bound = i64::try_from(version).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT envelope FROM product_events WHERE aggregate_id = $1 AND sequence <= $2
              ORDER BY sequence",
            &[&id, &bound],
        )
        .await?;
    let stream = rows
        .iter()
        .map(|row| {
            let tokio_postgres::types::Json(wire): tokio_postgres::types::Json<
                events::WireEnvelope,
            > = row.get(0);
            Envelope::<ProductEvent>::from_wire(wire)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::Internal(format!("stored event does not decode: {e}")))?;
    if stream.last().map(|e| e.sequence) != Some(version) {
        return Err(ApiError::NotFound("product version"));
    }
    ProductState::fold(&stream)
        .map_err(|e| ApiError::Internal(format!("stored history does not fold: {e}")))?
        .ok_or(ApiError::NotFound("product version"))
}

/// A page of a product's history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct EventPage {
    /// Envelopes in stream order, exactly as on the topic (after upcasting to the current version).
    items: Vec<events::WireEnvelope>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<u64>,
}

/// `GET /products/{id}/events?after=<sequence>&limit=<n>`: the product's events in order.
#[utoipa::path(
    get, path = "/products/{id}/events", tag = "products",
    params(
        ProductId,
        ("after" = Option<u64>, Query, description = "Only events after this sequence (a page's `next_after`)."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 250, description = "Page size (default 50)."),
    ),
    responses(
        (status = 200, description = "The product's events in stream order, as on the topic (upcast to \
            the current schema versions); deleted products keep their history.", body = EventPage),
        (status = 404, description = "No such product (`not_found`).", body = ErrorBody),
        (status = 422, description = "A malformed id or parameter (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn list_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<EventPage>, ApiError> {
    let id = path_id(&id)?;
    let after = match params.get("after") {
        None => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::Validation(vec![FieldError::new("after", "must be a whole number")])
        })?,
    };
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::Validation(vec![FieldError::new(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_LIMIT}"),
                )])
            })?,
    };
    let client = state.read_pool.get().await?;
    let after_bound = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT envelope FROM product_events WHERE aggregate_id = $1 AND sequence > $2
              ORDER BY sequence LIMIT $3",
            &[&id, &after_bound, &(limit + 1)],
        )
        .await?;
    if rows.is_empty() && after == 0 {
        return Err(ApiError::NotFound("product"));
    }
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let tokio_postgres::types::Json(wire): tokio_postgres::types::Json<events::WireEnvelope> =
            row.get(0);
        // Upcast to the current schema version, as every consumer reads it.
        let current = Envelope::<ProductEvent>::from_wire(wire)
            .map_err(|e| ApiError::Internal(format!("stored event does not decode: {e}")))?;
        items.push(current.to_wire());
    }
    let next_after = if items.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
        items.pop();
        items.last().map(|e| e.sequence)
    } else {
        None
    };
    Ok(Json(EventPage { items, next_after }))
}

/// Validated filters of the product list.
#[derive(Debug, PartialEq)]
struct ListQuery {
    user_id: Uuid,
    min_price: Option<Decimal>,
    max_price: Option<Decimal>,
    name: Option<String>,
    limit: i64,
    after: Option<Cursor>,
}

/// Position after the last product of a page: (created_at, id), the list's sort key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    created_at: DateTime<Utc>,
    id: Uuid,
}

impl Cursor {
    /// Opaque to clients: the microsecond timestamp and id, hex, dot-separated.
    fn encode(self) -> String {
        format!(
            "{:x}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple()
        )
    }

    /// Reads a cursor; `None` for anything this API cannot have returned, including timestamps
    /// outside years 1–9999 (PostgreSQL refuses some of those, and no product was created then).
    fn decode(text: &str) -> Option<Self> {
        use chrono::Datelike;
        let (micros, id) = text.split_once('.')?;
        let created_at = DateTime::from_timestamp_micros(i64::from_str_radix(micros, 16).ok()?)?;
        (1..=9999).contains(&created_at.year()).then_some(Self {
            created_at,
            id: Uuid::try_parse(id).ok()?,
        })
    }
}

impl ListQuery {
    fn parse(params: &HashMap<String, String>) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let user_id = match params.get("user_id") {
            None => {
                errors.push(FieldError::new("user_id", "is required"));
                None
            }
            Some(v) => Uuid::try_parse(v)
                .map_err(|_| errors.push(FieldError::new("user_id", "must be a UUID")))
                .ok(),
        };
        let mut price = |name: &str| {
            params.get(name).and_then(|v| {
                Price::parse(v)
                    .map(Price::value)
                    .map_err(|m| errors.push(FieldError::new(name, m)))
                    .ok()
            })
        };
        let min_price = price("min_price");
        let max_price = price("max_price");
        if let (Some(min), Some(max)) = (min_price, max_price) {
            if min > max {
                errors.push(FieldError::new(
                    "min_price",
                    "must not be greater than max_price",
                ));
            }
        }
        let name = params.get("name").and_then(|v| {
            let v = v.trim();
            if v.is_empty() || v.chars().count() > 200 {
                errors.push(FieldError::new("name", "must be 1 to 200 characters"));
                None
            } else if v.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    "name",
                    "must not contain control characters",
                ));
                None
            } else {
                Some(v.to_owned())
            }
        });
        let limit = match params.get("limit") {
            None => Some(DEFAULT_LIMIT),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Some(n),
                _ => {
                    errors.push(FieldError::new(
                        "limit",
                        format!("must be a whole number from 1 to {MAX_LIMIT}"),
                    ));
                    None
                }
            },
        };
        let after = match params.get("cursor") {
            None => Some(None),
            Some(v) => match Cursor::decode(v) {
                Some(c) => Some(Some(c)),
                None => {
                    errors.push(FieldError::new(
                        "cursor",
                        "is not a cursor this API returned",
                    ));
                    None
                }
            },
        };
        match (user_id, limit, after) {
            (Some(user_id), Some(limit), Some(after)) if errors.is_empty() => Ok(Self {
                user_id,
                min_price,
                max_price,
                name,
                limit,
                after,
            }),
            _ => Err(errors),
        }
    }
}

/// A page of the product list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ProductPage {
    /// The products, oldest first.
    items: Vec<ProductState>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Escapes `%`, `_` and `\` so the name filter is a literal substring.
fn like_pattern(name: &str) -> String {
    let escaped = name
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// A user's products, filtered by price range and name, in pages ordered by (created_at, id).
#[utoipa::path(
    get, path = "/products", tag = "products",
    params(
        ("user_id" = Uuid, Query, description = "The owner whose products to list (required)."),
        ("min_price" = Option<String>, Query, description = "Lowest price, inclusive (a decimal such as 10 or 9.99)."),
        ("max_price" = Option<String>, Query, description = "Highest price, inclusive."),
        ("name" = Option<String>, Query, description = "Case-insensitive substring of the name (literal: % and _ match themselves)."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 250, description = "Page size (default 50)."),
        ("cursor" = Option<String>, Query, description = "A page's `next_cursor`, for the next page."),
    ),
    responses(
        (status = 200, description = "A page of the user's products (deleted ones left out), oldest first.", body = ProductPage),
        (status = 422, description = "A missing or malformed parameter, each named (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn list_products(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<ProductPage>, ApiError> {
    let q = ListQuery::parse(&params).map_err(ApiError::Validation)?;
    let pattern = q.name.as_deref().map(like_pattern);
    let (after_ts, after_id) = match q.after {
        Some(c) => (Some(c.created_at), Some(c.id)),
        None => (None, None),
    };
    let client = state.read_pool.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {PRODUCT_COLUMNS} FROM products
              WHERE user_id = $1 AND deleted_at IS NULL
                AND ($2::numeric IS NULL OR product_price >= $2)
                AND ($3::numeric IS NULL OR product_price <= $3)
                AND ($4::text IS NULL OR product_name ILIKE $4)
                AND ($5::timestamptz IS NULL OR (created_at, id) > ($5, $6::uuid))
              ORDER BY created_at, id
              LIMIT $7"
        ))
        .await?;
    let rows = client
        .query(
            &statement,
            &[
                &q.user_id,
                &q.min_price,
                &q.max_price,
                &pattern,
                &after_ts,
                &after_id,
                &(q.limit + 1),
            ],
        )
        .await?;
    let mut items: Vec<ProductState> = rows.iter().map(product_from_row).collect();
    let next_cursor = if items.len() > usize::try_from(q.limit).unwrap_or(usize::MAX) {
        items.pop();
        items.last().map(|p| {
            Cursor {
                created_at: p.created_at,
                id: p.id,
            }
            .encode()
        })
    } else {
        None
    };
    Ok(Json(ProductPage { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn bad_fields(pairs: &[(&str, &str)]) -> Vec<String> {
        ListQuery::parse(&params(pairs))
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    const USER: &str = "0192f7a3-1b2c-7e4f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn list_parameters_are_validated_by_name() {
        assert_eq!(bad_fields(&[]), ["user_id"]);
        assert_eq!(bad_fields(&[("user_id", "x")]), ["user_id"]);
        assert_eq!(
            bad_fields(&[("user_id", USER), ("min_price", "5"), ("max_price", "4")]),
            ["min_price"]
        );
        assert_eq!(
            bad_fields(&[("user_id", USER), ("min_price", "-1")]),
            ["min_price"]
        );
        assert_eq!(bad_fields(&[("user_id", USER), ("limit", "0")]), ["limit"]);
        assert_eq!(
            bad_fields(&[("user_id", USER), ("limit", "251")]),
            ["limit"]
        );
        assert_eq!(
            bad_fields(&[("user_id", USER), ("cursor", "zz")]),
            ["cursor"]
        );
        assert_eq!(
            bad_fields(&[("user_id", USER), ("name", "desk\u{0}")]),
            ["name"]
        );
        // A well-formed cursor whose time (year -29718) chrono accepts and PostgreSQL cannot represent.
        let far = format!(
            "-{:x}.{}",
            1_000_000_000_000_000_000_i64,
            Uuid::nil().simple()
        );
        assert_eq!(
            bad_fields(&[("user_id", USER), ("cursor", &far)]),
            ["cursor"]
        );
        let q = ListQuery::parse(&params(&[("user_id", USER), ("name", " desk ")])).unwrap();
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.name.as_deref(), Some("desk"));
    }

    #[test]
    fn cursors_round_trip() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
    }

    #[test]
    fn name_filters_are_literal() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
    }
}
