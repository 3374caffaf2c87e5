//! Prometheus metrics: the API's `/metrics` and each consumer's metrics listener are scraped before
//! and after real work, and the series that describe that work must have moved.

use std::collections::HashMap;

use crate::helpers::{TestEnv, eventually};
use crate::pipeline::{ImageServer, create_product, settled};
use crate::procs::free_port;

/// Scrapes `url` and returns every sample as `series → value` (series = name with its labels, as
/// printed, labels sorted).
pub(crate) async fn scrape(url: &str) -> HashMap<String, f64> {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (normalise(series), value.parse::<f64>().unwrap())
        })
        .collect()
}

/// `name{b="2",a="1"}` → `name{a="1",b="2"}`, so tests can name series without knowing label order.
fn normalise(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_owned();
    };
    let mut labels: Vec<&str> = labels.trim_end_matches('}').split("\",").collect();
    for l in &mut labels {
        *l = l.trim_end_matches('"');
    }
    labels.sort_unstable();
    let labels: Vec<String> = labels.iter().map(|l| format!("{l}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// The value of `series` (0 when absent).
fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(&normalise(series)).copied().unwrap_or(0.0)
}

/// Sum of every series named `name` whose labels include all of `with`.
pub(crate) fn sum(samples: &HashMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| {
            s.split_once('{').map_or(s.as_str(), |(n, _)| n) == name
                && with.iter().all(|w| s.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_metrics_that_move_with_the_work() {
    let env = TestEnv::new().await;
    let images = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector_addr = format!("127.0.0.1:{}", free_port());
    let mut projector_config = env.projector_config();
    projector_config.metrics_addr.clone_from(&projector_addr);
    let projector = env.spawn_projector_with(projector_config);
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let mut worker_config = env.worker_config();
    worker_config.metrics_addr.clone_from(&worker_addr);
    let worker = env.spawn_worker_with(worker_config);
    let api_metrics = api.url("/metrics");
    let projector_metrics = format!("http://{projector_addr}/metrics");
    let worker_metrics = format!("http://{worker_addr}/metrics");
    eventually("the consumers' metrics listeners answer", || async {
        let p = reqwest::get(&projector_metrics).await.ok()?;
        let w = reqwest::get(&worker_metrics).await.ok()?;
        (p.status() == 200 && w.status() == 200).then_some(())
    })
    .await;

    let before_api = scrape(&api_metrics).await;
    let before_projector = scrape(&projector_metrics).await;
    let before_worker = scrape(&worker_metrics).await;

    let user = api.create_user().await;
    let id = create_product(
        &api,
        &user,
        &[images.url("/photo/metrics.jpg"), images.url("/missing.jpg")],
    )
    .await;
    let product = settled(&api, &id, 3).await;
    assert_eq!(product["images"][0]["status"], "ready");
    assert_eq!(product["images"][1]["status"], "failed");
    // Two more reads: the second is served by a cache tier.
    api.get(&format!("/products/{id}")).await;
    api.get(&format!("/products/{id}")).await;

    let after_api = scrape(&api_metrics).await;
    let created = r#"http_requests_total{method="POST",route="/products",status="201"}"#;
    assert_eq!(
        value(&after_api, created) - value(&before_api, created),
        1.0,
        "one POST /products answered 201"
    );
    let latency =
        r#"http_request_duration_seconds_count{method="POST",route="/products",status="201"}"#;
    assert_eq!(
        value(&after_api, latency) - value(&before_api, latency),
        1.0
    );
    assert!(
        after_api
            .keys()
            .any(|s| s.starts_with("http_request_duration_seconds_bucket{")
                && s.contains("le=\"0.005\"")),
        "latency is a histogram with buckets"
    );
    let reads =
        sum(&after_api, "product_reads_total", &[]) - sum(&before_api, "product_reads_total", &[]);
    assert!(
        reads >= 3.0,
        "every product read is counted by source: {reads}"
    );
    assert!(
        sum(&after_api, "product_reads_total", &["source=\"local\""])
            + sum(&after_api, "product_reads_total", &["source=\"hit\""])
            > 0.0,
        "a cache tier served a read"
    );
    assert!(
        after_api.contains_key("outbox_events_waiting"),
        "the outbox is measured"
    );

    let after_projector = eventually(
        "the projector's counters include the image results",
        || async {
            let after = scrape(&projector_metrics).await;
            let applied = sum(&after, "projector_events_total", &["result=\"applied\""])
                - sum(
                    &before_projector,
                    "projector_events_total",
                    &["result=\"applied\""],
                );
            // UserRegistered, ProductCreated, ImagesRequested, ImagesProcessed.
            (applied >= 4.0).then_some(after)
        },
    )
    .await;
    assert!(
        sum(
            &after_projector,
            "projector_batch_duration_seconds_count",
            &[]
        ) > sum(
            &before_projector,
            "projector_batch_duration_seconds_count",
            &[]
        )
    );
    let products_topic = env.kafka().topics().products;
    let partitions = after_projector
        .keys()
        .filter(|s| {
            s.starts_with("kafka_consumer_lag{")
                && s.contains("client=\"catalog-projector\"")
                && s.contains(&format!("topic=\"{products_topic}\""))
        })
        .count();
    assert_eq!(partitions, 3, "lag of each partition of the products topic");

    let after_worker = scrape(&worker_metrics).await;
    let moved = |series: &str, with: &[&str]| {
        sum(&after_worker, series, with) - sum(&before_worker, series, with)
    };
    assert_eq!(moved("image_results_total", &["outcome=\"ready\""]), 1.0);
    assert_eq!(
        moved(
            "image_results_total",
            &["outcome=\"failed\"", "error_class=\"http_4xx\""]
        ),
        1.0
    );
    assert_eq!(
        moved("image_dead_letters_total", &["error_class=\"http_4xx\""]),
        1.0
    );
    assert!(
        moved("image_download_bytes_total", &[]) > 10_000.0,
        "the photo's bytes"
    );
    assert!(moved("image_job_duration_seconds_count", &[]) >= 1.0);
    assert!(
        after_worker.contains_key("image_dead_letters"),
        "dead-letter depth is measured"
    );

    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}
