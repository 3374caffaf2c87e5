//! The projector against the log it reads (issue: "projection at the speed of the log").
//!
//! 1. `generate`: appends EVENTS events to fresh topics (`<prefix>catalog.products` / `.users`): per
//!    product `ProductCreated`, `ImagesRequested` and a `ProductUpdated`, and a user per 50 products.
//! 2. `measure`: reads them all with a bare librdkafka consumer (the services' consumer settings, no
//!    processing), then projects them from offset 0 into a fresh schema with the projector, and prints
//!    `bare_events_per_s projector_events_per_s ratio`.
//!
//! 3. `reader`: reads products one statement at a time until a file exists, then prints the longest
//!    single read (the replay benchmark runs it across the switch).
//!
//! Usage: projection-ceiling generate BROKERS PREFIX EVENTS
//!        projection-ceiling measure BROKERS PREFIX SCHEMA [REDIS_URL or ""]
//!        projection-ceiling reader SCHEMA STOP_FILE

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use events::{
    Decimal, Envelope, ImageRef, ImagesRequested, ProductCreated, ProductEvent, ProductUpdated,
    UserEvent, UserRegistered,
};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use uuid::Uuid;

#[derive(Parser)]
struct Kafka {
    #[command(flatten)]
    kafka: platform::config::KafkaConfig,
}

fn kafka(brokers: &str, prefix: &str) -> platform::config::KafkaConfig {
    Kafka::parse_from([
        "x",
        "--kafka-brokers",
        brokers,
        "--kafka-topic-prefix",
        prefix,
    ])
    .kafka
}

fn product_events(id: Uuid, user: Uuid, n: u64) -> [Envelope<ProductEvent>; 3] {
    let now = Utc::now();
    let images: Vec<String> = (0..2)
        .map(|i| format!("https://images.example.com/{id}/{i}.jpg"))
        .collect();
    [
        Envelope::new(
            id,
            1,
            now,
            None,
            ProductEvent::Created(ProductCreated {
                user_id: user,
                product_name: format!("Espresso machine model {n}"),
                product_description: "Dual boiler, PID temperature control, 58 mm portafilter."
                    .into(),
                product_price: Decimal::new(129_900 + (n as i64 % 1000), 2),
                currency: "EUR".into(),
                product_images: images.clone(),
            }),
        ),
        Envelope::new(
            id,
            2,
            now,
            None,
            ProductEvent::ImagesRequested(ImagesRequested {
                images: images
                    .iter()
                    .enumerate()
                    .map(|(position, url)| ImageRef {
                        position: position as u32,
                        url: url.clone(),
                    })
                    .collect(),
            }),
        ),
        Envelope::new(
            id,
            3,
            now,
            None,
            ProductEvent::Updated(ProductUpdated {
                product_price: Some(Decimal::new(119_900, 2)),
                ..ProductUpdated::default()
            }),
        ),
    ]
}

async fn generate(brokers: &str, prefix: &str, events: u64) -> anyhow::Result<()> {
    let kafka = kafka(brokers, prefix);
    platform::kafka::ensure_topics(&kafka).await?;
    let topics = kafka.topics();
    let producer = platform::kafka::producer(&kafka, "projection-ceiling")?;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut user = Uuid::now_v7();
    let mut pending = Vec::new();
    let mut n = 0u64;
    while sent < events {
        if n % 50 == 0 {
            user = Uuid::now_v7();
            let registered = Envelope::new(
                user,
                1,
                Utc::now(),
                None,
                UserEvent::Registered(UserRegistered {
                    name: format!("Seller {n}"),
                    email: format!("seller{n}@example.com"),
                }),
            );
            pending.push((topics.users.clone(), user, registered.to_json()));
            sent += 1;
        }
        for event in product_events(Uuid::now_v7(), user, n) {
            if sent >= events {
                break;
            }
            pending.push((topics.products.clone(), event.aggregate_id, event.to_json()));
            sent += 1;
        }
        n += 1;
        if pending.len() >= 5_000 || sent >= events {
            let sends = pending.iter().map(|(topic, key, payload)| {
                let key = key.to_string();
                let producer = producer.clone();
                async move {
                    producer
                        .send(
                            FutureRecord::to(topic).key(&key).payload(payload),
                            Duration::from_secs(30),
                        )
                        .await
                        .map_err(|(e, _)| e)
                }
            });
            for result in futures::future::join_all(sends).await {
                result?;
            }
            pending.clear();
        }
    }
    eprintln!(
        "generated {events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The end offset of every partition of the event topics, summed: how many messages there are.
fn log_size(kafka: &platform::config::KafkaConfig) -> anyhow::Result<i64> {
    let consumer = platform::kafka::consumer(kafka, "projection-ceiling-size", "size")?;
    let mut total = 0;
    for topic in kafka.topics().all() {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                total += consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))?
                    .1;
            }
        }
    }
    Ok(total)
}

async fn bare(kafka: &platform::config::KafkaConfig, total: i64) -> anyhow::Result<f64> {
    let group = format!("bare-{}", Uuid::new_v4().simple());
    let consumer = platform::kafka::consumer(kafka, &group, "bare")?;
    // Timed from the subscription, like the projector from its start: both join a group and read
    // from offset 0.
    let started = Instant::now();
    consumer.subscribe(&kafka.topics().all())?;
    let mut seen = 0i64;
    let mut bytes = 0usize;
    while seen < total {
        let message = consumer.recv().await?;
        bytes += message.payload().map_or(0, <[u8]>::len);
        seen += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("bare consumer: {seen} messages ({bytes} bytes) in {secs:.2} s");
    Ok(seen as f64 / secs.max(1e-6))
}

async fn project(
    kafka: &platform::config::KafkaConfig,
    schema: &str,
    redis_url: &str,
    total: i64,
) -> anyhow::Result<f64> {
    let mut args = vec![
        "catalog-projector".to_owned(),
        "--kafka-brokers".to_owned(),
        kafka.brokers.clone(),
        "--kafka-topic-prefix".to_owned(),
        kafka.topic_prefix.clone(),
        "--redis-url".to_owned(),
        redis_url.to_owned(),
        "--group-id".to_owned(),
        format!("projector-{}", Uuid::new_v4().simple()),
        "--cache-key-prefix".to_owned(),
        format!("bench-{}:", Uuid::new_v4().simple()),
    ];
    if let Ok(db_args) = std::env::var("BENCH_DB_ARGS") {
        args.extend(db_args.split_whitespace().map(str::to_owned));
    }
    let mut config = projector::Config::parse_from(args);
    config.db.schema = schema.to_owned();
    config.run_migrations = true;
    platform::db::ensure_database(&config.db).await?;
    platform::db::drop_schema(&config.db).await?;
    platform::db::migrate(&config.db).await?;
    let pool = platform::db::pool(&config.db)?;
    if let Ok(sql) = std::env::var("BENCH_SCHEMA_SQL") {
        // For experiments: e.g. dropping an index to see what it costs the projection.
        pool.get().await?.batch_execute(&sql).await?;
    }
    let group = config.group_id.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let projector = tokio::spawn(projector::run(config.clone(), async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    loop {
        let done: i64 = pool
            .get()
            .await?
            .query_one(
                "SELECT COALESCE(sum(next_offset), 0)::bigint FROM projection_offsets WHERE consumer = $1",
                &[&group],
            )
            .await?
            .get(0);
        if done > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Measured from start-up (the projector subscribes, joins the group and reads from offset 0),
    // like the bare consumer is measured from its first message: the start-up cost is counted here.
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "projector: {total} events in {secs:.2} s (first batch committed after {:.2} s)",
        first.map_or(0.0, |f| (f - started).as_secs_f64())
    );
    let _ = stop.send(());
    let _ = projector.await;
    platform::db::drop_schema(&config.db).await?;
    Ok(total as f64 / secs.max(1e-6))
}

/// Reads products of `schema` one by one (each its own statement, as the API does) until `stop_file`
/// exists; prints the longest single read in milliseconds.
async fn reader(schema: &str, stop_file: &str) -> anyhow::Result<()> {
    let mut args = vec!["reader".to_owned()];
    if let Ok(db_args) = std::env::var("BENCH_DB_ARGS") {
        args.extend(db_args.split_whitespace().map(str::to_owned));
    }
    #[derive(Parser)]
    struct Db {
        #[command(flatten)]
        db: platform::config::DbConfig,
    }
    let mut db = Db::parse_from(args).db;
    db.schema = schema.to_owned();
    let pool = platform::db::pool(&db)?;
    let client = pool.get().await?;
    let ids: Vec<Uuid> = client
        .query("SELECT id FROM products LIMIT 100", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let statement = client
        .prepare_cached(&format!(
            "SELECT {} FROM products WHERE id = $1",
            platform::read_model::PRODUCT_COLUMNS
        ))
        .await?;
    let mut longest = Duration::ZERO;
    let mut reads = 0u64;
    while !std::path::Path::new(stop_file).exists() {
        for id in &ids {
            let started = Instant::now();
            client.query_opt(&statement, &[id]).await?;
            longest = longest.max(started.elapsed());
            reads += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("reader: {reads} reads");
    println!("{:.1}", longest.as_secs_f64() * 1000.0);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, brokers, prefix, events] if cmd == "generate" => {
            generate(brokers, prefix, events.parse()?).await
        }
        [cmd, brokers, prefix, schema, rest @ ..] if cmd == "measure" => {
            let redis_url = rest.first().map_or("", String::as_str);
            let kafka = kafka(brokers, prefix);
            let total = log_size(&kafka)?;
            let bare = bare(&kafka, total).await?;
            let projector = project(&kafka, schema, redis_url, total).await?;
            println!("{bare:.0} {projector:.0} {:.2}", projector / bare);
            Ok(())
        }
        [cmd, schema, stop_file] if cmd == "reader" => reader(schema, stop_file).await,
        _ => anyhow::bail!(
            "usage: projection-ceiling generate BROKERS PREFIX EVENTS | measure BROKERS PREFIX SCHEMA [REDIS_URL]"
        ),
    }
}
