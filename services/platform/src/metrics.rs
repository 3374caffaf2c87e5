//! Prometheus metrics: one recorder per process, recorded through the `metrics` facade and rendered in
//! the Prometheus text format at `GET /metrics` (the API's own router; a small listener of its own in
//! each consumer, see [`serve`]).
//!
//! Durations are histograms in seconds with fixed buckets (so they aggregate across instances);
//! counters end in `_total`. The series every service exports are listed in the README ("Metrics").

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Bucket bounds of every duration histogram, in seconds: 1 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (every service calls this at start-up; tests that
/// run several services in one process share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(SECONDS_BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only this one"
            );
        }
        // Histograms keep raw samples until upkeep folds them into their buckets.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        handle
    })
}

/// The current values in the Prometheus text format.
pub fn render() -> String {
    handle().render()
}

/// `GET /metrics`, for any axum router.
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new().route("/metrics", axum::routing::get(metrics_response))
}

/// The answer of `GET /metrics`.
pub async fn metrics_response() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
        .into_response()
}

/// Serves `GET /metrics` on `listener` until `shutdown` (a consumer's metrics listener).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    let app: axum::Router = router().fallback(|| async { axum::http::StatusCode::NOT_FOUND });
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "metrics listener stopped");
    }
}

/// Binds `addr` (empty: no listener) and serves `GET /metrics` there in the background until the
/// returned guard is dropped. A port that cannot be bound is logged and skipped: metrics never keep a
/// consumer from working.
pub async fn serve(addr: &str) -> Option<Listener> {
    if addr.is_empty() {
        return None;
    }
    handle();
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, addr, "cannot bind the metrics listener; serving no metrics");
            return None;
        }
    };
    let local = listener.local_addr().ok()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_on(listener, async move {
        let _ = stopped.await;
    }));
    Some(Listener {
        addr: local,
        _stop: stop,
    })
}

/// A running metrics listener; stops when dropped.
pub struct Listener {
    /// The bound address.
    pub addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Records librdkafka's per-partition consumer lag from a statistics document (the `stats_raw`
/// callback, once a second): `kafka_consumer_lag{client, topic, partition}`, the messages between the
/// group's committed offset and the end of the partition (last stable offset under read_committed).
/// Partitions this instance does not hold read 0, so a sum over instances is the group's lag.
pub fn record_consumer_lag(statistics: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Stats {
        client_id: String,
        #[serde(default)]
        topics: std::collections::HashMap<String, Topic>,
    }
    #[derive(serde::Deserialize)]
    struct Topic {
        #[serde(default)]
        partitions: std::collections::HashMap<String, Partition>,
    }
    #[derive(serde::Deserialize)]
    struct Partition {
        #[serde(default)]
        fetch_state: String,
        #[serde(default)]
        consumer_lag: i64,
    }
    let Ok(stats) = serde_json::from_slice::<Stats>(statistics) else {
        return;
    };
    for (topic, t) in stats.topics {
        for (partition, p) in t.partitions {
            // librdkafka's internal "-1" partition (unassigned messages) is not a partition.
            if partition.starts_with('-') {
                continue;
            }
            let lag = if p.fetch_state == "active" {
                p.consumer_lag.max(0)
            } else {
                0
            };
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!(
                "kafka_consumer_lag",
                "client" => stats.client_id.clone(),
                "topic" => topic.clone(),
                "partition" => partition,
            )
            .set(lag as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lag_is_read_from_librdkafka_statistics() {
        super::handle();
        let stats = serde_json::json!({
            "client_id": "lag-test-client",
            "topics": {"lag-test-topic": {"partitions": {
                "0": {"fetch_state": "active", "consumer_lag": 42},
                "1": {"fetch_state": "none", "consumer_lag": -1},
                "-1": {"fetch_state": "none", "consumer_lag": -1}
            }}}
        });
        super::record_consumer_lag(stats.to_string().as_bytes());
        let text = super::render();
        let line = |p: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("kafka_consumer_lag{")
                        && l.contains("lag-test-topic")
                        && l.contains(&format!("partition=\"{p}\""))
                })
                .map(str::to_owned)
        };
        assert!(line("0").unwrap().ends_with(" 42"), "{text}");
        assert!(line("1").unwrap().ends_with(" 0"), "{text}");
        assert!(line("-1").is_none(), "{text}");
    }
}
