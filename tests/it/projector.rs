//! The projector: exactly-once application over at-least-once delivery.

use chrono::Utc;
use events::{
    AnyEnvelope, Decimal, Envelope, ImageRef, ImagesRequested, ProductCreated, ProductEvent,
};
use uuid::Uuid;

use crate::helpers::{TestEnv, eventually};

fn product_stream(id: Uuid) -> [Envelope<ProductEvent>; 2] {
    let now = Utc::now();
    [
        Envelope::new(
            id,
            1,
            now,
            None,
            ProductEvent::Created(ProductCreated {
                user_id: Uuid::nil(),
                product_name: format!("product {id}"),
                product_description: String::new(),
                product_price: Decimal::new(1999, 2),
                currency: "EUR".into(),
                product_images: vec!["https://x.example/a.jpg".into()],
            }),
        ),
        Envelope::new(
            id,
            2,
            now,
            None,
            ProductEvent::ImagesRequested(ImagesRequested {
                images: vec![ImageRef {
                    position: 0,
                    url: "https://x.example/a.jpg".into(),
                }],
            }),
        ),
    ]
}

fn encode(envelopes: &[Envelope<ProductEvent>]) -> Vec<(String, Vec<u8>)> {
    envelopes
        .iter()
        .map(|e| (e.aggregate_id.to_string(), e.to_json()))
        .collect()
}

async fn count(client: &deadpool_postgres::Object, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The projected version of product `id`, if it has a row.
async fn version(client: &deadpool_postgres::Object, id: Uuid) -> Option<i64> {
    client
        .query_opt("SELECT version FROM products WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn a_projector_killed_mid_stream_resumes_without_losing_or_doubling_events() {
    const PRODUCTS: usize = 400;
    let env = TestEnv::new().await;
    let topic = env.kafka().topics().products;

    let ids: Vec<Uuid> = (0..PRODUCTS).map(|_| Uuid::now_v7()).collect();
    let streams: Vec<Envelope<ProductEvent>> =
        ids.iter().flat_map(|id| product_stream(*id)).collect();
    let mut payloads = encode(&streams);
    // At-least-once upstream: every 10th event is delivered twice.
    let duplicates: Vec<_> = payloads.iter().step_by(10).cloned().collect();
    payloads.extend(duplicates.iter().cloned());
    env.publish_raw(&payloads).await;

    let mut config = env.projector_config();
    config.batch_size = 10;
    // Three lanes: concurrent transactions over disjoint partitions, killed mid-way too.
    config.parallelism = 3;
    let client = env.pg().await;
    let first = env.spawn_projector_with(config.clone());
    let at_kill = eventually("the projector has written some rows", || async {
        let n = count(&client, "SELECT count(*) FROM products").await;
        (n > 0).then_some(n)
    })
    .await;
    first.kill().await;
    assert!(
        at_kill < PRODUCTS as i64,
        "the projector should be killed mid-stream (had {at_kill} of {PRODUCTS})"
    );

    let second = env.spawn_projector_with(config);
    eventually("every product is projected at version 2", || async {
        let done = count(&client, "SELECT count(*) FROM products WHERE version = 2").await;
        (done == PRODUCTS as i64).then_some(())
    })
    .await;
    // Wait for the position to reach the end of the topic, then check nothing was doubled.
    let total = payloads.len() as i64;
    eventually("stored offsets reach the end of the topic", || async {
        let next: i64 = client
            .query_one(
                "SELECT COALESCE(sum(next_offset), 0)::bigint FROM projection_offsets WHERE topic = $1",
                &[&topic],
            )
            .await
            .unwrap()
            .get(0);
        (next == total).then_some(())
    })
    .await;
    second.stop().await;

    assert_eq!(
        count(&client, "SELECT count(*) FROM products").await,
        PRODUCTS as i64
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM products WHERE version <> 2").await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM products WHERE jsonb_array_length(images) <> 1"
        )
        .await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_rejected").await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_parked_events").await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_early_event_waits_for_its_predecessor_and_garbage_is_kept_not_dropped() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    let [created, requested] = product_stream(id);
    let key = id.to_string();

    // ImagesRequested first (as if ProductCreated had been lost and re-sent later), then garbage.
    env.publish(std::slice::from_ref(&requested)).await;
    env.publish_raw(&[(key.clone(), b"{not json".to_vec())])
        .await;
    let projector = env.spawn_projector();
    let client = env.pg().await;
    eventually("ImagesRequested is parked", || async {
        (count(&client, "SELECT count(*) FROM projection_parked_events").await == 1).then_some(())
    })
    .await;
    assert_eq!(count(&client, "SELECT count(*) FROM products").await, 0);

    env.publish(std::slice::from_ref(&created)).await;
    eventually(
        "the product reaches version 2 once its first event arrives",
        || async { (version(&client, id).await == Some(2)).then_some(()) },
    )
    .await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_parked_events").await,
        0
    );

    let rejected = client
        .query_one("SELECT reason, payload FROM projection_rejected", &[])
        .await
        .unwrap();
    let reason: String = rejected.get(0);
    assert!(reason.contains("malformed"), "{reason}");
    assert_eq!(rejected.get::<_, Vec<u8>>(1), b"{not json");

    // The stored product decodes back to what a fold of its events gives.
    let row = client
        .query_one(
            &format!(
                "SELECT {} FROM products WHERE id = $1",
                platform::read_model::PRODUCT_COLUMNS
            ),
            &[&id],
        )
        .await
        .unwrap();
    let expected = events::ProductState::fold([&created, &requested])
        .unwrap()
        .unwrap();
    assert_eq!(platform::read_model::product_from_row(&row), expected);
    let _ = AnyEnvelope::Product(created);

    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn event_topics_with_finite_retention_are_refused_at_start_up() {
    let prefix = format!("t{}.", &Uuid::new_v4().simple().to_string()[..16]);
    let mut kafka = TestEnv::new().await.kafka();
    kafka.topic_prefix = prefix;
    let topics = kafka.topics();
    platform::kafka::create_topics(
        &kafka,
        &[(&topics.users, 86_400_000), (&topics.products, 86_400_000)],
    )
    .await
    .unwrap();
    let error = platform::kafka::ensure_topics(&kafka)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("retention.ms=86400000"), "{error}");
}

#[tokio::test]
async fn an_event_the_database_refuses_is_kept_aside_and_the_projection_goes_on() {
    let env = TestEnv::new().await;
    let [good_a, good_a2] = product_stream(Uuid::now_v7());
    // Valid as an event, but beyond what `numeric(12,2)` stores: PostgreSQL refuses the row. Another
    // producer could write this straight to the topic; the API never would.
    let poison_id = Uuid::now_v7();
    let [mut poison, poison2] = product_stream(poison_id);
    if let ProductEvent::Created(created) = &mut poison.event {
        created.product_price = Decimal::new(10_i64.pow(13), 0);
    }
    let [good_b, good_b2] = product_stream(Uuid::now_v7());
    // Published before the projector starts, so the poison usually shares a batch with good events,
    // which the database then refuses as a whole. The poison breaks the published schema too, so it
    // is marked as a fixture.
    env.publish_fixtures(&[poison, poison2]).await;
    env.publish(&[good_a, good_b, good_a2, good_b2]).await;
    let projector = env.spawn_projector();
    let client = env.pg().await;
    eventually(
        "both good products reach version 2 and the poison is kept aside",
        || async {
            let good = count(&client, "SELECT count(*) FROM products WHERE version = 2").await;
            let rejected = count(&client, "SELECT count(*) FROM projection_rejected").await;
            (good == 2 && rejected == 1).then_some(())
        },
    )
    .await;
    let rejected = client
        .query_one("SELECT reason, payload FROM projection_rejected", &[])
        .await
        .unwrap();
    let reason: String = rejected.get(0);
    assert!(reason.contains("refused by the database"), "{reason}");
    let payload: Vec<u8> = rejected.get(1);
    assert!(
        String::from_utf8_lossy(&payload).contains(&poison_id.to_string()),
        "the refused message is kept byte for byte"
    );
    // The poison product's later event waits for a creation that will never apply: kept, not lost.
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_parked_events").await,
        1
    );

    // And the projection goes on with what comes next.
    let later = Uuid::now_v7();
    env.publish(&product_stream(later)).await;
    eventually("a later product is projected", || async {
        (version(&client, later).await == Some(2)).then_some(())
    })
    .await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_rejected").await,
        1
    );
    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn lag_shows_what_the_projector_has_left_per_partition_and_reaches_zero() {
    let env = TestEnv::new().await;
    let streams: Vec<Envelope<ProductEvent>> = (0..5)
        .flat_map(|_| product_stream(Uuid::now_v7()))
        .collect();
    env.publish(&streams).await;
    let group = env.projector_config().group_id;
    let topic = env.kafka().topics().products;
    let groups = vec![(group.clone(), vec![topic.clone()])];
    let lag_of = || async {
        let rows = platform::lag::lag(&env.kafka(), &env.db(), &group, &groups)
            .await
            .unwrap();
        assert!(
            rows.iter()
                .all(|r| r.topic == topic && r.source == "postgres")
        );
        rows.iter().map(platform::lag::Row::lag).sum::<i64>()
    };
    assert_eq!(lag_of().await, 10, "nothing projected yet");
    let projector = env.spawn_projector();
    eventually("the projector's lag reaches zero", || async {
        (lag_of().await == 0).then_some(())
    })
    .await;
    projector.stop().await;
    env.cleanup().await;
}

/// `catalogctl lag` names the member holding each partition (the broker's group description), and
/// follows the partitions to another member when their holder leaves. (Not a split between two
/// members: the projector reads two topics, and when a second member joins a settled group the
/// cooperative-sticky assignor may move one whole topic to it, leaving this one unsplit.)
#[tokio::test]
async fn lag_names_the_member_holding_each_partition() {
    let env = TestEnv::new().await;
    let group = env.projector_config().group_id;
    let topic = env.kafka().topics().products;
    let groups = vec![(group.clone(), vec![topic.clone()])];
    // The one member holding every partition, once there is one.
    let sole_owner = || async {
        let owners: Vec<Option<String>> =
            platform::lag::lag(&env.kafka(), &env.db(), &group, &groups)
                .await
                .unwrap()
                .into_iter()
                .map(|row| row.owner)
                .collect();
        let first = owners.first()?.clone()?;
        (owners.len() > 1 && owners.iter().all(|o| o.as_ref() == Some(&first))).then_some(first)
    };
    let first = env.spawn_projector();
    let before = eventually("one member holds every partition", sole_owner).await;
    let second = env.spawn_projector();
    first.stop().await;
    eventually("the partitions move to the other member", || async {
        sole_owner().await.filter(|owner| *owner != before)
    })
    .await;
    second.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn every_committed_batch_is_announced_to_waiting_readers() {
    let env = TestEnv::new().await;
    // A fallback far longer than the test: only an announcement can move the counter in time.
    let mut commits =
        platform::db::projection_commits(&env.db(), std::time::Duration::from_secs(600));
    // The first move says LISTEN is in place.
    tokio::time::timeout(std::time::Duration::from_secs(10), commits.changed())
        .await
        .expect("the listener connects")
        .unwrap();
    commits.borrow_and_update();
    let projector = env.spawn_projector();
    env.publish(&product_stream(Uuid::now_v7())).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), commits.changed())
        .await
        .expect("the projector's commit is announced")
        .unwrap();
    // Announcements are per schema: another schema's channel is not this one.
    let mut other = env.db();
    other.schema.push_str("_other");
    assert_ne!(
        platform::db::projection_channel(&env.db()),
        platform::db::projection_channel(&other)
    );
    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_parked_event_the_stream_has_already_passed_is_removed_not_kept_forever() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    let [created, requested] = product_stream(id);
    env.publish(&[created.clone(), requested]).await;
    let projector = env.spawn_projector();
    let client = env.pg().await;
    eventually("the product reaches version 2", || async {
        (version(&client, id).await == Some(2)).then_some(())
    })
    .await;
    // A copy of event 1 left parked (as after an earlier race): it can never apply again.
    client
        .execute(
            "INSERT INTO projection_parked_events (aggregate_id, sequence, envelope) VALUES ($1, 1, $2)",
            &[
                &id,
                &tokio_postgres::types::Json(serde_json::to_value(created.to_wire()).unwrap()),
            ],
        )
        .await
        .unwrap();
    // The next event of the stream loads it and drops the stale parked copy.
    let deleted = Envelope::new(
        id,
        3,
        Utc::now(),
        None,
        ProductEvent::Deleted(events::ProductDeleted::default()),
    );
    env.publish(&[deleted]).await;
    eventually("the stale parked event is removed", || async {
        (count(&client, "SELECT count(*) FROM projection_parked_events").await == 0).then_some(())
    })
    .await;
    projector.stop().await;
    env.cleanup().await;
}

/// Every consumer here (projector, worker, feeds) resumes from the offset it committed, and with the
/// services' producer batching that offset is usually inside a record batch. The broker must answer
/// such a fetch from the batch that contains it (stock Tansu 0.6 skipped to the next batch: the rest
/// of the batch was lost to the group; `scripts/tansu/tansu-storage.patch`).
#[tokio::test]
async fn a_consumer_resuming_inside_a_producer_batch_reads_the_rest_of_it() {
    use rdkafka::Message;
    use rdkafka::consumer::{CommitMode, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::time::Duration;

    let env = TestEnv::new().await;
    let mut kafka = env.kafka();
    kafka.topic_partitions = 1;
    let topic = format!("{}batched", env.prefix);
    platform::kafka::create_topics(&kafka, &[(&topic, -1)])
        .await
        .unwrap();

    // Twenty records sent at once by an idempotent producer that waits up to a second to fill a
    // batch: they travel as one record batch.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1000")
        .set("batch.num.messages", "10000")
        .create()
        .unwrap();
    let sends = (0..20).map(|i| {
        let payload = format!("record {i}");
        let producer = &producer;
        let topic = &topic;
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(0)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap()
        }
    });
    let offsets: Vec<i64> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|delivery| delivery.offset)
        .collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());

    let group = format!("{}resume-{}", env.prefix, Uuid::new_v4().simple());
    let read = |count: usize| {
        let kafka = kafka.clone();
        let group = group.clone();
        let topic = topic.clone();
        async move {
            let consumer = platform::kafka::consumer(&kafka, &group, "resume-test").unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            let mut payloads = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while payloads.len() < count {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(m)) => payloads.push((
                        m.offset(),
                        String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    )),
                    Ok(Err(e)) => panic!("consume error: {e}"),
                    Err(_) => break,
                }
            }
            (consumer, payloads)
        }
    };

    // The first member reads five records and commits "next is offset 5", inside the batch.
    let (first, head) = read(5).await;
    assert_eq!(head.len(), 5, "the batch is readable at all: {head:?}");
    let mut committed = rdkafka::TopicPartitionList::new();
    committed
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(5))
        .unwrap();
    first.commit(&committed, CommitMode::Sync).unwrap();
    crate::helpers::close(first).await;

    // The next member of the group resumes there and gets the other fifteen, in order.
    let (second, rest) = read(15).await;
    crate::helpers::close(second).await;
    let expected: Vec<(i64, String)> = (5..20).map(|i| (i, format!("record {i}"))).collect();
    assert_eq!(rest, expected);
}
