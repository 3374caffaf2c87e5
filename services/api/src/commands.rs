//! The command log: idempotency keys and the transactional outbox in one table (`api_commands`).
//!
//! A command (create user, create product) is recorded with the exact events it appends and the
//! response it answers *before* anything is sent to Kafka. Then the events are produced in order, each
//! awaited before the next, and the row is marked published. So:
//! - a client retry with the same `Idempotency-Key` and body gets the stored response and appends
//!   nothing (or, if the first attempt died half-way, re-sends the same events, with the same ids);
//! - if the process dies between two appends, the relay (in every API process) finds the row still
//!   unpublished after a grace period and re-sends its events. Consumers ignore what they already
//!   applied, so a re-sent event changes nothing.

use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::config::Fault;
use crate::domain::FieldError;
use crate::error::ApiError;
use crate::state::{AppState, EVENT_SOURCE};

/// A command ready to be recorded and published.
pub(crate) struct Command {
    /// Id of the aggregate the command creates; also the row's id.
    pub(crate) id: Uuid,
    /// `METHOD /path` the command came through; scopes idempotency keys.
    pub(crate) route: &'static str,
    /// The client's `Idempotency-Key`, if any.
    pub(crate) idempotency_key: Option<String>,
    /// Fingerprint of the request, to tell a retry from a different request under the same key.
    pub(crate) request_hash: Vec<u8>,
    /// The JSON envelopes to append, in order.
    pub(crate) events: Vec<String>,
    /// The body to answer, now and on every retry.
    pub(crate) response: Value,
    /// A lower-cased e-mail this command claims (user registration).
    pub(crate) email_claim: Option<String>,
}

/// What happened to a command.
pub(crate) enum Outcome {
    /// Recorded and published now.
    Created(Value),
    /// A retry of an earlier command: its stored response.
    Replayed(Value),
}

impl Outcome {
    /// `201 Created` with the body and `Location: {collection}/{id}`; a replay is marked with
    /// `idempotent-replayed: true`.
    pub(crate) fn respond(self, collection: &str) -> Response {
        let (body, replayed) = match self {
            Outcome::Created(body) => (body, false),
            Outcome::Replayed(body) => (body, true),
        };
        let location = format!("{collection}/{}", body["id"].as_str().unwrap_or_default());
        let mut response = (
            StatusCode::CREATED,
            [(header::LOCATION, location)],
            Json(body),
        )
            .into_response();
        if replayed {
            response.headers_mut().insert(
                "idempotent-replayed",
                header::HeaderValue::from_static("true"),
            );
        }
        response
    }
}

/// The fingerprint of a request: route plus body with keys sorted and whitespace dropped.
pub(crate) fn request_hash(route: &str, body: &[u8]) -> Vec<u8> {
    let canonical = serde_json::from_slice::<Value>(body)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hasher.finalize().to_vec()
}

/// If `key` was used before on `route`, the outcome of that command (after finishing its publication).
pub(crate) async fn replay_if_known(
    state: &AppState,
    route: &str,
    key: &str,
    request_hash: &[u8],
) -> Result<Option<Outcome>, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, request_hash, events, response, published_at IS NOT NULL
               FROM api_commands WHERE route = $1 AND idempotency_key = $2",
            &[&route, &key],
        )
        .await?;
    drop(client);
    let Some(row) = row else { return Ok(None) };
    let stored_hash: Vec<u8> = row.get(1);
    if stored_hash != request_hash {
        return Err(ApiError::IdempotencyKeyReused);
    }
    if !row.get::<_, bool>(4) {
        tracing::info!(command.id = %row.get::<_, Uuid>(0), "finishing a command whose first attempt did not complete");
        publish(state, row.get(0), &row.get::<_, Vec<String>>(2), None).await?;
    }
    Ok(Some(Outcome::Replayed(row.get(3))))
}

/// Records the command, then publishes its events; see the module docs.
pub(crate) async fn execute(state: &AppState, command: Command) -> Result<Outcome, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO api_commands (id, route, idempotency_key, request_hash, events, response)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (route, idempotency_key) DO NOTHING",
            &[
                &command.id,
                &command.route,
                &command.idempotency_key,
                &command.request_hash,
                &command.events,
                &command.response,
            ],
        )
        .await?;
    if inserted == 0 {
        // A concurrent request with the same key won the race: answer as its retry.
        drop(tx);
        drop(client);
        let key = command.idempotency_key.as_deref().unwrap_or_default();
        return replay_if_known(state, command.route, key, &command.request_hash)
            .await?
            .ok_or_else(|| ApiError::Internal("idempotency row vanished".into()));
    }
    if let Some(email) = &command.email_claim {
        let claimed = tx
            .execute(
                "INSERT INTO api_user_emails (email_lower, user_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[email, &command.id],
            )
            .await?;
        if claimed == 0 {
            return Err(ApiError::Conflict(FieldError::new(
                "email",
                "a user with this e-mail address already exists",
            )));
        }
    }
    tx.commit().await.map_err(|e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            ApiError::Conflict(FieldError::new("id", "already exists"))
        } else {
            e.into()
        }
    })?;
    drop(client);
    publish(state, command.id, &command.events, state.fault).await?;
    Ok(Outcome::Created(command.response))
}

/// Produces `events` in order, awaiting each acknowledgement before sending the next, then marks the
/// command published.
async fn publish(
    state: &AppState,
    id: Uuid,
    events: &[String],
    fault: Option<Fault>,
) -> Result<(), ApiError> {
    for (i, json) in events.iter().enumerate() {
        send(state, json).await?;
        if i == 0 && events.len() > 1 && fault == Some(Fault::DieAfterFirstAppend) {
            return Err(ApiError::Internal(
                "injected fault: died after the first append".into(),
            ));
        }
    }
    let client = state.pool.get().await?;
    client
        .execute(
            "UPDATE api_commands SET published_at = now() WHERE id = $1 AND published_at IS NULL",
            &[&id],
        )
        .await?;
    Ok(())
}

async fn send(state: &AppState, json: &str) -> Result<(), ApiError> {
    let wire: events::WireEnvelope = serde_json::from_str(json)
        .map_err(|e| ApiError::Internal(format!("stored event is not an envelope: {e}")))?;
    let key = wire.aggregate_id.to_string();
    let (partition, offset) = state
        .producer
        .send(
            state.topics.for_aggregate(wire.aggregate_type),
            &key,
            json.as_bytes(),
            platform::kafka::headers(&wire, EVENT_SOURCE),
            Duration::from_secs(10),
        )
        .await?;
    tracing::debug!(
        event.id = %wire.event_id,
        event.r#type = %wire.event_type,
        kafka.partition = partition,
        kafka.offset = offset,
        "event appended"
    );
    Ok(())
}

/// Settings of the outbox relay.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    /// Time between sweeps.
    pub interval: Duration,
    /// Minimum age of an unpublished command before it is re-sent.
    pub grace: Duration,
    /// How long published commands (and so idempotency keys) are kept.
    pub retention: Duration,
}

/// Re-sends the events of commands left unpublished, until `shutdown` turns true.
pub async fn relay(state: AppState, settings: RelaySettings, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.changed() => return,
        }
        match relay_once(&state, settings.grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(commands = n, "outbox relay re-sent unpublished commands"),
            Err(error) => tracing::warn!(%error, "outbox relay sweep failed; will retry"),
        }
        if let Err(error) = expire(&state, settings.retention).await {
            tracing::warn!(%error, "cannot expire old idempotency keys");
        }
    }
}

/// One sweep: re-sends up to 100 stale unpublished commands, each locked so that several API processes
/// never work on the same one. Returns how many it finished.
pub async fn relay_once(state: &AppState, grace: Duration) -> Result<usize, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, events FROM api_commands
              WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1)
              ORDER BY created_at LIMIT 100
              FOR UPDATE SKIP LOCKED",
            &[&grace.as_secs_f64()],
        )
        .await?;
    for row in &rows {
        let id: Uuid = row.get(0);
        for json in row.get::<_, Vec<String>>(1) {
            send(state, &json).await?;
        }
        tx.execute(
            "UPDATE api_commands SET published_at = now() WHERE id = $1",
            &[&id],
        )
        .await?;
        tracing::info!(command.id = %id, "outbox relay published a command");
    }
    tx.commit().await?;
    Ok(rows.len())
}

async fn expire(state: &AppState, retention: Duration) -> Result<(), ApiError> {
    let client = state.pool.get().await?;
    client
        .execute(
            "DELETE FROM api_commands
              WHERE published_at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await?;
    Ok(())
}
