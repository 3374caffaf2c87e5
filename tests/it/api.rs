//! The write → log → projection → read path through the HTTP API.

use std::time::Duration;

use rdkafka::Message;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestEnv, eventually, header, keyed, product_body};

#[tokio::test]
async fn a_created_product_is_readable_after_projection() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();

    let user_id = api.create_user().await;
    let response = api.post("/products", &product_body(&user_id)).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(location, format!("/products/{id}"));
    assert_eq!(created["version"], 2);
    assert_eq!(created["product_price"], "349.90");
    assert_eq!(created["images"][1]["status"], "pending");
    assert_eq!(created["compressed_product_images"], json!([]));

    // Read-your-writes: a GET right after the POST waits for the projection to reach the version the
    // POST answered, so no polling is needed.
    let r = api.get(&location).await;
    assert_eq!(r.status(), 200);
    let read: Value = r.json().await.unwrap();
    assert_eq!(
        read, created,
        "GET answers the product as POST said it would read back"
    );

    let user: Value = api
        .get(&format!("/users/{user_id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(user["name"], "Ada");

    let list: Value = api
        .get(&format!("/products?user_id={user_id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([created]));
    assert!(list.get("next_cursor").is_none());

    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn both_events_are_in_the_product_partition_in_order_with_headers() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let user_id = api.create_user().await;
    let created: Value = api
        .post("/products", &product_body(&user_id))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();

    let messages = env.read_products_topic(|m| keyed(m, &id).len() >= 2).await;
    let mine = keyed(&messages, &id);
    assert_eq!(mine.len(), 2, "exactly two events for one product");
    assert_eq!(
        mine[0].partition(),
        mine[1].partition(),
        "one partition per product"
    );
    assert!(mine[0].offset() < mine[1].offset());
    for (message, (event_type, sequence)) in mine
        .iter()
        .zip([("ProductCreated", 1), ("ImagesRequested", 2)])
    {
        let body: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        assert_eq!(body["event_type"], event_type);
        assert_eq!(body["sequence"], sequence);
        assert_eq!(body["aggregate_id"], id.as_str());
        assert_eq!(
            body["event_id"],
            events::event_id_for(Uuid::parse_str(&id).unwrap(), sequence).to_string()
        );
        assert_eq!(header(message, "ce_type").as_deref(), Some(event_type));
        assert_eq!(
            header(message, "ce_id"),
            body["event_id"].as_str().map(str::to_owned)
        );
        assert_eq!(header(message, "ce_subject").as_deref(), Some(id.as_str()));
        assert_eq!(header(message, "ce_sequence"), Some(sequence.to_string()));
        assert_eq!(header(message, "ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(
            header(message, "ce_source").as_deref(),
            Some("/catalog/api")
        );
        assert_eq!(
            header(message, "content-type").as_deref(),
            Some("application/json")
        );
        // Every message decodes with the published contract.
        events::AnyEnvelope::from_json(message.payload().unwrap()).unwrap();
    }

    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_appends_nothing() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let user_id = api.create_user().await;
    let body = product_body(&user_id);
    let post = |body: Value, key: &'static str| {
        api.http
            .post(api.url("/products"))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };

    let first = post(body.clone(), "order-42").await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = post(body.clone(), "order-42").await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);

    let mut other = body.clone();
    other["product_price"] = json!("1.00");
    let conflict = post(other, "order-42").await.unwrap();
    assert_eq!(conflict.status(), 422);
    let error: Value = conflict.json().await.unwrap();
    assert_eq!(error["code"], "idempotency_key_reused");

    // A different key is a different product.
    let second: Value = post(body, "order-43").await.unwrap().json().await.unwrap();
    assert_ne!(second["id"], first["id"]);

    // Everything the API appended for the first product, read up to a sentinel behind the retry.
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(
        env.stream_in_log(&id, 2).await.len(),
        2,
        "the retry appended nothing"
    );

    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_crash_between_deciding_the_order_and_publishing_is_finished_by_the_relay() {
    let env = TestEnv::new().await;
    let mut faulty = env.api_config();
    faulty.fault = Some(api::Fault::DieBeforePublish);
    // This instance's relay must not do the work: we want a *later* process to recover.
    faulty.outbox_interval_ms = 3_600_000;
    let dying = env.spawn_api_with(faulty.clone()).await;
    // Users are created by a healthy process; the dying one only takes the product.
    let healthy = env.spawn_api().await;
    let user_id = healthy.create_user().await;
    healthy.stop().await;
    let response = dying.post("/products", &product_body(&user_id)).await;
    assert_eq!(
        response.status(),
        500,
        "the request died after the commit, before publishing"
    );
    dying.kill();

    let client = env.pg().await;
    let row = client
        .query_one(
            "SELECT aggregate_id::text, count(*) FILTER (WHERE published_at IS NULL)
               FROM event_store WHERE aggregate_type = 'product' GROUP BY aggregate_id",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    assert_eq!(
        row.get::<_, i64>(1),
        2,
        "both events decided, none published"
    );

    // A new API process (say, the restarted pod) and a projector; no client retries.
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let product: Value = eventually("the relay publishes the stream", || async {
        let r = api.get(&format!("/products/{id}")).await;
        if r.status() != 200 {
            return None;
        }
        let p: Value = r.json().await.ok()?;
        (p["version"] == 2).then_some(p)
    })
    .await;
    assert_eq!(product["images"].as_array().unwrap().len(), 2);
    assert!(
        product["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "pending")
    );

    let messages = env.read_products_topic(|m| keyed(m, &id).len() >= 2).await;
    let types: Vec<String> = keyed(&messages, &id)
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(m.payload().unwrap()).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // In order, once each, without a client retry.
    assert_eq!(types, ["ProductCreated", "ImagesRequested"]);

    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_naming_the_field() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let user_id = api.create_user().await;

    let fields_of = |v: &Value| -> Vec<String> {
        v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_owned())
            .collect()
    };

    let mut bad = product_body(&user_id);
    bad["product_price"] = json!(-3);
    bad["product_images"] = json!(["not a url"]);
    let r = api.post("/products", &bad).await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "validation_failed");
    assert_eq!(fields_of(&body), ["product_price", "product_images[0]"]);
    assert!(body["request_id"].is_string());

    let unknown_user = product_body(&Uuid::now_v7().to_string());
    let r = api.post("/products", &unknown_user).await;
    assert_eq!(r.status(), 422);
    assert_eq!(fields_of(&r.json().await.unwrap()), ["user_id"]);

    let r = api
        .http
        .post(api.url("/products"))
        .body("user_id=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = api
        .http
        .post(api.url("/products"))
        .header("content-type", "application/json")
        .body("{\"user_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "malformed_json");
    let r = api.post("/products", &json!([1, 2])).await;
    assert_eq!(r.status(), 422);
    let mut huge = product_body(&user_id);
    huge["product_description"] = json!("x".repeat(100_000));
    let r = api.post("/products", &huge).await;
    assert_eq!(r.status(), 413);

    let r = api.get(&format!("/products/{}", Uuid::now_v7())).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    let r = api.get("/products/not-a-uuid").await;
    assert_eq!(r.status(), 422);
    assert_eq!(fields_of(&r.json().await.unwrap()), ["id"]);
    let r = api.get("/products?user_id=x&limit=0").await;
    assert_eq!(r.status(), 422);
    assert_eq!(fields_of(&r.json().await.unwrap()), ["user_id", "limit"]);

    let r = api
        .post("/users", &json!({"name": "", "email": "nope"}))
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(fields_of(&r.json().await.unwrap()), ["name", "email"]);
    let email = format!("{}@Example.com", Uuid::new_v4().simple());
    assert_eq!(
        api.post("/users", &json!({"name": "A", "email": email}))
            .await
            .status(),
        201
    );
    let r = api
        .post(
            "/users",
            &json!({"name": "B", "email": email.to_uppercase()}),
        )
        .await;
    assert_eq!(
        r.status(),
        409,
        "e-mail addresses are unique, case-insensitively"
    );
    assert_eq!(fields_of(&r.json().await.unwrap()), ["email"]);

    let r = api.get("/nowhere").await;
    assert_eq!(r.status(), 404);
    let r = api.http.delete(api.url("/products")).send().await.unwrap();
    assert_eq!(r.status(), 405);

    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_read_waits_for_the_projection_only_for_a_bounded_time() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.read_wait_ms = 300;
    let api = env.spawn_api_with(config).await;
    // No projector runs: the user is accepted but never projected.
    let user_id = api.create_user().await;
    let started = std::time::Instant::now();
    let r = api.get(&format!("/users/{user_id}")).await;
    assert_eq!(r.status(), 404);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited for the projection"
    );
    // A product for the accepted-but-unprojected user is still accepted.
    assert_eq!(
        api.post("/products", &product_body(&user_id))
            .await
            .status(),
        201
    );
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn readiness_reports_postgres_and_kafka() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let r = api.get("/readyz").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["checks"], json!({"postgres": "ok", "kafka": "ok"}));
    assert!(
        api.get("/healthz")
            .await
            .headers()
            .contains_key("x-request-id")
    );
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_request_that_takes_too_long_gets_a_json_503() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.request_timeout_ms = 1_500;
    config.read_wait_ms = 5_000;
    let api = env.spawn_api_with(config).await;
    // No projector: reading an accepted user waits for a projection that never comes.
    let user = api.create_user().await;
    let r = api.get(&format!("/users/{user}")).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    assert!(body["request_id"].is_string());
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_event_contract_is_served_with_its_schemas() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let r = api.get("/asyncapi.yaml").await;
    assert_eq!(r.status(), 200);
    let doc: serde_yaml::Value = serde_yaml::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(doc["asyncapi"], serde_yaml::Value::from("3.0.0"));
    // Every schema the document references resolves against the API, relative to the document.
    let text = serde_yaml::to_string(&doc).unwrap();
    let refs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("$ref: ./"))
        .collect();
    assert_eq!(refs.len(), 8, "{refs:?}");
    for path in refs {
        let r = api.get(&format!("/{path}")).await;
        assert_eq!(r.status(), 200, "{path}");
        let schema: Value = r.json().await.unwrap();
        assert!(schema["$schema"].is_string(), "{path}");
    }
    assert_eq!(api.get("/schemas/Nope.v1.json").await.status(), 404);
    api.stop().await;
    env.cleanup().await;
}
