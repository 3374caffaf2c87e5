//! Test harness: an isolated environment (schema + topic prefix) and the services started in-process
//! with the same `run` functions their binaries call.

use std::time::Duration;

use clap::Parser;
use platform::config::{DbConfig, KafkaConfig};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Where the test broker listens.
pub fn brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// One test's private corner of the shared servers.
pub struct TestEnv {
    /// PostgreSQL schema of this test.
    pub schema: String,
    /// Topic prefix of this test.
    pub prefix: String,
    /// The Kafka-protocol broker of this test (the shared test broker unless a test starts its own).
    pub brokers: String,
    /// The PostgreSQL port on 127.0.0.1 (the shared server unless a test starts its own).
    pub db_port: u16,
}

/// Arguments common to every service of a test environment.
fn common_args(env: &TestEnv) -> Vec<String> {
    [
        "--db-name",
        "catalog_test",
        "--db-port",
        &env.db_port.to_string(),
        "--db-schema",
        &env.schema,
        "--db-pool-size",
        "8",
        "--kafka-brokers",
        &env.brokers,
        "--kafka-topic-prefix",
        &env.prefix,
        "--kafka-topic-partitions",
        "3",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

impl TestEnv {
    /// A fresh schema (migrated) and topic prefix (topics created) on the shared test broker.
    pub async fn new() -> Self {
        Self::on(brokers()).await
    }

    /// A fresh schema (migrated) and topic prefix (topics created) on the broker at `brokers`.
    pub async fn on(brokers: String) -> Self {
        Self::on_database(brokers, 5432).await
    }

    /// A fresh schema (migrated) on the PostgreSQL server at 127.0.0.1:`db_port`, and topic prefix
    /// (topics created) on the broker at `brokers`.
    pub async fn on_database(brokers: String, db_port: u16) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let id = Uuid::new_v4().simple().to_string();
        let env = Self {
            schema: format!("t_{}", &id[..16]),
            prefix: format!("t{}.", &id[..16]),
            brokers,
            db_port,
        };
        let db = env.db();
        platform::db::ensure_database(&db)
            .await
            .expect("PostgreSQL must run on 127.0.0.1:5432 (trust auth)");
        platform::db::migrate(&db).await.expect("migrations apply");
        platform::kafka::ensure_topics(&env.kafka())
            .await
            .expect("the test broker must run (just test starts it)");
        env
    }

    fn settings(&self) -> (DbConfig, KafkaConfig) {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            db: DbConfig,
            #[command(flatten)]
            kafka: KafkaConfig,
        }
        let cli = Cli::parse_from(std::iter::once("x".to_owned()).chain(common_args(self)));
        (cli.db, cli.kafka)
    }

    /// Database settings of this environment.
    pub fn db(&self) -> DbConfig {
        self.settings().0
    }

    /// Kafka settings of this environment.
    pub fn kafka(&self) -> KafkaConfig {
        self.settings().1
    }

    /// API settings: port chosen by the OS, fast outbox relay.
    pub fn api_config(&self) -> api::Config {
        let mut args = vec!["catalog-api".to_owned()];
        args.extend(common_args(self));
        args.extend(
            ["--outbox-interval-ms", "200", "--outbox-grace-ms", "500"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        args.extend(["--cache-key-prefix".to_owned(), self.prefix.clone()]);
        // The test client acts as an operator by default (see `TEST_ADMIN_KEY`); auth tests send users'
        // own keys instead.
        args.extend([
            "--auth-admin-key-digests".to_owned(),
            api::auth::digest_hex(TEST_ADMIN_KEY),
        ]);
        api::Config::parse_from(args)
    }

    /// Projector settings.
    pub fn projector_config(&self) -> projector::Config {
        let mut args = vec!["catalog-projector".to_owned()];
        args.extend(common_args(self));
        args.extend(["--group-id".to_owned(), format!("{}projector", self.prefix)]);
        args.extend(["--cache-key-prefix".to_owned(), self.prefix.clone()]);
        // Tests run many projectors at once: no metrics listener unless a test asks for one.
        args.extend(["--metrics-addr".to_owned(), String::new()]);
        projector::Config::parse_from(args)
    }

    /// Image worker settings: S3 on the test server, keys under this test's prefix, the local image
    /// server (127.0.0.1) allowed, short timeouts and retry delays.
    pub fn worker_config(&self) -> image_worker::Config {
        let mut args = vec!["catalog-image-worker".to_owned()];
        args.extend(
            common_args(self)
                .into_iter()
                .collect::<Vec<_>>()
                .chunks(2)
                .filter(|kv| kv[0].starts_with("--kafka") || kv[0].starts_with("--db"))
                .flatten()
                .cloned(),
        );
        args.extend(
            [
                "--group-id",
                &format!("{}image-worker", self.prefix),
                "--retry-delays-ms",
                "200,400",
                "--fetch-timeout-ms",
                "2000",
                "--fetch-allow-networks",
                "127.0.0.1/32",
                "--image-store",
                "s3",
                "--s3-endpoint",
                &s3_endpoint(),
                "--s3-bucket",
                "images",
                "--s3-access-key-id",
                "catalog",
                "--s3-secret-access-key",
                "catalog-secret",
                "--image-key-prefix",
                &self.prefix,
                "--metrics-addr",
                "",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        image_worker::Config::parse_from(args)
    }

    /// Starts an image worker; `kill` simulates a crash.
    pub fn spawn_worker_with(&self, config: image_worker::Config) -> TestService {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            image_worker::run(config, async {
                let _ = stopped.await;
            })
            .await
            .expect("image worker runs");
        });
        TestService {
            stop: Some(stop),
            task,
        }
    }

    /// A connection to this environment's schema.
    pub async fn pg(&self) -> deadpool_postgres::Object {
        let pool = platform::db::pool(&self.db()).unwrap();
        pool.get().await.unwrap()
    }

    /// Starts the API with `config` on a free port.
    pub async fn spawn_api_with(&self, config: api::Config) -> TestApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            api::run(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("api runs");
        });
        let api = TestApi {
            base: format!("http://{addr}"),
            http: admin_client(),
            stop: Some(stop),
            task,
        };
        eventually("API answers /healthz", || async {
            api.http
                .get(api.url("/healthz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        })
        .await;
        api
    }

    /// Starts the API with this environment's settings.
    pub async fn spawn_api(&self) -> TestApi {
        self.spawn_api_with(self.api_config()).await
    }

    /// Starts a projector; abort the handle to simulate a crash.
    pub fn spawn_projector_with(&self, config: projector::Config) -> TestService {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            projector::run(config, async {
                let _ = stopped.await;
            })
            .await
            .expect("projector runs");
        });
        TestService {
            stop: Some(stop),
            task,
        }
    }

    /// Starts a projector with this environment's settings.
    pub fn spawn_projector(&self) -> TestService {
        self.spawn_projector_with(self.projector_config())
    }

    /// Every message of the products topic, read from the beginning by a throw-away group, until
    /// `done` holds for what was read (or the deadline passes).
    pub async fn read_products_topic(
        &self,
        done: impl Fn(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let consumer = platform::kafka::consumer(
            &self.kafka(),
            &format!("{}reader-{}", self.prefix, Uuid::new_v4().simple()),
            "test-reader",
        )
        .unwrap();
        consumer
            .subscribe(&[&self.kafka().topics().products])
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut messages = Vec::new();
        while !done(&messages) {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => messages.push(m.detach()),
                Ok(Err(e)) => panic!("consume error: {e}"),
                Err(_) => break,
            }
        }
        close(consumer).await;
        messages
    }

    /// Every message of the stream `id` in the products topic, once at least `at_least` are there:
    /// read up to a sentinel sent behind them into their partition, so a later copy is seen too.
    pub async fn stream_in_log(&self, id: &str, at_least: usize) -> Vec<OwnedMessage> {
        let messages = self
            .read_products_topic(|m| keyed(m, id).len() >= at_least)
            .await;
        let partition = keyed(&messages, id)[0].partition();
        let sentinel = format!("sentinel-{}", Uuid::new_v4().simple());
        platform::kafka::producer(&self.kafka(), "test")
            .unwrap()
            .send(
                rdkafka::producer::FutureRecord::to(&self.kafka().topics().products)
                    .partition(partition)
                    .key(&sentinel)
                    .payload("sentinel")
                    .headers(fixture_headers()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let messages = self
            .read_products_topic(|m| !keyed(m, &sentinel).is_empty())
            .await;
        assert!(
            !keyed(&messages, &sentinel).is_empty(),
            "the sentinel is read"
        );
        keyed(&messages, id).into_iter().cloned().collect()
    }

    /// Appends `event` to its product's stream through the event store (the one authority on
    /// sequences, as every service does) and publishes the stream.
    pub async fn append_through_store(&self, event: events::Envelope<events::ProductEvent>) {
        use platform::event_store::{self, NewEvent};
        let pool = platform::db::pool(&self.db()).unwrap();
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let (version, mut state) =
            event_store::lock_head::<events::ProductState>(&tx, event.aggregate_id)
                .await
                .unwrap()
                .expect("the product's stream exists");
        assert_eq!(event.sequence, version + 1, "the event follows its stream");
        state.apply(&event).unwrap();
        event_store::append(
            &tx,
            event.aggregate_id,
            version,
            &[NewEvent::new(event.to_wire())],
            &state,
            "/catalog/tests",
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        drop(client);
        let producer = platform::kafka::EventProducer::new(&self.kafka(), "test").unwrap();
        event_store::publish_stream(&pool, &producer, &self.kafka().topics(), event.aggregate_id)
            .await
            .unwrap();
    }

    /// Appends `events` to the products topic (keyed by aggregate id), each acknowledged.
    pub async fn publish(&self, events: &[events::Envelope<events::ProductEvent>]) {
        let payloads: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.aggregate_id.to_string(), e.to_json()))
            .collect();
        self.publish_raw(&payloads).await;
    }

    /// Appends (key, payload) messages to the products topic as they are, each acknowledged. A payload
    /// that is an event envelope gets its CloudEvents headers; anything else is marked as a deliberate
    /// fixture (see `fixture_headers`).
    pub async fn publish_raw(&self, payloads: &[(String, Vec<u8>)]) {
        self.publish_raw_with(payloads, test_headers).await;
    }

    /// Appends `events` to the products topic marked as deliberate fixtures (the contract check skips
    /// them): for events another producer could write that break the published schema.
    pub async fn publish_fixtures(&self, events: &[events::Envelope<events::ProductEvent>]) {
        let payloads: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.aggregate_id.to_string(), e.to_json()))
            .collect();
        self.publish_raw_with(&payloads, |_| fixture_headers())
            .await;
    }

    async fn publish_raw_with(
        &self,
        payloads: &[(String, Vec<u8>)],
        headers: fn(&[u8]) -> rdkafka::message::OwnedHeaders,
    ) {
        let producer = platform::kafka::producer(&self.kafka(), "test").unwrap();
        let topic = self.kafka().topics().products;
        // A few hundred sends in flight at once can take longer than the 10 s message timeout on the
        // test broker while the rest of the suite runs (seen in CI): a hundred at a time.
        for chunk in payloads.chunks(100) {
            let sends = chunk.iter().map(|(key, payload)| {
                producer.send(
                    rdkafka::producer::FutureRecord::to(&topic)
                        .key(key)
                        .payload(payload)
                        .headers(headers(payload)),
                    Duration::from_secs(10),
                )
            });
            for result in futures::future::join_all(sends).await {
                result.expect("broker acknowledged");
            }
        }
    }

    /// Drops the test's schema (topics are left: the broker is per test run and in memory).
    pub async fn cleanup(self) {
        let client = self.pg().await;
        let _ = client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await;
    }
}

/// Everything the services log during a test, at every level (see [`capture_logs`]).
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Captures all logs of this test process (nextest runs each test in its own process); call it before
/// `TestEnv::new`, which otherwise installs its own subscriber.
pub fn capture_logs() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("trace,h2=info,hyper=info,rustls=info,reqwest=info,tokio_postgres=info")
        .with_writer(move || writer.clone())
        .try_init();
    captured
}

/// The admin key every test API accepts (its digest is configured by `api_config`).
pub const TEST_ADMIN_KEY: &str = "cat_test_admin_key_for_the_integration_tests_only";

/// An HTTP client that sends the test admin key unless a request sets its own `Authorization`.
pub fn admin_client() -> reqwest::Client {
    admin_client_builder().build().unwrap()
}

/// [`admin_client`]'s builder, for a test that needs another setting (a timeout, say).
pub fn admin_client_builder() -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TEST_ADMIN_KEY}").parse().unwrap(),
    );
    reqwest::Client::builder().default_headers(headers)
}

/// The headers a test gives a message it appends itself: the CloudEvents headers of an event envelope,
/// or, for anything else (garbage, sentinels), the marker the contract conformance check
/// (`scripts/conformance.py`) skips.
pub fn test_headers(payload: &[u8]) -> rdkafka::message::OwnedHeaders {
    match serde_json::from_slice::<events::WireEnvelope>(payload) {
        Ok(wire) => platform::kafka::headers(&wire, "/catalog/tests"),
        Err(_) => fixture_headers(),
    }
}

/// Marks a message as a deliberate test fixture that no contract applies to.
pub fn fixture_headers() -> rdkafka::message::OwnedHeaders {
    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "catalog-test-fixture",
        value: Some("deliberate"),
    })
}

/// Where the test S3 server listens.
pub fn s3_endpoint() -> String {
    std::env::var("TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:8333".into())
}

/// Closes a consumer without letting a slow leave-group block the test runtime.
pub async fn close<C: rdkafka::consumer::ConsumerContext + 'static>(consumer: StreamConsumer<C>) {
    platform::kafka::close(consumer, Duration::from_secs(5)).await;
}

/// A running API.
pub struct TestApi {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client for it.
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestApi {
    /// Full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// Registers a user and returns its id.
    pub async fn create_user(&self) -> String {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let response = self
            .post(
                "/users",
                &serde_json::json!({"name": "Ada", "email": email}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }

    /// Abrupt stop, as on SIGKILL: nothing more runs.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A running background service (projector or image worker).
pub struct TestService {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestService {
    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }

    /// Abrupt stop: the task is dropped wherever it is, as a killed process would be.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Polls `probe` until it returns `Some`, or panics after 30 s naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, Duration::from_secs(30), probe).await
}

/// [`eventually`] with a limit of `limit`.
pub async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, probe: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of header `name` of a message, as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Messages whose key is `id`.
pub fn keyed<'a>(messages: &'a [OwnedMessage], id: &str) -> Vec<&'a OwnedMessage> {
    messages
        .iter()
        .filter(|m| m.key() == Some(id.as_bytes()))
        .collect()
}

/// A valid product body for `user_id`.
pub fn product_body(user_id: &str) -> Value {
    serde_json::json!({
        "user_id": user_id,
        "product_name": "Walnut desk",
        "product_description": "Solid walnut, 140 x 70 cm.",
        "product_images": ["https://images.example.com/desk-front.jpg", "https://images.example.com/desk-side.jpg"],
        "product_price": "349.90",
    })
}

/// Every message of `topic` up to its current end.
pub async fn read_all(
    kafka: &platform::config::KafkaConfig,
    topic: &str,
) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer = platform::kafka::consumer(
        kafka,
        &format!("chaos-reader-{}", uuid::Uuid::new_v4().simple()),
        "chaos-reader",
    )
    .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut ends = std::collections::HashMap::new();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in &partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .unwrap();
        if high > 0 {
            ends.insert(*p, high);
            assignment
                .add_partition_offset(topic, *p, rdkafka::Offset::Beginning)
                .unwrap();
        }
    }
    let mut messages = Vec::new();
    if ends.is_empty() {
        return messages;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .expect("the whole log is read within a minute")
            .unwrap()
            .detach();
        if ends
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            ends.remove(&m.partition());
        }
        messages.push(m);
    }
    messages
}
