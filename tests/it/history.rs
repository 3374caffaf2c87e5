//! A product's history: `GET /products/:id/events` and `GET /products/:id?as_of_version=N`.

use std::time::Duration;

use chrono::Utc;
use events::{
    Decimal, Envelope, ImageOutcome, ImageOutcomeStatus, ImageRef, ImageVariant, ImagesProcessed,
    ImagesRequested, ProductCreated, ProductEvent, ProductState,
};
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{TestEnv, eventually};

fn outcome(position: u32, ready: bool) -> ImageOutcome {
    ImageOutcome {
        position,
        url: format!("https://x.example/{position}.jpg"),
        status: if ready {
            ImageOutcomeStatus::Ready
        } else {
            ImageOutcomeStatus::Failed
        },
        variants: if ready {
            vec![ImageVariant {
                position,
                variant: "thumb".into(),
                format: "webp".into(),
                url: format!("https://cdn.example/{position}.webp"),
                key: format!("images/{position}.webp"),
                width: 256,
                height: 171,
                bytes: 4321,
            }]
        } else {
            vec![]
        },
        error_class: (!ready).then(|| "http_4xx".to_owned()),
        reason: (!ready).then(|| "404".to_owned()),
        placeholder: None,
    }
}

/// Created, requested, processed (one image failed), re-driven, processed again.
fn history(id: Uuid) -> Vec<Envelope<ProductEvent>> {
    let images: Vec<ImageRef> = (0..2)
        .map(|p| ImageRef {
            position: p,
            url: format!("https://x.example/{p}.jpg"),
        })
        .collect();
    let events = vec![
        ProductEvent::Created(ProductCreated {
            user_id: Uuid::now_v7(),
            product_name: "Lamp".into(),
            product_description: "Brass".into(),
            product_price: Decimal::new(4900, 2),
            currency: "EUR".into(),
            product_images: images.iter().map(|i| i.url.clone()).collect(),
        }),
        ProductEvent::ImagesRequested(ImagesRequested {
            images: images.clone(),
        }),
        ProductEvent::ImagesProcessed(ImagesProcessed {
            request_sequence: 2,
            request_event_id: None,
            images: vec![outcome(0, true), outcome(1, false)],
        }),
        ProductEvent::ImagesRequested(ImagesRequested {
            images: vec![images[1].clone()],
        }),
        ProductEvent::ImagesProcessed(ImagesProcessed {
            request_sequence: 4,
            request_event_id: None,
            images: vec![outcome(1, true)],
        }),
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| Envelope::new(id, i as u64 + 1, Utc::now(), None, e))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_of_a_product_can_be_read_back() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let id = Uuid::now_v7();
    let stream = history(id);
    env.publish(&stream).await;
    eventually("version 5 is projected", || async {
        let p: Value = api
            .get(&format!("/products/{id}"))
            .await
            .json()
            .await
            .ok()?;
        (p["version"] == 5).then_some(())
    })
    .await;

    for version in 1..=5 {
        let r = api
            .get(&format!("/products/{id}?as_of_version={version}"))
            .await;
        assert_eq!(r.status(), 200, "version {version}");
        let got: Value = r.json().await.unwrap();
        let expected = ProductState::fold(&stream[..version]).unwrap().unwrap();
        assert_eq!(
            got,
            serde_json::to_value(&expected).unwrap(),
            "as of version {version}"
        );
    }
    let latest: Value = api
        .get(&format!("/products/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        latest,
        api.get(&format!("/products/{id}?as_of_version=5"))
            .await
            .json::<Value>()
            .await
            .unwrap()
    );
    assert_eq!(
        api.get(&format!("/products/{id}?as_of_version=6"))
            .await
            .status(),
        404
    );
    assert_eq!(
        api.get(&format!("/products/{id}?as_of_version=0"))
            .await
            .status(),
        422
    );

    // The history, two events a page.
    let mut seen = Vec::new();
    let mut after = 0u64;
    let mut pages = 0;
    loop {
        let page: Value = api
            .get(&format!("/products/{id}/events?limit=2&after={after}"))
            .await
            .json()
            .await
            .unwrap();
        pages += 1;
        for e in page["items"].as_array().unwrap() {
            seen.push((
                e["sequence"].as_u64().unwrap(),
                e["event_id"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<(u64, String)> = stream
        .iter()
        .map(|e| (e.sequence, e.event_id.to_string()))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(
        api.get(&format!("/products/{}/events", Uuid::now_v7()))
            .await
            .status(),
        404
    );
    assert_eq!(
        api.get(&format!("/products/{id}/events?limit=0"))
            .await
            .status(),
        422
    );

    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_event_is_upcast_and_projected() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let id = Uuid::now_v7();
    // A ProductCreated exactly as schema version 1 wrote it (no `currency`), from the published example.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../events/examples/ProductCreated.v1.json");
    let mut v1: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v1["aggregate_id"] = id.to_string().into();
    v1["event_id"] = events::event_id_for(id, 1).to_string().into();
    assert_eq!(v1["schema_version"], 1);
    assert!(v1["data"].get("currency").is_none());
    let requested = Envelope::new(
        id,
        2,
        Utc::now(),
        None,
        ProductEvent::ImagesRequested(ImagesRequested { images: vec![] }),
    );
    let producer = platform::kafka::producer(&env.kafka(), "test").unwrap();
    for payload in [serde_json::to_vec(&v1).unwrap(), requested.to_json()] {
        producer
            .send(
                FutureRecord::to(&env.kafka().topics().products)
                    .key(&id.to_string())
                    .payload(&payload)
                    .headers(crate::helpers::test_headers(&payload)),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let product: Value = eventually("the v1 product is projected", || async {
        let p: Value = api
            .get(&format!("/products/{id}"))
            .await
            .json()
            .await
            .ok()?;
        (p["version"] == 2).then_some(p)
    })
    .await;
    assert_eq!(
        product["product_currency"], "EUR",
        "upcast to v2: v1 prices were euros"
    );
    assert_eq!(product["product_name"], v1["data"]["product_name"]);
    assert_eq!(product["product_price"], v1["data"]["product_price"]);
    let history: Value = api
        .get(&format!("/products/{id}/events"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        history["items"][0]["schema_version"], 2,
        "history is served in the current version"
    );
    assert_eq!(history["items"][0]["data"]["currency"], "EUR");
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}
