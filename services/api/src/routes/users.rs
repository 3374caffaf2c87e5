//! `POST /users`, `GET /users/{id}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use events::{Envelope, UserEvent, UserRegistered, UserState};
use platform::read_model::{USER_COLUMNS, user_from_row};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{idempotency_key, path_id, request_id};
use crate::auth::{self, ClientAddr};
use crate::commands::{self, Command, Decision};
use crate::domain::{FieldError, NewUser};
use crate::error::{ApiError, ErrorBody};
use crate::extract::JsonFields;
use crate::openapi::{IdempotencyKey, UserId};
use crate::query;
use crate::state::AppState;

const ROUTE: &str = "POST /users";

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user))
        .routes(routes!(get_user))
        .routes(routes!(create_key))
        .routes(routes!(revoke_key))
}

/// Registers a user: appends `UserRegistered`, answers 201 once the broker acknowledged it.
#[utoipa::path(
    post, path = "/users", tag = "users",
    request_body(content = crate::openapi::CreateUser, content_type = "application/json"),
    params(IdempotencyKey),
    responses(
        (status = 201, description = "Registered: `UserRegistered` is in the log. The answer carries the \
            user's first API key, shown only here.", body = crate::openapi::UserCreated,
            headers(("Location" = String, description = "/users/{id}"))),
        (status = 400, description = "The body is not JSON (`malformed_json`).", body = ErrorBody),
        (status = 409, description = "The e-mail address is taken (`conflict`, field `email`).", body = ErrorBody),
        (status = 413, description = "The body is too large (`payload_too_large`).", body = ErrorBody),
        (status = 415, description = "Not sent as `application/json` (`unsupported_media_type`).", body = ErrorBody),
        (status = 422, description = "Invalid fields, each named (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn create_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonFields,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let new = NewUser::parse(&body.fields).map_err(ApiError::Validation)?;
    let hash = commands::request_hash(ROUTE, None, &body.bytes);
    if let Some(outcome) =
        commands::replay_if_known(&state, ROUTE, key.as_deref(), &hash, None).await?
    {
        return Ok(commands::created(outcome, "/users"));
    }
    let email_lower = new.email.to_lowercase();
    if email_taken(&state, &email_lower).await? {
        return Err(ApiError::Conflict(FieldError::new(
            "email",
            "a user with this e-mail address already exists",
        )));
    }
    let id = Uuid::now_v7();
    let envelope = Envelope::new(
        id,
        1,
        Utc::now(),
        request_id(&headers),
        UserEvent::Registered(UserRegistered {
            name: new.name,
            email: new.email,
        }),
    );
    let user = UserState::create(&envelope).map_err(|e| ApiError::Internal(e.to_string()))?;
    let envelope = envelope.with_actor(id.to_string());
    let api_key = auth::issue_key()?;
    let command = Command {
        id,
        aggregate_id: id,
        route: ROUTE,
        idempotency_key: key,
        request_hash: hash,
        email_claim: Some(email_lower),
        key_grant: Some((api_key.id, api_key.digest.clone())),
        key_check: None,
        creates: true,
    };
    let user = serde_json::to_value(&user).expect("user serialises");
    let outcome = commands::execute(&state, command, |head| {
        if head.is_some() {
            return Err(ApiError::Conflict(FieldError::new("id", "already exists")));
        }
        Ok(Decision {
            expected: 0,
            events: vec![envelope.to_wire()],
            head: user.clone(),
            response: user.clone(),
        })
    })
    .await?;
    // The key is in this answer only: the stored response (for idempotent replays) never holds it.
    let mut outcome = outcome;
    if !outcome.replayed {
        outcome.body["api_key"] = api_key.secret.into();
        outcome.body["api_key_id"] = api_key.id.to_string().into();
    }
    Ok(commands::created(outcome, "/users"))
}

/// The user a key route names, if the caller may manage its keys (itself, or an admin).
async fn key_owner(
    state: &AppState,
    client: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    id: &str,
) -> Result<Uuid, ApiError> {
    let caller = auth::authenticate(state, headers, client).await?;
    let id = path_id(id)?;
    if !caller.may_act_for(id) {
        return Err(ApiError::Forbidden(
            "keys can be managed only by their user",
        ));
    }
    Ok(id)
}

/// Issues another API key to the user: 201 with its id and the key (shown once).
#[utoipa::path(
    post, path = "/users/{id}/api-keys", tag = "users",
    params(UserId),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Issued; the key is shown only in this answer.", body = crate::openapi::KeyIssued),
        (status = 401, description = "No valid credential (`unauthenticated`).", body = ErrorBody),
        (status = 403, description = "Another user's keys (`forbidden`).", body = ErrorBody),
        (status = 422, description = "A malformed id (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn create_key(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user_id = key_owner(&state, client, &headers, &id).await?;
    let key = auth::issue_key()?;
    let client = state.pool.get().await?;
    client
        .execute(
            "INSERT INTO api_keys (id, user_id, digest) VALUES ($1, $2, $3)",
            &[&key.id, &user_id, &key.digest],
        )
        .await?;
    tracing::info!(user.id = %user_id, key.id = %key.id, "API key issued");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(serde_json::json!({
            "id": key.id,
            "user_id": user_id,
            "api_key": key.secret,
        })),
    )
        .into_response())
}

/// Revokes one of the user's keys: 204; every API process refuses it from then on.
#[utoipa::path(
    delete, path = "/users/{id}/api-keys/{key_id}", tag = "users",
    params(UserId, ("key_id" = Uuid, Path, description = "The key's id.")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked: every API process refuses the key from now on."),
        (status = 401, description = "No valid credential (`unauthenticated`).", body = ErrorBody),
        (status = 403, description = "Another user's keys (`forbidden`).", body = ErrorBody),
        (status = 404, description = "The user has no such key (`not_found`).", body = ErrorBody),
        (status = 422, description = "A malformed id (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn revoke_key(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    Path((id, key_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user_id = key_owner(&state, client, &headers, &id).await?;
    let key_id = Uuid::parse_str(&key_id)
        .map_err(|_| ApiError::Validation(vec![FieldError::new("key_id", "must be a UUID")]))?;
    let client = state.pool.get().await?;
    let revoked = client
        .execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
              WHERE id = $1 AND user_id = $2",
            &[&key_id, &user_id],
        )
        .await?;
    if revoked == 0 {
        return Err(ApiError::NotFound("api key"));
    }
    tracing::info!(user.id = %user_id, key.id = %key_id, "API key revoked");
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// Whether a projected user already has this address (the claim table covers unprojected ones).
async fn email_taken(state: &AppState, email_lower: &str) -> Result<bool, ApiError> {
    let client = state.pool.get().await?;
    Ok(client
        .query_opt(
            "SELECT 1 FROM users WHERE lower(email) = $1 LIMIT 1",
            &[&email_lower],
        )
        .await?
        .is_some())
}

/// A user from the projection.
#[utoipa::path(
    get, path = "/users/{id}", tag = "users",
    params(UserId),
    responses(
        (status = 200, description = "The user.", body = UserState),
        (status = 404, description = "No such user (`not_found`).", body = ErrorBody),
        (status = 422, description = "A malformed id (`validation_failed`).", body = ErrorBody),
    ),
)]
async fn get_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<UserState>, ApiError> {
    let id = path_id(&id)?;
    query::wait_projected(
        &state.projection_commits,
        state.read_wait,
        0,
        |u: &UserState| u.version,
        || {
            query::projected(
                &state.read_pool,
                "users",
                USER_COLUMNS,
                id,
                user_from_row,
                || (),
            )
        },
    )
    .await?
    .map(Json)
    .ok_or(ApiError::NotFound("user"))
}

/// Whether `id` names a user: projected, or accepted by this API and not yet projected.
pub(crate) async fn user_exists(state: &AppState, id: Uuid) -> Result<bool, ApiError> {
    let client = state.pool.get().await?;
    Ok(client
        .query_opt(
            "SELECT 1 FROM users WHERE id = $1
             UNION ALL
             SELECT 1 FROM stream_heads WHERE aggregate_id = $1 AND aggregate_type = 'user'
             LIMIT 1",
            &[&id],
        )
        .await?
        .is_some())
}
