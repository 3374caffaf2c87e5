//! Liveness (`/healthz`) and readiness (`/readyz`) probes, and the metrics (`/metrics`).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// Prometheus metrics of this process (text format 0.0.4): requests by route and status with latency
/// histograms, cache reads by source, the outbox; see the README ("Metrics").
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "The metrics, in the Prometheus text format.",
        content_type = "text/plain", body = String)),
)]
async fn metrics() -> axum::response::Response {
    platform::metrics::metrics_response().await
}

/// The process is up, serving HTTP, and not wedged: 503 when every connection of a pool is checked
/// out and none comes back within `DB_TIMEOUT_MS` (connections held by work that never ends; a restart
/// is the cure). A busy pool (requests shed after `API_POOL_WAIT_MS`) is not wedged, and PostgreSQL
/// being down is a readiness matter, not liveness.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Alive.", body = crate::openapi::Health),
        (status = 503, description = "Wedged: restart the process.", body = crate::openapi::Health),
    ),
)]
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    use deadpool_postgres::{PoolError, TimeoutType, Timeouts};
    let timeouts = Timeouts {
        wait: Some(state.db_timeout),
        ..Timeouts::default()
    };
    for (name, pool) in [("commands", &state.pool), ("reads", &state.read_pool)] {
        if let Err(PoolError::Timeout(TimeoutType::Wait)) = pool.timeout_get(&timeouts).await {
            if pool.status().available == 0 {
                tracing::error!(
                    pool.name = name,
                    pool.size = pool.status().size,
                    "every database connection is held and none came back: wedged"
                );
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(
                        json!({ "status": "wedged", "reason": "no database connection came back" }),
                    ),
                );
            }
        }
    }
    (StatusCode::OK, Json(json!({ "status": "ok" })))
}

/// PostgreSQL and the Kafka brokers answer, the producer can send and the event topics exist; 503
/// naming the failing checks otherwise.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic.", body = crate::openapi::Readiness),
        (status = 503, description = "Not ready; `checks` names what failed.", body = crate::openapi::Readiness),
    ),
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let timeout = Duration::from_secs(2);
    let topics = state.topics.all();
    let (pg, kafka) = tokio::join!(
        tokio::time::timeout(timeout, platform::db::ping(&state.pool)),
        platform::kafka::ping(&state.producer, &topics, timeout),
    );
    // The report names what failed in fixed words; the driver's text (addresses, names) goes only to
    // the log.
    let pg = match pg {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: postgres failed");
            "unavailable".to_owned()
        }
        Err(_) => "timed out".to_owned(),
    };
    let kafka = match kafka {
        Ok(()) => "ok".to_owned(),
        Err(error) => {
            tracing::warn!(error = ?error, "readiness: kafka failed");
            error.to_string()
        }
    };
    let ready = pg == "ok" && kafka == "ok";
    if !ready {
        tracing::warn!(postgres = %pg, kafka = %kafka, "not ready");
    }
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "status": if ready { "ready" } else { "unavailable" },
            "checks": { "postgres": pg, "kafka": kafka },
        })),
    )
}
