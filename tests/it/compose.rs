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
