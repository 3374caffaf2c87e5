//! Replay: a rebuilt projection equals the live one row for row, and reads never fail while a
//! side-by-side rebuild runs and switches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use events::{
    Decimal, Envelope, ImageOutcome, ImageOutcomeStatus, ImageRef, ImagesProcessed,
    ImagesRequested, ProductCreated, ProductDeleted, ProductEvent, ProductUpdated,
};
use rdkafka::producer::FutureRecord;
use uuid::Uuid;

use crate::helpers::{TestEnv, eventually};

/// A varied history: every product created and requested; most processed (some images failed); every
/// fifth re-driven and processed again.
fn histories(count: usize) -> Vec<Envelope<ProductEvent>> {
    let mut out = Vec::new();
    for n in 0..count {
        let id = Uuid::now_v7();
        let images: Vec<ImageRef> = (0..2)
            .map(|p| ImageRef {
                position: p,
                url: format!("https://x.example/{n}/{p}.jpg"),
            })
            .collect();
        let outcome = |position: u32, ready: bool| ImageOutcome {
            position,
            url: format!("https://x.example/{n}/{position}.jpg"),
            status: if ready {
                ImageOutcomeStatus::Ready
            } else {
                ImageOutcomeStatus::Failed
            },
            variants: vec![],
            error_class: (!ready).then(|| "timeout".to_owned()),
            reason: (!ready).then(|| "gave up".to_owned()),
            placeholder: None,
        };
        let mut events = vec![
            ProductEvent::Created(ProductCreated {
                user_id: Uuid::now_v7(),
                product_name: format!("Product {n}"),
                product_description: String::new(),
                product_price: Decimal::new(n as i64 * 101, 2),
                currency: "EUR".into(),
                product_images: images.iter().map(|i| i.url.clone()).collect(),
            }),
            ProductEvent::ImagesRequested(ImagesRequested {
                images: images.clone(),
            }),
        ];
        if n % 4 != 3 {
            events.push(ProductEvent::ImagesProcessed(ImagesProcessed {
                request_sequence: 2,
                request_event_id: None,
                images: vec![outcome(0, true), outcome(1, n % 5 != 0)],
            }));
            if n % 5 == 0 {
                events.push(ProductEvent::ImagesRequested(ImagesRequested {
                    images: vec![images[1].clone()],
                }));
                events.push(ProductEvent::ImagesProcessed(ImagesProcessed {
                    request_sequence: 4,
                    request_event_id: None,
                    images: vec![outcome(1, true)],
                }));
            }
        }
        // Edits and deletions too: a price change, an image list that moves one image and drops the
        // other, and every seventh product withdrawn.
        if n % 3 == 1 {
            events.push(ProductEvent::Updated(ProductUpdated {
                product_price: Some(Decimal::new(n as i64 * 7, 1)),
                product_images: Some(vec![
                    format!("https://x.example/{n}/new.jpg"),
                    images[0].url.clone(),
                ]),
                ..ProductUpdated::default()
            }));
            events.push(ProductEvent::ImagesRequested(ImagesRequested {
                images: vec![ImageRef {
                    position: 0,
                    url: format!("https://x.example/{n}/new.jpg"),
                }],
            }));
        }
        if n % 7 == 6 {
            events.push(ProductEvent::Deleted(ProductDeleted {}));
        }
        for (i, e) in events.into_iter().enumerate() {
            out.push(Envelope::new(id, i as u64 + 1, Utc::now(), None, e));
        }
    }
    out
}

fn options(env: &TestEnv, switch: bool) -> projector::replay::ReplayOptions {
    let config = env.projector_config();
    projector::replay::ReplayOptions {
        kafka: env.kafka(),
        db: env.db(),
        live_group: config.group_id,
        batch_size: 200,
        side_by_side: true,
        switch,
        progress: false,
        cache: Some(env.api_config().cache),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_equals_the_live_projection_and_switches_without_a_failed_read() {
    const PRODUCTS: usize = 700;
    let env = TestEnv::new().await;
    let api = Arc::new(env.spawn_api().await);
    let projector = env.spawn_projector();
    let history = histories(PRODUCTS);
    env.publish(&history).await;
    let client = env.pg().await;
    let total_events = history.len() as i64;
    eventually("the live projection has every event", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM product_events", &[])
            .await
            .unwrap()
            .get(0);
        (n == total_events).then_some(())
    })
    .await;

    // Rebuild beside the live tables, without switching: identical row for row.
    let report = projector::replay::replay(&options(&env, false))
        .await
        .unwrap();
    assert!(report.events >= history.len() as u64);
    let pool = platform::db::pool(&env.db()).unwrap();
    let differences = projector::replay::compare(&pool, &env.schema, &report.schema)
        .await
        .unwrap();
    assert!(differences.is_empty(), "{differences:?}");
    // The comparison does see a difference when there is one.
    client
        .batch_execute(&format!(
            "UPDATE {}.products SET product_name = 'tampered' WHERE id = (SELECT id FROM {0}.products LIMIT 1)",
            report.schema
        ))
        .await
        .unwrap();
    let differences = projector::replay::compare(&pool, &env.schema, &report.schema)
        .await
        .unwrap();
    assert_eq!(differences.len(), 2, "{differences:?}");
    client
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", report.schema))
        .await
        .unwrap();

    // A live row gone wrong (as after a projection bug), and cached: the switch must repair both.
    let broken: Uuid = client
        .query_one(
            "SELECT id FROM products WHERE deleted_at IS NULL ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let good: serde_json::Value = api
        .get(&format!("/products/{broken}"))
        .await
        .json()
        .await
        .unwrap();
    client
        .execute(
            "UPDATE products SET product_name = 'corrupted' WHERE id = $1",
            &[&broken],
        )
        .await
        .unwrap();
    let cache = platform::cache::ProductCache::connect(&env.api_config().cache)
        .unwrap()
        .unwrap();
    assert!(cache.wait_connected(Duration::from_secs(15)).await);
    cache.invalidate(broken, 0).await.unwrap();
    let version = good["version"].as_u64().unwrap();
    let mut corrupted = good.clone();
    corrupted["product_name"] = "corrupted".into();
    cache
        .fill(broken, version, &serde_json::to_vec(&corrupted).unwrap())
        .await
        .unwrap();
    assert_eq!(
        api.get(&format!("/products/{broken}"))
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap()["product_name"],
        "corrupted"
    );

    // Now rebuild and switch while readers hammer existing products and new events keep coming.
    let ids: Vec<Uuid> = history
        .iter()
        .filter(|e| e.sequence == 1)
        .map(|e| e.aggregate_id)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (api, ids, stop, reads, failures) = (
                api.clone(),
                ids.clone(),
                stop.clone(),
                reads.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut i = r;
                while !stop.load(Ordering::SeqCst) {
                    let id = ids[i % ids.len()];
                    i += 7;
                    let status = api.get(&format!("/products/{id}")).await.status();
                    reads.fetch_add(1, Ordering::SeqCst);
                    if status != 200 {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let more = histories(20);
    let writer = {
        let env_kafka = env.kafka();
        let more = more.clone();
        tokio::spawn(async move {
            let producer = platform::kafka::producer(&env_kafka, "test").unwrap();
            for e in &more {
                producer
                    .send(
                        FutureRecord::to(&env_kafka.topics().products)
                            .key(&e.aggregate_id.to_string())
                            .payload(&e.to_json())
                            .headers(crate::helpers::test_headers(&e.to_json())),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let report = projector::replay::replay(&options(&env, true))
        .await
        .unwrap();
    writer.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    assert!(report.switched);
    assert!(report.switch_held.is_some());
    assert!(
        report.changed_products.iter().any(|(id, _)| *id == broken),
        "the corrupted row changed"
    );
    let repaired: serde_json::Value = api
        .get(&format!("/products/{broken}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        repaired, good,
        "the switch repaired the row and invalidated its cache entry"
    );
    assert!(
        reads.load(Ordering::SeqCst) > 50,
        "the readers ran during the rebuild"
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no read failed during the rebuild and switch"
    );

    // The live projector goes on after the switch: everything, including what arrived meanwhile, is
    // there exactly once.
    let expected = (history.len() + more.len()) as i64;
    eventually("the switched projection has every event", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM product_events", &[])
            .await
            .unwrap()
            .get(0);
        (n == expected).then_some(())
    })
    .await;
    let products: i64 = client
        .query_one("SELECT count(*) FROM products", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(products, (PRODUCTS + 20) as i64);
    let side_schemas: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ($1, $2)",
            &[&report.schema, &format!("{}_retired", report.schema)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(side_schemas, 0, "the old rows are retired");

    projector.stop().await;
    if let Ok(api) = Arc::try_unwrap(api) {
        api.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_replay_rebuilds_the_same_rows() {
    let env = TestEnv::new().await;
    let projector = env.spawn_projector();
    let history = histories(40);
    env.publish(&history).await;
    let client = env.pg().await;
    let total = history.len() as i64;
    eventually("projected", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM product_events", &[])
            .await
            .unwrap()
            .get(0);
        (n == total).then_some(())
    })
    .await;
    projector.stop().await;
    let snapshot = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    let before = snapshot("SELECT p::text FROM products p ORDER BY id").await;
    let mut opts = options(&env, true);
    opts.side_by_side = false;
    let report = projector::replay::replay(&opts).await.unwrap();
    assert_eq!(report.events, history.len() as u64);
    let after = snapshot("SELECT p::text FROM products p ORDER BY id").await;
    assert_eq!(after, before, "the in-place rebuild produced the same rows");
    env.cleanup().await;
}
