//! The docker compose file cannot run here (no Docker engine); check it statically instead.

use serde_yaml::Value;

#[test]
fn the_compose_file_defines_every_service_the_readme_mentions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("compose/docker-compose.yml")).unwrap();
    let mut compose: Value = serde_yaml::from_str(&text).unwrap();
    compose.apply_merge().unwrap(); // resolve the `<<: *catalog-env` merge keys as compose does
    let services = compose["services"].as_mapping().expect("services");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for name in [
        "kafka",
        "postgres",
        "redis",
        "s3",
        "api",
        "projector",
        "image-worker",
    ] {
        assert!(services.contains_key(name), "compose lacks service {name}");
        assert!(
            readme.contains(&format!("`{name}`")),
            "README does not mention `{name}`"
        );
    }
    // Kafka runs in KRaft mode (no ZooKeeper).
    let kafka = &services["kafka"]["environment"];
    assert!(
        kafka["KAFKA_PROCESS_ROLES"]
            .as_str()
            .unwrap()
            .contains("controller")
    );
    assert!(!services.contains_key("zookeeper"));
    // Every service built from this repository names its binary and waits for its dependencies.
    for name in ["api", "projector", "image-worker"] {
        let service = &services[name];
        assert!(
            service["depends_on"].as_mapping().is_some(),
            "{name} depends_on"
        );
        assert!(
            service["environment"]["KAFKA_BROKERS"].is_string(),
            "{name} KAFKA_BROKERS"
        );
        assert!(
            service["environment"]["DB_HOST"].is_string(),
            "{name} DB_HOST"
        );
    }
    assert_eq!(services["api"]["ports"][0].as_str(), Some("8080:8080"));
}

/// Prometheus scrapes the address each service's metrics listen on, and every series the Grafana
/// dashboard queries is one the services record (its name appears in their source).
#[test]
fn prometheus_scrapes_every_service_and_the_dashboard_queries_real_series() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("compose/docker-compose.yml")).unwrap();
    let mut compose: Value = serde_yaml::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    let services = &compose["services"];
    for name in ["prometheus", "grafana"] {
        assert!(services[name]["image"].is_string(), "compose lacks {name}");
    }
    let prometheus: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("compose/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let targets: Vec<String> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|job| {
            job["static_configs"][0]["targets"]
                .as_sequence()
                .unwrap()
                .clone()
        })
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    // The API serves /metrics on its own port; each consumer on its METRICS_ADDR.
    let api_port = services["api"]["environment"]["API_ADDR"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    assert!(targets.contains(&format!("api:{api_port}")), "{targets:?}");
    for name in ["projector", "image-worker"] {
        let port = services[name]["environment"]["METRICS_ADDR"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} sets METRICS_ADDR"))
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        assert!(
            targets.contains(&format!("{name}:{port}")),
            "{name}: {targets:?}"
        );
    }

    let mut source = String::new();
    let mut dirs = vec![root.join("services")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                source.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("compose/grafana/dashboards/catalog.json")).unwrap(),
    )
    .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // Metric names: identifiers followed by `[` or `{` or `)` inside the PromQL.
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let base = word
                    .strip_suffix("_bucket")
                    .or_else(|| word.strip_suffix("_count"))
                    .unwrap_or(word);
                let is_metric = base.contains('_')
                    && (base.ends_with("_total")
                        || base.ends_with("_seconds")
                        || base.ends_with("_lag")
                        || base.ends_with("_waiting")
                        || base.ends_with("_letters"));
                if is_metric {
                    queried += 1;
                    assert!(
                        source.contains(&format!("\"{base}\"")),
                        "the dashboard queries {base}, which no service records"
                    );
                }
            }
        }
    }
    assert!(queried >= 10, "the dashboard queries the catalog's series");
}
