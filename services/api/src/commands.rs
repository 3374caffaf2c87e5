//! Commands: decided against the stream's head, recorded with their events in one transaction, then
//! published in order.
//!
//! A command (create user, create / edit / delete product) runs [`execute`]:
//! 1. the route decides the events from the stream's head (read without a lock; none for a creation)
//!    and the version the client expects; then one statement (`catalog_append_command`, one round
//!    trip) records the command (`api_commands`: idempotency key, request fingerprint, the response),
//!    moves the head from the version the decision was made on (compare-and-set) and appends the events
//!    (`event_store`). If another writer moved the head meanwhile, nothing is written and the route
//!    decides again on the new head. So the order of every stream's events is decided here, once,
//!    whoever writes (the image worker and re-drives append through the same head). A registration,
//!    which also claims an e-mail address and issues a key, does the same steps in one transaction
//!    holding the head locked (`platform::event_store::lock_head`);
//! 2. after the commit the stream's unpublished events are produced in sequence order, each
//!    acknowledged before the next (`platform::event_store::publish_stream`), in a task of its own:
//!    a client that hangs up (or the request timeout) does not stop it.
//!
//! - A client retry with the same `Idempotency-Key` and body gets the stored response and appends
//!   nothing (publishing first what the first attempt may have left unpublished).
//! - If the process dies between the commit and the acknowledgements, the relay (in every API process)
//!   publishes the stream once its events are older than a grace period. Consumers ignore what they
//!   already applied, so an event produced twice changes nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::auth::KeyCheck;
use crate::config::Fault;
use crate::domain::FieldError;
use crate::error::ApiError;
use crate::state::{AppState, EVENT_SOURCE};
use platform::event_store::{self, NewEvent, StoreError};

/// A command ready to be decided and recorded.
pub(crate) struct Command {
    /// Id of the command's row: the aggregate id for a creation, a fresh id otherwise.
    pub(crate) id: Uuid,
    /// The stream the command appends to.
    pub(crate) aggregate_id: Uuid,
    /// `METHOD /path` the command came through; scopes idempotency keys.
    pub(crate) route: &'static str,
    /// The client's `Idempotency-Key`, if any.
    pub(crate) idempotency_key: Option<String>,
    /// Fingerprint of the request, to tell a retry from a different request under the same key.
    pub(crate) request_hash: Vec<u8>,
    /// A lower-cased e-mail this command claims (user registration).
    pub(crate) email_claim: Option<String>,
    /// An API key this command issues to the aggregate (user registration): its id and digest.
    pub(crate) key_grant: Option<(Uuid, Vec<u8>)>,
    /// The command creates its stream (a fresh id): there is no head to read.
    pub(crate) creates: bool,
    /// The caller's API key, taken from memory: the statement that records the command checks it.
    pub(crate) key_check: Option<Arc<KeyCheck>>,
}

impl Command {
    /// The statement that recorded (or refused) the command found the caller's remembered key valid.
    fn key_confirmed(&self) {
        if let Some(check) = &self.key_check {
            check.confirmed();
        }
    }

    /// The database found the caller's remembered key revoked: it is forgotten, and the answer is 401.
    fn key_revoked(&self, state: &AppState) -> ApiError {
        if let Some(check) = &self.key_check {
            check.revoked(state);
        }
        ApiError::Unauthenticated
    }
}

/// What a route decided, given the stream's head.
pub(crate) struct Decision {
    /// The version the events follow (0: the stream is created).
    pub(crate) expected: u64,
    /// The events to append, in order (none: the command changes nothing).
    pub(crate) events: Vec<events::WireEnvelope>,
    /// The stream's state after them (the new head).
    pub(crate) head: Value,
    /// The body to answer, now and on every retry.
    pub(crate) response: Value,
}

/// What happened to a command.
pub(crate) struct Outcome {
    /// The stored response body.
    pub(crate) body: Value,
    /// Whether this is the answer to an earlier attempt (`idempotent-replayed: true`).
    pub(crate) replayed: bool,
}

/// The fingerprint of a request: route, the path's id, plus body with keys sorted and whitespace
/// dropped.
pub(crate) fn request_hash(route: &str, id: Option<Uuid>, body: &[u8]) -> Vec<u8> {
    let canonical = serde_json::from_slice::<Value>(body)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update(b"\n");
    if let Some(id) = id {
        hasher.update(id.as_bytes());
    }
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hasher.finalize().to_vec()
}

/// If `key` was used before on `route`, the outcome of that command (after publishing what its
/// stream still has unpublished); `None` without a key. A caller's API key taken from memory
/// (`key_check`) is checked in the same query, before anything is published or answered.
pub(crate) async fn replay_if_known(
    state: &AppState,
    route: &str,
    key: Option<&str>,
    request_hash: &[u8],
    key_check: Option<&KeyCheck>,
) -> Result<Option<Outcome>, ApiError> {
    let Some(key) = key else { return Ok(None) };
    let client = state.pool.get().await?;
    let api_key = key_check.map(KeyCheck::key_id);
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT request_hash, response, aggregate_id,
                            EXISTS (SELECT 1 FROM api_keys WHERE id = $3 AND revoked_at IS NULL)
                       FROM api_commands
                      WHERE route = $1 AND idempotency_key = $2",
                )
                .await?,
            &[&route, &key, &api_key],
        )
        .await?;
    drop(client);
    let Some(row) = row else { return Ok(None) };
    if let Some(check) = key_check {
        if !row.get::<_, bool>(3) {
            check.revoked(state);
            return Err(ApiError::Unauthenticated);
        }
        check.confirmed();
    }
    let stored_hash: Vec<u8> = row.get(0);
    if stored_hash != request_hash {
        return Err(ApiError::IdempotencyKeyReused);
    }
    if let Some(aggregate_id) = row.get::<_, Option<Uuid>>(2) {
        publish_to_the_end(state, aggregate_id).await?;
    }
    Ok(Some(Outcome {
        body: row.get(1),
        replayed: true,
    }))
}

/// How many times a command decides again because other writers moved its stream's head meanwhile,
/// before it decides once more with the head locked (so a very busy stream still makes progress).
const OPTIMISTIC_ATTEMPTS: usize = 8;

/// Decides, records and publishes `command`; see the module docs. `decide` gets the stream's head
/// (version and state JSON; `None` if the stream does not exist); it may be called again if the head
/// moved before the command was recorded.
pub(crate) async fn execute(
    state: &AppState,
    command: Command,
    mut decide: impl FnMut(Option<(u64, Value)>) -> Result<Decision, ApiError>,
) -> Result<Outcome, ApiError> {
    if command.email_claim.is_some() || command.key_grant.is_some() {
        return execute_locked(state, command, decide).await;
    }
    let client = state.pool.get().await?;
    for _ in 0..OPTIMISTIC_ATTEMPTS {
        let head = if command.creates {
            None
        } else {
            event_store::read_head(&client, command.aggregate_id).await?
        };
        let decision = decide(head)?;
        let record = event_store::CommandRecord {
            id: command.id,
            route: command.route,
            idempotency_key: command.idempotency_key.as_deref(),
            request_hash: &command.request_hash,
            response: &decision.response,
            api_key: command.key_check.as_ref().map(|k| k.key_id()),
        };
        if state.fault == Some(Fault::LoseEveryRace) && !command.creates {
            // The injected fault: answered as a compare-and-set that found the head moved.
            continue;
        }
        let written = event_store::append_command(
            &client,
            &record,
            command.aggregate_id,
            decision.expected,
            &decision.events,
            &decision.head,
            EVENT_SOURCE,
        )
        .await;
        match written {
            Ok(event_store::CommandWritten::Appended) => {
                command.key_confirmed();
                drop(client);
                return published(state, &command, decision).await;
            }
            Ok(event_store::CommandWritten::Duplicate) => {
                // A concurrent request with the same key won the race: answer as its retry. (The
                // statement checked the caller's key before it found the duplicate.)
                command.key_confirmed();
                drop(client);
                return replay_concurrent(state, &command).await;
            }
            Err(StoreError::VersionMismatch { .. }) if command.creates => {
                command.key_confirmed();
                return Err(ApiError::Conflict(FieldError::new("id", "already exists")));
            }
            Err(StoreError::VersionMismatch { .. }) => continue,
            Err(StoreError::KeyRevoked(_)) => {
                return Err(command.key_revoked(state));
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    execute_locked(state, command, decide).await
}

/// The answer of a command whose idempotency key a concurrent request recorded first.
async fn replay_concurrent(state: &AppState, command: &Command) -> Result<Outcome, ApiError> {
    replay_if_known(
        state,
        command.route,
        command.idempotency_key.as_deref(),
        &command.request_hash,
        command.key_check.as_deref(),
    )
    .await?
    .ok_or_else(|| ApiError::Internal("idempotency row vanished".into()))
}

/// After the command is recorded: publishes its events in order and answers.
async fn published(
    state: &AppState,
    command: &Command,
    decision: Decision,
) -> Result<Outcome, ApiError> {
    if state.fault == Some(Fault::DieBeforePublish) && !decision.events.is_empty() {
        return Err(ApiError::Internal(
            "injected fault: died after the commit, before publishing".into(),
        ));
    }
    if !decision.events.is_empty() {
        // A creation's rows are locked too: a client retrying it with the same key publishes the
        // same stream, possibly while this publish is still waiting for the broker.
        publish_to_the_end(state, command.aggregate_id).await?;
    }
    Ok(Outcome {
        body: decision.response,
        replayed: false,
    })
}

/// [`execute`] in one transaction that holds the stream's head locked while `decide` runs: for
/// commands that also claim an e-mail address or issue a key, and for a stream so busy that
/// deciding on an unlocked head kept losing the race.
async fn execute_locked(
    state: &AppState,
    command: Command,
    decide: impl FnOnce(Option<(u64, Value)>) -> Result<Decision, ApiError>,
) -> Result<Outcome, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let head = event_store::lock_head::<Value>(&tx, command.aggregate_id).await?;
    let decision = decide(head)?;
    // The caller's key taken from memory, checked now that the head is locked and the command is
    // about to be recorded (as the one-statement path checks it in that statement).
    if let Some(check) = &command.key_check {
        let valid = tx
            .query_opt(
                &tx.prepare_cached("SELECT 1 FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
                    .await?,
                &[&check.key_id()],
            )
            .await?;
        if valid.is_none() {
            return Err(command.key_revoked(state));
        }
        command.key_confirmed();
    }
    let inserted = tx
        .execute(
            &tx.prepare_cached("INSERT INTO api_commands (id, route, idempotency_key, request_hash, response, aggregate_id)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (route, idempotency_key) DO NOTHING").await?,
            &[
                &command.id,
                &command.route,
                &command.idempotency_key,
                &command.request_hash,
                &decision.response,
                &command.aggregate_id,
            ],
        )
        .await?;
    if inserted == 0 {
        // A concurrent request with the same key won the race: answer as its retry.
        drop(tx);
        drop(client);
        return replay_concurrent(state, &command).await;
    }
    if let Some(email) = &command.email_claim {
        let claimed = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO api_user_emails (email_lower, user_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                )
                .await?,
                &[email, &command.aggregate_id],
            )
            .await?;
        if claimed == 0 {
            return Err(ApiError::Conflict(FieldError::new(
                "email",
                "a user with this e-mail address already exists",
            )));
        }
    }
    if let Some((key_id, digest)) = &command.key_grant {
        tx.execute(
            &tx.prepare_cached("INSERT INTO api_keys (id, user_id, digest) VALUES ($1, $2, $3)")
                .await?,
            &[key_id, &command.aggregate_id, digest],
        )
        .await?;
    }
    let new_events: Vec<NewEvent> = decision.events.iter().cloned().map(NewEvent::new).collect();
    event_store::append(
        &tx,
        command.aggregate_id,
        decision.expected,
        &new_events,
        &decision.head,
        EVENT_SOURCE,
    )
    .await?;
    tx.commit().await.map_err(|e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            ApiError::Conflict(FieldError::new("id", "already exists"))
        } else {
            e.into()
        }
    })?;
    drop(client);
    published(state, &command, decision).await
}

/// Publishes every unpublished event of the stream, in order, once one of the publishing slots is
/// free (see [`crate::state::Shared::publishing`]).
async fn publish(state: &AppState, aggregate_id: Uuid) -> Result<(), ApiError> {
    let waiting = metrics::gauge!("publishes_waiting");
    waiting.increment(1.0);
    let slot = state.publishing.acquire().await;
    waiting.decrement(1.0);
    let _slot = slot.map_err(|_| ApiError::Internal("the publishing slots are closed".into()))?;
    guarded(
        state,
        event_store::publish_stream(&state.pool, &state.producer, &state.topics, aggregate_id),
    )
    .await
}

/// [`publish`] in a task of its own, run to its end even if the request is abandoned: a client that
/// hangs up, or the request timeout, drops the handler's future, and with it anything it awaits. The
/// change is already decided and recorded by then, so it is published now rather than left to the
/// relay (which must first scan the log for what might have landed).
async fn publish_to_the_end(state: &AppState, aggregate_id: Uuid) -> Result<(), ApiError> {
    let state = state.clone();
    tokio::spawn(async move { publish(&state, aggregate_id).await })
        .await
        .map_err(|e| ApiError::Internal(format!("publishing task: {e}")))?
}

/// Runs a publish through the broker's circuit breaker. While the broker keeps failing, a write does
/// not wait for the producer's message timeout: its events are already recorded, so it is answered
/// 503 at once and the outbox relay publishes them when the broker is back. One write per cool-down
/// probes the broker; its success closes the circuit.
async fn guarded<T>(
    state: &AppState,
    publish: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<(), ApiError> {
    let Some(attempt) = state.broker_breaker.attempt() else {
        return Err(ApiError::Unavailable(
            "the broker is not answering; the change is recorded and will be published when it is back"
                .into(),
        ));
    };
    let result = publish.await;
    attempt.record(!matches!(result, Err(StoreError::Kafka(_))));
    result?;
    Ok(())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // The head is locked while a command decides, so only a racing creation can get here.
            StoreError::VersionMismatch { .. } | StoreError::AlreadyAnswered(_) => {
                ApiError::Conflict(FieldError::new("id", "already exists"))
            }
            StoreError::KeyRevoked(_) => ApiError::Unauthenticated,
            StoreError::Pool(e) => e.into(),
            StoreError::Postgres(e) => e.into(),
            StoreError::Kafka(e) => e.into(),
            StoreError::Corrupt(detail) => ApiError::Internal(detail),
        }
    }
}

/// Settings of the outbox relay.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    /// Time between sweeps.
    pub interval: Duration,
    /// Minimum age of an unpublished event before the relay publishes its stream.
    pub grace: Duration,
    /// How long commands (and so idempotency keys) and published events are kept in PostgreSQL.
    pub retention: Duration,
}

/// Publishes streams left with unpublished events, until `shutdown` turns true.
pub async fn relay(state: AppState, settings: RelaySettings, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.changed() => return,
        }
        match relay_once(&state, settings.grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "outbox relay published pending events"),
            Err(error) => tracing::warn!(%error, "outbox relay sweep failed; will retry"),
        }
        match event_store::waiting(&state.pool).await {
            #[allow(clippy::cast_precision_loss)]
            Ok((events, oldest)) => {
                metrics::gauge!("outbox_events_waiting").set(events as f64);
                metrics::gauge!("outbox_oldest_waiting_seconds").set(oldest);
            }
            Err(error) => tracing::debug!(%error, "cannot measure the outbox"),
        }
        if let Err(error) = expire(&state, settings.retention).await {
            tracing::warn!(%error, "cannot expire old commands");
        }
    }
}

/// One sweep: publishes up to 100 streams whose events waited longer than `grace`. Returns how many
/// events it published.
pub async fn relay_once(state: &AppState, grace: Duration) -> Result<usize, ApiError> {
    Ok(event_store::relay_once(&state.pool, &state.producer, &state.topics, grace, 100).await?)
}

async fn expire(state: &AppState, retention: Duration) -> Result<(), ApiError> {
    let client = state.pool.get().await?;
    client
        .execute(
            &client
                .prepare_cached(
                    "DELETE FROM api_commands WHERE created_at < now() - make_interval(secs => $1)",
                )
                .await?,
            &[&retention.as_secs_f64()],
        )
        .await?;
    Ok(())
}

/// `201 Created` (or the given status) for an outcome, marked `idempotent-replayed: true` on a replay.
pub(crate) fn replayed_header(response: &mut axum::response::Response, outcome: &Outcome) {
    if outcome.replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
}

/// `201 Created` with the body and `Location: {collection}/{id}`.
pub(crate) fn created(outcome: Outcome, collection: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let location = format!(
        "{collection}/{}",
        outcome.body["id"].as_str().unwrap_or_default()
    );
    let mut response = (
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        axum::Json(outcome.body.clone()),
    )
        .into_response();
    replayed_header(&mut response, &outcome);
    response
}
