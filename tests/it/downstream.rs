//! The example downstream consumer's result matches the events.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use clap::Parser;
use events::{Decimal, Envelope, ImagesRequested, ProductCreated, ProductDeleted, ProductEvent};
use rdkafka::producer::FutureRecord;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::helpers::{TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_counts_match_the_events_even_with_duplicates() {
    let env = TestEnv::new().await;
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut expected: HashMap<Uuid, i64> = HashMap::new();
    let mut messages = Vec::new();
    for n in 0..30 {
        let user = users[n % 3];
        let id = Uuid::now_v7();
        let created = Envelope::new(
            id,
            1,
            Utc::now(),
            None,
            ProductEvent::Created(ProductCreated {
                user_id: user,
                product_name: format!("p{n}"),
                product_description: String::new(),
                product_price: Decimal::new(100, 2),
                currency: "EUR".into(),
                product_images: vec![],
            }),
        );
        let requested = Envelope::new(
            id,
            2,
            Utc::now(),
            None,
            ProductEvent::ImagesRequested(ImagesRequested { images: vec![] }),
        );
        *expected.entry(user).or_default() += 1;
        messages.push(created.clone());
        messages.push(requested);
        if n % 4 == 0 {
            messages.push(created); // delivered twice
        }
        if n % 5 == 0 {
            // Withdrawn, and the deletion delivered twice: counted down once.
            let deleted = Envelope::new(
                id,
                3,
                Utc::now(),
                None,
                ProductEvent::Deleted(ProductDeleted {}),
            );
            *expected.entry(user).or_default() -= 1;
            messages.push(deleted.clone());
            messages.push(deleted);
        }
    }
    let producer = platform::kafka::producer(&env.kafka(), "test").unwrap();
    for e in &messages {
        let wire = e.to_wire();
        producer
            .send(
                FutureRecord::to(&env.kafka().topics().products)
                    .key(&e.aggregate_id.to_string())
                    .payload(&e.to_json())
                    .headers(platform::kafka::headers(&wire, "/test")),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // One message the service should count and cannot read: kept with its reason, not skipped.
    producer
        .send(
            FutureRecord::to(&env.kafka().topics().products)
                .key("garbage")
                .payload("{\"event_type\":\"ProductCreated\"")
                .headers(
                    crate::helpers::fixture_headers().insert(rdkafka::message::Header {
                        key: "ce_type",
                        value: Some("ProductCreated"),
                    }),
                ),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let mut args = vec![
        "catalog-user-stats".to_owned(),
        "--group-id".into(),
        format!("{}user-stats", env.prefix),
    ];
    let db = env.db();
    args.extend([
        "--db-name".into(),
        db.name.clone(),
        "--db-schema".into(),
        db.schema.clone(),
    ]);
    args.extend([
        "--kafka-brokers".into(),
        env.kafka().brokers,
        "--kafka-topic-prefix".into(),
        env.prefix.clone(),
        "--metrics-addr".into(),
        String::new(),
    ]);
    let config = user_stats::Config::parse_from(args);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(user_stats::run(config, async {
        let _ = stopped.await;
    }));
    let client = env.pg().await;
    let counts = eventually("every product is counted", || async {
        let rows = client
            .query("SELECT user_id, products FROM user_product_counts", &[])
            .await
            .ok()?;
        let counts: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (counts == expected).then_some(counts)
    })
    .await;
    assert_eq!(counts, expected, "30 created, 6 deleted");
    let rejected = eventually("the unreadable event is kept", || async {
        let rows = client
            .query("SELECT reason FROM user_stats_rejected", &[])
            .await
            .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].get::<_, String>(0).contains("malformed"));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    env.cleanup().await;
}
