//! The catalog HTTP API.
//!
//! Commands (`POST /users`, `POST /products`) are validated, recorded in the command log and appended to
//! Kafka as events; the answer is 201 only once the broker acknowledged them. Reads come from the
//! PostgreSQL projection that the projector maintains.

pub mod auth;
pub mod changes;
pub mod commands;
pub mod config;
pub mod domain;
pub mod error;
pub mod extract;
mod openapi;
mod query;
pub mod read;
mod routes;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use crate::commands::RelaySettings;
pub use crate::config::{Config, Fault};
use crate::error::{ApiError, REQUEST_ID};
use crate::extract::BodyLimit;
pub use crate::state::AppState;

/// Why the API could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// PostgreSQL setup failed.
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    /// Kafka client setup or topic creation failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The cache settings are invalid (REDIS_URL).
    #[error("cache (REDIS_URL): {0}")]
    Cache(String),
    /// The credential settings are invalid (the message names the variable).
    #[error("{0}")]
    Auth(String),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The application's routes and middleware over `state`.
pub fn router(state: AppState, config: &Config) -> Router {
    let routes = openapi::with_docs(documented_routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), guard_reads))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(serde_json::json!({
                    "code": "method_not_allowed",
                    "message": "this method is not allowed on this path",
                })),
            )
        })
        .with_state(state);
    with_middleware(routes, config)
}

/// Every route of the API, each with its OpenAPI operation.
fn documented_routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .merge(routes::health::router())
        .merge(routes::contract::router())
        .merge(routes::users::router())
        .merge(routes::products::router())
        .merge(changes::router())
        .merge(routes::images::router())
}

/// The OpenAPI 3.1 document the API serves at `GET /openapi.json` (also committed as
/// `docs/openapi.json`).
pub fn openapi_document() -> String {
    openapi::render(&openapi::finish(
        openapi::with_own_route(documented_routes()).1,
    ))
}

/// With `AUTH_READS=authenticated`, reads need a credential too (probes excepted).
async fn guard_reads(
    axum::extract::State(state): axum::extract::State<AppState>,
    auth::ClientAddr(client): auth::ClientAddr,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let probe = matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/asyncapi.yaml" | "/openapi.json" | "/docs"
    ) || path.starts_with("/schemas/")
        || path.starts_with("/docs/");
    if state.auth.reads_need_credentials() && request.method() == axum::http::Method::GET && !probe
    {
        if let Err(error) = auth::authenticate(&state, request.headers(), client).await {
            return error.into_response();
        }
    }
    next.run(request).await
}

/// The middleware every route runs behind: request id, tracing span, timeout, body limit. Public so
/// that the benchmark's static-JSON ceiling runs through exactly the same stack.
pub fn with_middleware(routes: Router, config: &Config) -> Router {
    let limit = config.max_body_bytes;
    let timeout = config.request_timeout();
    let slots = ClientSlots::new(config.client_concurrency);
    routes
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(move |mut req: Request, next: Next| {
            req.extensions_mut().insert(BodyLimit(limit));
            next.run(req)
        }))
        .layer(middleware::from_fn(
            move |req: Request, next: Next| async move {
                // A request that takes too long is answered 503 with the usual JSON error body.
                match tokio::time::timeout(timeout, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::Unavailable("the request timed out".into()).into_response(),
                }
            },
        ))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let slots = slots.clone();
            async move { slots.run(req, next).await }
        }))
        .layer(middleware::from_fn(trace_request))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
        .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
        .layer(middleware::from_fn(bound_request_id))
}

/// Requests in progress per client address, bounded: one client (however many connections it opens)
/// cannot hold every pooled connection, waiting read and worker task. Probes are not counted, so a
/// flood from the orchestrator's address never fails liveness.
#[derive(Clone)]
struct ClientSlots {
    limit: usize,
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One request's slot, given back when the request ends, however it ends (answered, timed out, or
/// dropped when its client hangs up).
struct ClientSlot {
    slots: ClientSlots,
    client: std::net::IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut in_flight = self.slots.in_flight.lock().expect("never poisoned");
        if let Some(n) = in_flight.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.client);
            }
        }
    }
}

impl ClientSlots {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            in_flight: Arc::default(),
        }
    }

    /// A slot for `client`, or `None` when it holds `limit` already (a limit of 0: no limit).
    fn take(&self, client: std::net::IpAddr) -> Option<ClientSlot> {
        let mut in_flight = self.in_flight.lock().expect("never poisoned");
        let n = in_flight.entry(client).or_default();
        if self.limit > 0 && *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
        })
    }

    async fn run(&self, request: Request, next: Next) -> Response {
        let client = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let probe = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
        let Some(client) = client.filter(|_| self.limit > 0 && !probe) else {
            return next.run(request).await;
        };
        let Some(_slot) = self.take(client) else {
            return ApiError::TooManyInFlight.into_response();
        };
        next.run(request).await
    }
}

/// Longest client-supplied `x-request-id` kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's `x-request-id` is copied into events, the command log and every log line, so only a short
/// id of plain characters (letters, digits, `-_.:`) is kept; any other is replaced by a fresh UUID.
async fn bound_request_id(mut request: Request, next: Next) -> Response {
    let acceptable = request.headers().get(X_REQUEST_ID).is_none_or(|v| {
        let v = v.as_bytes();
        !v.is_empty()
            && v.len() <= MAX_REQUEST_ID_LEN
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if !acceptable {
        request.headers_mut().remove(X_REQUEST_ID);
    }
    next.run(request).await
}

/// One span per request (method, route, path, request id; status and latency when done), and the
/// request id made available to error bodies.
async fn trace_request(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let request_id = request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().clone();
    let span = tracing::info_span!(
        "http.request",
        http.method = %request.method(),
        http.route = %route,
        http.path = %request.uri().path(),
        request.id = %request_id,
        http.status = tracing::field::Empty,
        http.latency_ms = tracing::field::Empty,
    );
    let response = REQUEST_ID
        .scope(request_id, next.run(request).instrument(span.clone()))
        .await;
    let status = response.status();
    let elapsed = start.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let labels = [
        ("method", method.to_string()),
        ("route", route),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    span.record("http.status", status.as_u16());
    span.record("http.latency_ms", latency_ms);
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::error!(
                http.status = status.as_u16(),
                http.latency_ms = latency_ms,
                "request failed"
            );
        } else if status.is_client_error() {
            tracing::warn!(
                http.status = status.as_u16(),
                http.latency_ms = latency_ms,
                "request rejected"
            );
        } else {
            tracing::info!(
                http.status = status.as_u16(),
                http.latency_ms = latency_ms,
                "request served"
            );
        }
    });
    response
}

/// Connects to PostgreSQL and Kafka (migrating and creating topics if configured).
pub async fn build_state(config: &Config) -> Result<AppState, StartupError> {
    platform::metrics::handle();
    if config.run_migrations {
        platform::db::ensure_database(&config.db).await?;
        platform::db::migrate(&config.db).await?;
    }
    let wait = Duration::from_millis(config.pool_wait_ms);
    let pool = platform::db::pool_sized(&config.db, config.db.pool_size, wait)?;
    platform::db::ping(&pool).await?;
    let read_pool_size = match config.read_pool_size {
        0 => config.db.pool_size,
        n => n,
    };
    let read_pool = platform::db::pool_sized(&config.db, read_pool_size, wait)?;
    if config.kafka.create_topics {
        platform::kafka::ensure_topics(&config.kafka).await?;
    }
    let producer = platform::kafka::EventProducer::new(&config.kafka, "catalog-api")?;
    Ok(AppState::new(state::Shared {
        pool,
        read_pool,
        producer,
        publishing: Arc::new(tokio::sync::Semaphore::new(
            config.db.pool_size.saturating_sub(2).max(1),
        )),
        broker_breaker: Arc::new(platform::breaker::CircuitBreaker::new(
            "kafka (request path)",
            config.broker_breaker_failures,
            Duration::from_millis(config.broker_breaker_cool_down_ms),
        )),
        topics: Arc::new(config.kafka.topics()),
        projection_commits: platform::db::projection_commits(&config.db, Duration::from_millis(10)),
        read_wait: Duration::from_millis(config.read_wait_ms),
        db_timeout: config.db.timeout(),
        cache: platform::cache::ProductCache::connect(&config.cache)
            .map_err(|e| StartupError::Cache(e.to_string()))?,
        local: (config.cache_local_ttl_ms > 0).then(|| {
            Arc::new(read::LocalTier::new(
                Duration::from_millis(config.cache_local_ttl_ms),
                config.cache_local_max_entries,
            ))
        }),
        loads: Arc::default(),
        auth: Arc::new(auth::Authenticator::new(&config.auth).map_err(StartupError::Auth)?),
        local_images: (!config.local_images_dir.is_empty())
            .then(|| std::path::PathBuf::from(&config.local_images_dir)),
        changes: Arc::new(changes::Feed::new(
            config.kafka.clone(),
            config.kafka.topics().products,
            config.changes_max_clients,
            config.changes_buffer,
            Duration::from_millis(config.changes_slow_client_ms),
        )),
        fault: config.fault,
    }))
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting, finishes in-flight
/// requests, flushes the producer and returns. Runs the outbox relay alongside.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let state = build_state(&config).await?;
    let (stop_relay, relay_stopped) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(commands::relay(
        state.clone(),
        RelaySettings {
            interval: Duration::from_millis(config.outbox_interval_ms),
            grace: Duration::from_millis(config.outbox_grace_ms),
            retention: Duration::from_secs(u64::from(config.idempotency_retention_hours) * 3600),
        },
        relay_stopped,
    ));
    tracing::info!(addr = %listener.local_addr()?, "catalog API listening");
    let app = router(state.clone(), &config);
    let feed = state.changes.clone();
    serve(
        listener,
        app,
        Duration::from_millis(config.header_timeout_ms),
        ClientSlots::new(config.client_connections),
        async move {
            shutdown.await;
            // Change-feed streams never end by themselves: end them so connections can close.
            feed.close();
        },
    )
    .await;
    let _ = stop_relay.send(true);
    let _ = relay.await;
    flush(&state).await;
    tracing::info!("catalog API stopped");
    Ok(())
}

/// Serves `app` on `listener` over HTTP/1.1 until `shutdown`, then stops accepting, lets every
/// connection finish the request in hand and returns.
///
/// Unlike `axum::serve`, a client must send each request's headers within `header_timeout` (an idle
/// keep-alive connection gets the same time to start its next request), so connections that trickle
/// headers or sit idle are closed instead of held for good, and one address may hold `connections`
/// connections at once (the rest are closed as they are accepted).
async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    connections: ClientSlots,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let (close, closing) = tokio::sync::watch::channel(false);
    let mut open = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while open.try_join_next().is_some() {}
        let Some(slot) = connections.take(addr.ip()) else {
            tracing::warn!(client = %addr.ip(), "too many connections from this address; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(addr));
                request
            },
        ));
        let mut closing = closing.clone();
        open.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = closing.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = close.send(true);
    while open.join_next().await.is_some() {}
}

async fn flush(state: &AppState) {
    let producer = state.producer.clone();
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
}
