//! Keeps the published contract (schemas and examples under `events/`) and the code in step.

use std::path::{Path, PathBuf};

use events::{AnyEnvelope, DecodeError, WireEnvelope, event_id_for};
use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn examples() -> Vec<(String, Value)> {
    let mut out: Vec<_> = std::fs::read_dir(dir("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read_json(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_event_type_has_a_schema_and_an_example() {
    let mut schemas: Vec<_> = std::fs::read_dir(dir("schemas"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    schemas.sort();
    let examples: Vec<_> = examples().into_iter().map(|(n, _)| n).collect();
    assert_eq!(schemas, examples);
    for known in [
        "UserRegistered.v1.json",
        "ProductCreated.v1.json",
        "ImagesRequested.v1.json",
    ] {
        assert!(schemas.iter().any(|s| s == known), "missing {known}");
    }
}

#[test]
fn every_example_matches_its_schema_and_round_trips() {
    for (name, example) in examples() {
        let schema = read_json(&dir("schemas").join(&name));
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&example)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");

        let bytes = serde_json::to_vec(&example).unwrap();
        let decoded = AnyEnvelope::from_json(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let again = serde_json::to_value(decoded.to_wire()).unwrap();
        if again["schema_version"] == example["schema_version"] {
            assert_eq!(again, example, "{name} does not round-trip");
        } else {
            // An old version: read as the current one, which must match the current schema and keep
            // every field the old one had.
            let current = format!(
                "{}.v{}.json",
                example["event_type"].as_str().unwrap(),
                again["schema_version"]
            );
            let schema = read_json(&dir("schemas").join(&current));
            let validator = jsonschema::validator_for(&schema).unwrap();
            assert!(
                validator.is_valid(&again),
                "{name} upcast does not match {current}"
            );
            for (field, value) in example["data"].as_object().unwrap() {
                assert_eq!(
                    &again["data"][field], value,
                    "{name}: upcasting changed {field}"
                );
            }
        }

        let wire: WireEnvelope = serde_json::from_value(example).unwrap();
        assert_eq!(
            wire.event_id,
            event_id_for(wire.aggregate_id, wire.sequence),
            "{name}: event id"
        );
    }
}

#[test]
fn a_schema_rejects_what_the_contract_forbids() {
    let schema = read_json(&dir("schemas").join("ProductCreated.v1.json"));
    let validator = jsonschema::validator_for(&schema).unwrap();
    let (_, mut example) = examples()
        .into_iter()
        .find(|(n, _)| n == "ProductCreated.v1.json")
        .unwrap();
    example["data"]["product_price"] = serde_json::json!(349.9);
    assert!(
        !validator.is_valid(&example),
        "a float price must not validate"
    );
}

#[test]
fn unknown_types_and_future_versions_are_refused_not_guessed() {
    let (_, example) = examples()
        .into_iter()
        .find(|(n, _)| n == "ProductCreated.v1.json")
        .unwrap();

    let mut unknown = example.clone();
    unknown["event_type"] = "ProductTeleported".into();
    let err = AnyEnvelope::from_json(&serde_json::to_vec(&unknown).unwrap()).unwrap_err();
    assert!(matches!(err, DecodeError::UnknownEventType { .. }), "{err}");

    let mut future = example;
    future["schema_version"] = 99.into();
    let err = AnyEnvelope::from_json(&serde_json::to_vec(&future).unwrap()).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnsupportedVersion { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn the_pipeline_topics_examples_match_their_schemas() {
    for name in ["ImageJob.v1.json", "DeadLetter.v1.json"] {
        let schema = read_json(&dir("schemas/pipeline").join(name));
        let example = read_json(&dir("examples/pipeline").join(name));
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&example)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
}
