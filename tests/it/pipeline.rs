//! The image pipeline end to end: API → ImagesRequested → worker (real HTTP, real S3) → ImagesProcessed
//! → projection → GET.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rdkafka::Message;
use serde_json::{Value, json};

use crate::helpers::{TestApi, TestEnv, eventually, keyed};

/// A local image server with failure modes, on 127.0.0.1 (allowed by the test worker's allow-list).
pub(crate) struct ImageServer {
    base: String,
    port: u16,
    pub(crate) fixed: Arc<AtomicBool>,
}

#[derive(Clone, Default)]
struct ServerState {
    attempts: Arc<std::sync::Mutex<HashMap<String, u32>>>,
    pub(crate) fixed: Arc<AtomicBool>,
    port: Arc<AtomicU32>,
    slow_ms: u64,
}

/// A JPEG photo-like gradient of `w`×`h`, varied by `seed` so different names are different bytes.
fn jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let [s0, s1, s2, _] = seed.to_le_bytes();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 255 / w) as u8).wrapping_add(s0),
            ((y * 255 / h) as u8).wrapping_add(s1),
            ((((x + y) * 7) % 256) as u8).wrapping_add(s2),
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

/// FNV-1a of `name`: distinct names give distinct images.
fn seed(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A tiny PNG whose header declares 10000×5000 (50 megapixels): a decompression bomb's calling card.
fn png_bomb() -> Vec<u8> {
    let img = image::RgbImage::new(4, 4);
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type); CRC covers type + 13 data bytes.
    out[16..20].copy_from_slice(&10_000u32.to_be_bytes());
    out[20..24].copy_from_slice(&5_000u32.to_be_bytes());
    let crc = crc32(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

fn jpeg_response(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "image/jpeg")], bytes).into_response()
}

/// Photos are generated once per name (encoding one is the slowest thing the test server does, and jobs
/// that are retried or re-run fetch the same name again).
async fn photo(Path(name): Path<String>) -> Response {
    static PHOTOS: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Vec<u8>>>> =
        std::sync::OnceLock::new();
    let photos = PHOTOS.get_or_init(Default::default);
    if let Some(bytes) = photos.lock().unwrap().get(&name).cloned() {
        return jpeg_response(bytes);
    }
    let bytes = tokio::task::spawn_blocking({
        let name = name.clone();
        move || jpeg(1600, 1200, seed(&name))
    })
    .await
    .unwrap();
    photos.lock().unwrap().insert(name, bytes.clone());
    jpeg_response(bytes)
}

async fn flaky(State(s): State<ServerState>, Path(name): Path<String>) -> Response {
    let n = {
        let mut attempts = s.attempts.lock().unwrap();
        let n = attempts.entry(name.clone()).or_default();
        *n += 1;
        *n
    };
    if n <= 2 {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    } else {
        jpeg_response(jpeg(900, 600, 77))
    }
}

async fn fixable(State(s): State<ServerState>) -> Response {
    if s.fixed.load(Ordering::SeqCst) {
        jpeg_response(jpeg(640, 480, 99))
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn slow(State(s): State<ServerState>, Path(name): Path<String>) -> Response {
    tokio::time::sleep(Duration::from_millis(s.slow_ms)).await;
    jpeg_response(jpeg(800, 600, seed(&name)))
}

async fn redirect_internal(State(s): State<ServerState>) -> Response {
    let port = s.port.load(Ordering::SeqCst);
    (
        StatusCode::FOUND,
        [(
            header::LOCATION,
            format!("http://127.0.0.2:{port}/photo/a.jpg"),
        )],
    )
        .into_response()
}

impl ImageServer {
    pub(crate) async fn start(slow_ms: u64) -> Self {
        let state = ServerState {
            slow_ms,
            ..ServerState::default()
        };
        let app = Router::new()
            .route("/photo/{name}", get(photo))
            .route(
                "/small/{name}",
                get(|Path(name): Path<String>| async move {
                    jpeg_response(jpeg(320, 240, seed(&name)))
                }),
            )
            .route("/flaky/{name}", get(flaky))
            .route("/slow/{name}", get(slow))
            .route("/fixable", get(fixable))
            .route("/missing.jpg", get(|| async { StatusCode::NOT_FOUND }))
            .route(
                "/truncated.jpg",
                get(|| async {
                    let whole = jpeg(800, 600, 7);
                    jpeg_response(whole[..whole.len() / 2].to_vec())
                }),
            )
            .route("/redirect-internal", get(redirect_internal))
            .route(
                "/bomb.png",
                get(|| async { ([(header::CONTENT_TYPE, "image/png")], png_bomb()) }),
            )
            .route(
                "/page.jpg",
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "image/jpeg")],
                        "<html>not an image</html>",
                    )
                }),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        state.port.store(u32::from(port), Ordering::SeqCst);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            fixed: state.fixed.clone(),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

pub(crate) async fn create_product(api: &TestApi, user_id: &str, images: &[String]) -> String {
    let body = json!({
        "user_id": user_id,
        "product_name": "Lamp",
        "product_price": "19.99",
        "product_images": images,
    });
    let r = api.post("/products", &body).await;
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Polls GET until no image is pending, and returns the product.
pub(crate) async fn settled(api: &TestApi, id: &str, version: u64) -> Value {
    eventually("every image has an outcome", || async {
        let p: Value = api
            .get(&format!("/products/{id}"))
            .await
            .json()
            .await
            .ok()?;
        let done = p["version"].as_u64()? >= version
            && p["images"]
                .as_array()?
                .iter()
                .all(|i| i["status"] != "pending");
        done.then_some(p)
    })
    .await
}

/// The offset group `group` committed on `partition` of the products topic, read by a short-lived
/// consumer closed off the runtime.
async fn committed_offset(env: &TestEnv, group: &str, partition: i32) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let kafka = env.kafka();
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &group)
            .create()
            .ok()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&kafka.topics().products, partition);
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(5))
            .ok()?;
        let offset = committed.elements().first()?.offset().to_raw();
        // Dropping may block (rust-rdkafka#509); this thread is expendable.
        std::thread::spawn(move || drop(consumer));
        offset
    })
    .await
    .ok()
    .flatten()
}

fn store(env: &TestEnv) -> image_worker::storage::ImageStore {
    image_worker::storage::ImageStore::new(&env.worker_config().store).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_become_ready_variants_in_s3_stored_once() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let worker = env.spawn_worker_with(env.worker_config());
    let user = api.create_user().await;

    let urls: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| server.url(&format!("/photo/{n}.jpg")))
        .collect();
    let id = create_product(&api, &user, &urls).await;
    let product = settled(&api, &id, 3).await;
    assert_eq!(product["version"], 3);
    for image in product["images"].as_array().unwrap() {
        assert_eq!(image["status"], "ready", "{image}");
        // A BlurHash of the thumbnail to paint first: 4×3 components for these landscape photos.
        let placeholder = image["placeholder"].as_str().unwrap();
        assert!(
            placeholder.starts_with('L') && placeholder.len() == 28,
            "{placeholder}"
        );
    }
    let variants = product["compressed_product_images"].as_array().unwrap();
    assert_eq!(variants.len(), 12, "4 variants of 3 images");
    let source_len = jpeg(1600, 1200, 0).len() as u64;
    let store = store(&env);
    for v in variants {
        let key = v["key"].as_str().unwrap();
        let bytes = store.get(key).await.unwrap();
        assert_eq!(bytes.len() as u64, v["bytes"].as_u64().unwrap());
        assert!(
            (bytes.len() as u64) < source_len,
            "{key} is smaller than its source"
        );
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!(u64::from(decoded.width()), v["width"].as_u64().unwrap());
        assert_eq!(u64::from(decoded.height()), v["height"].as_u64().unwrap());
        let expected = if v["variant"] == "thumb" {
            (256, 192)
        } else {
            (1024, 768)
        };
        assert_eq!((decoded.width(), decoded.height()), expected, "{key}");
        assert!(v["url"].as_str().unwrap().ends_with(key));
        // Served with its type, cached for good (the key names the content).
        let attributes = store.attributes(key).await.unwrap();
        let content_type = if v["format"] == "webp" {
            "image/webp"
        } else {
            "image/jpeg"
        };
        assert!(
            attributes.contains(&("ContentType".into(), content_type.into())),
            "{key}: {attributes:?}"
        );
        assert!(
            attributes.contains(&(
                "CacheControl".into(),
                "public, max-age=31536000, immutable".into()
            )),
            "{key}: {attributes:?}"
        );
    }
    assert_eq!(store.list("images/").await.unwrap().len(), 12);

    // The same source in another product is stored once.
    let again = create_product(&api, &user, &urls[..1]).await;
    let other = settled(&api, &again, 3).await;
    assert_eq!(other["images"][0]["status"], "ready");
    assert_eq!(
        other["images"][0]["placeholder"], product["images"][0]["placeholder"],
        "found stored, the placeholder comes from the stored thumbnail: the same"
    );
    assert_eq!(
        store.list("images/").await.unwrap().len(),
        12,
        "no new objects"
    );

    // Re-running the first product's job (its ImagesRequested delivered again) changes nothing.
    let messages = env.read_products_topic(|m| keyed(m, &id).len() >= 3).await;
    let request = keyed(&messages, &id)
        .into_iter()
        .find(|m| crate::helpers::header(m, "ce_type").as_deref() == Some("ImagesRequested"))
        .unwrap()
        .clone();
    let producer = platform::kafka::producer(&env.kafka(), "test").unwrap();
    let delivered = producer
        .send(
            rdkafka::producer::FutureRecord::to(&env.kafka().topics().products)
                .key(&id)
                .payload(request.payload().unwrap())
                .headers(request.headers().unwrap().clone()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // Wait until the worker has consumed the re-delivered request (its group committed past it).
    let group = env.worker_config().group_id;
    eventually("the worker consumed the re-delivered request", || async {
        let committed = committed_offset(&env, &group, delivered.partition).await?;
        (committed > delivered.offset).then_some(())
    })
    .await;
    let messages = env
        .read_products_topic(|m| !processed(m, &id).is_empty())
        .await;
    assert_eq!(processed(&messages, &id).len(), 1);
    let answers: i64 = env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM event_store
              WHERE aggregate_id = $1::text::uuid AND envelope::jsonb->>'event_type' = 'ImagesProcessed'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        answers, 1,
        "the job ran twice and its request was answered once"
    );
    assert_eq!(
        store.list("images/").await.unwrap().len(),
        12,
        "and wrote nothing new"
    );
    let after: Value = api
        .get(&format!("/products/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after, product, "the projection did not change");

    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

fn processed(messages: &[rdkafka::message::OwnedMessage], id: &str) -> Vec<Value> {
    keyed(messages, id)
        .into_iter()
        .map(|m| serde_json::from_slice::<Value>(m.payload().unwrap()).unwrap())
        .filter(|v| v["event_type"] == "ImagesProcessed")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_retried_and_parked_with_their_reason() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(3_000).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let worker = env.spawn_worker_with(env.worker_config());
    let user = api.create_user().await;

    let urls = vec![
        server.url("/missing.jpg"),
        server.url("/flaky/x.jpg"),
        server.url("/slow/x.jpg"),
        server.url("/redirect-internal"),
        server.url("/bomb.png"),
        server.url("/page.jpg"),
    ];
    let id = create_product(&api, &user, &urls).await;
    let product = settled(&api, &id, 3).await;
    let images = product["images"].as_array().unwrap();
    let outcome: Vec<(&str, Option<&str>)> = images
        .iter()
        .map(|i| (i["status"].as_str().unwrap(), i["error_class"].as_str()))
        .collect();
    assert_eq!(
        outcome,
        [
            ("failed", Some("http_4xx")),
            ("ready", None),
            ("failed", Some("timeout")),
            ("failed", Some("forbidden_address")),
            ("failed", Some("too_many_pixels")),
            ("failed", Some("not_an_image")),
        ]
    );
    for failed in images.iter().filter(|i| i["status"] == "failed") {
        assert!(!failed["reason"].as_str().unwrap().is_empty());
    }
    assert!(images[0]["reason"].as_str().unwrap().contains("404"));
    // The public reason does not name the internal address it refused.
    let refused = images[3]["reason"].as_str().unwrap();
    assert!(!refused.contains("127.0.0"), "{refused}");
    assert!(
        images[2]["reason"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts")
    );
    assert_eq!(
        product["compressed_product_images"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    let letters = image_worker::dlq::read_all(&env.kafka(), 2, Duration::from_secs(3))
        .await
        .unwrap();
    let mine: Vec<_> = letters
        .iter()
        .filter(|l| l.letter.product_id.to_string() == id)
        .collect();
    let mut classes: Vec<&str> = mine
        .iter()
        .map(|l| l.letter.failure.class.as_str())
        .collect();
    classes.sort_unstable();
    assert_eq!(
        classes,
        [
            "forbidden_address",
            "http_4xx",
            "not_an_image",
            "timeout",
            "too_many_pixels"
        ]
    );
    for letter in &mine {
        let h: HashMap<&str, &str> = letter
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(h["x-original-topic"], env.kafka().topics().products);
        assert!(h["x-original-offset"].parse::<i64>().is_ok());
        assert!(h["x-original-partition"].parse::<i32>().is_ok());
        assert_eq!(h["x-error-class"], letter.letter.failure.class);
        assert!(!h["x-error-message"].is_empty());
        assert!(h.contains_key("x-first-failure-at"));
        let attempts: u32 = h["x-attempt"].parse().unwrap();
        if letter.letter.failure.class == "timeout" {
            assert_eq!(attempts, 3, "the whole ladder was climbed");
        } else {
            assert_eq!(attempts, 1, "permanent failures are parked at once");
        }
    }
    // The index `catalogctl dlq list|redrive` reads holds exactly what the topic holds for it, and
    // answers a filter by error class without reading the topic.
    let pool = platform::db::pool(&env.db()).unwrap();
    let filter = image_worker::dlq::Filter {
        product: Some(id.parse().unwrap()),
        error_class: None,
    };
    let indexed = image_worker::dlq::list(&pool, &filter).await.unwrap();
    let positions = |records: &[&image_worker::dlq::DeadLetterRecord]| {
        let mut p: Vec<(i32, i64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
        p.sort_unstable();
        p
    };
    assert_eq!(
        positions(&indexed.iter().collect::<Vec<_>>()),
        positions(&mine)
    );
    for record in &indexed {
        let topic = mine
            .iter()
            .find(|m| (m.partition, m.offset) == (record.partition, record.offset))
            .unwrap();
        assert_eq!(record.letter, topic.letter);
        let mut a = record.headers.clone();
        let mut b = topic.headers.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
    let timeouts = image_worker::dlq::list(
        &pool,
        &image_worker::dlq::Filter {
            product: Some(id.parse().unwrap()),
            error_class: Some("timeout".into()),
        },
    )
    .await
    .unwrap();
    assert_eq!(timeouts.len(), 1);
    // Letters parked before the index existed are added from the topic by `dlq reindex`.
    env.pg()
        .await
        .execute("DELETE FROM pipeline_dead_letters", &[])
        .await
        .unwrap();
    assert!(
        image_worker::dlq::list(&pool, &filter)
            .await
            .unwrap()
            .is_empty()
    );
    image_worker::dlq::reindex(&env.kafka(), 2, Duration::from_secs(3), &pool)
        .await
        .unwrap();
    let reindexed = image_worker::dlq::list(&pool, &filter).await.unwrap();
    assert_eq!(
        positions(&reindexed.iter().collect::<Vec<_>>()),
        positions(&mine)
    );

    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_after_the_image_server_is_fixed_makes_the_image_ready() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let worker = env.spawn_worker_with(env.worker_config());
    let user = api.create_user().await;
    let id = create_product(
        &api,
        &user,
        &[server.url("/photo/ok.jpg"), server.url("/fixable")],
    )
    .await;
    let product = settled(&api, &id, 3).await;
    assert_eq!(product["images"][1]["status"], "failed");

    server.fixed.store(true, Ordering::SeqCst);
    let filter = image_worker::dlq::Filter {
        product: Some(id.parse().unwrap()),
        error_class: None,
    };
    let letters: Vec<_> = image_worker::dlq::read_all(&env.kafka(), 2, Duration::from_secs(3))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| filter.matches(r))
        .collect();
    assert_eq!(letters.len(), 1);
    let pool = platform::db::pool(&env.db()).unwrap();
    let report = image_worker::dlq::redrive(&env.kafka(), &pool, &letters)
        .await
        .unwrap();
    assert_eq!((report.products, report.images), (1, 1));

    let fixed = settled(&api, &id, 5).await;
    assert_eq!(fixed["version"], 5);
    assert_eq!(fixed["images"][0]["status"], "ready");
    assert_eq!(fixed["images"][1]["status"], "ready");
    assert_eq!(
        fixed["compressed_product_images"].as_array().unwrap().len(),
        8
    );

    // Re-driving again finds nothing failed and appends nothing.
    let again = image_worker::dlq::redrive(&env.kafka(), &pool, &letters)
        .await
        .unwrap();
    assert_eq!((again.products, again.skipped), (0, 1));

    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
    let _ = server.port;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_every_job_processed_once() {
    const PRODUCTS: usize = 6;
    let env = TestEnv::new().await;
    let server = ImageServer::start(400).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = api.create_user().await;
    let mut ids = Vec::new();
    for n in 0..PRODUCTS {
        let urls = vec![
            server.url(&format!("/slow/{n}-a.jpg")),
            server.url(&format!("/slow/{n}-b.jpg")),
        ];
        ids.push(create_product(&api, &user, &urls).await);
    }
    let client = env.pg().await;
    let first = env.spawn_worker_with(env.worker_config());
    eventually("some product is processed", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM products WHERE version = 3", &[])
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    first.kill().await;
    let ready_at_kill: i64 = client
        .query_one("SELECT count(*) FROM products WHERE version = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        ready_at_kill < PRODUCTS as i64,
        "killed mid-stream ({ready_at_kill} of {PRODUCTS} done)"
    );

    let second = env.spawn_worker_with(env.worker_config());
    for id in &ids {
        let p = settled(&api, id, 3).await;
        assert_eq!(p["version"], 3);
        assert!(
            p["images"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["status"] == "ready"),
            "{p}"
        );
        assert_eq!(p["compressed_product_images"].as_array().unwrap().len(), 8);
    }
    let messages = env
        .read_products_topic(|m| ids.iter().all(|id| !processed(m, id).is_empty()))
        .await;
    for id in &ids {
        let ids: std::collections::HashSet<String> = processed(&messages, id)
            .iter()
            .map(|v| v["event_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "one ImagesProcessed (possibly delivered twice) for {id}"
        );
    }
    assert_eq!(
        store(&env).list("images/").await.unwrap().len(),
        PRODUCTS * 2 * 4
    );

    second.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

/// `http://ADDR` of a server that accepts connections, holds them open and never answers.
async fn never_answering_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_image_store_sends_jobs_to_the_retry_ladder_at_once() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    // An "S3" that accepts connections and never answers.
    let hung_url = never_answering_server().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let mut config = env.worker_config();
    config.store.endpoint = hung_url;
    config.store.store_timeout_ms = 300;
    config.store.store_breaker_cool_down_ms = 60_000;
    let worker = env.spawn_worker_with(config);
    let user = api.create_user().await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(create_product(&api, &user, &[server.url(&format!("/photo/s3-{n}.jpg"))]).await);
    }
    let mut reasons = Vec::new();
    for id in &ids {
        let product = settled(&api, id, 3).await;
        let image = &product["images"][0];
        assert_eq!(image["status"], "failed", "{product}");
        assert_eq!(image["error_class"], "storage");
        reasons.push(image["reason"].as_str().unwrap().to_owned());
    }
    // After a few timeouts the store is skipped: jobs stop waiting for it.
    assert!(
        reasons.iter().any(|r| r.contains("circuit is open")),
        "{reasons:?}"
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

/// `http://ADDR` of a proxy to the S3 server at `target` that forwards every request but reads: a
/// GET is held open and never answered (a store whose metadata answers while its reads hang); and a
/// count of the HEADs it answered 200 (objects found).
async fn store_with_hung_reads(target: String) -> (String, Arc<AtomicU32>) {
    let found = Arc::new(AtomicU32::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let client = reqwest::Client::new();
    let counter = found.clone();
    let forward = move |request: axum::extract::Request| {
        let (client, target, found) = (client.clone(), target.clone(), counter.clone());
        async move {
            if request.method() == axum::http::Method::GET {
                std::future::pending::<()>().await;
            }
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            // Headers as signed (Host included: the signature covers it); lengths are set anew.
            let mut call = client
                .request(parts.method.clone(), format!("{target}{path}"))
                .body(body);
            for (name, value) in &parts.headers {
                if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
                    call = call.header(name, value);
                }
            }
            let answer = call.send().await.unwrap();
            let head = parts.method == axum::http::Method::HEAD;
            if head && answer.status().is_success() {
                found.fetch_add(1, Ordering::Relaxed);
            }
            let mut response = Response::builder().status(answer.status().as_u16());
            for (name, value) in answer.headers() {
                // A HEAD answer's length is the object's; any other is the body's own.
                if (head || name != header::CONTENT_LENGTH) && name != header::TRANSFER_ENCODING {
                    response = response.header(name, value);
                }
            }
            let bytes = answer.bytes().await.unwrap();
            response.body(axum::body::Body::from(bytes)).unwrap()
        }
    };
    let app = Router::new().fallback(forward);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, found)
}

/// When every variant of an image is already stored, the worker reads the stored thumbnail back for
/// the placeholder: a store that answers that it has the objects but never sends their bytes must
/// cost a timeout and send the job to the retry ladder, like any other store call — not hang it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_reads_hang_after_its_metadata_answers_costs_a_timeout() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = api.create_user().await;
    let url = server.url("/photo/hung-read.jpg");
    // A first product stores the image's variants through a healthy store.
    let worker = env.spawn_worker_with(env.worker_config());
    let first = create_product(&api, &user, std::slice::from_ref(&url)).await;
    assert_eq!(
        settled(&api, &first, 3).await["images"][0]["status"],
        "ready"
    );
    worker.stop().await;

    // The same source in a second product, through a store whose reads hang.
    let mut config = env.worker_config();
    let (endpoint, found) = store_with_hung_reads(crate::helpers::s3_endpoint()).await;
    config.store.endpoint = endpoint;
    config.store.store_timeout_ms = 300;
    let worker = env.spawn_worker_with(config);
    let second = create_product(&api, &user, &[url]).await;
    let product = settled(&api, &second, 3).await;
    let image = &product["images"][0];
    assert_eq!(image["status"], "failed", "{product}");
    assert_eq!(image["error_class"], "storage", "{product}");
    assert!(
        found.load(Ordering::Relaxed) >= 4,
        "the store answered that every variant is there (it is the read that hangs)"
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_image_origin_is_skipped_after_a_few_timeouts_and_other_origins_are_not_delayed() {
    let env = TestEnv::new().await;
    let healthy = ImageServer::start(0).await;
    // An image server that accepts connections and never answers.
    let hung_base = never_answering_server().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let mut config = env.worker_config();
    config.origin_breaker_failures = 2;
    config.origin_breaker_cool_down_ms = 60_000;
    let worker = env.spawn_worker_with(config);
    let user = api.create_user().await;
    let mut hung_products = Vec::new();
    for n in 0..4 {
        hung_products
            .push(create_product(&api, &user, &[format!("{hung_base}/photo/{n}.jpg")]).await);
    }
    let fine = create_product(&api, &user, &[healthy.url("/photo/origin-fine.jpg")]).await;
    let product = settled(&api, &fine, 3).await;
    assert_eq!(product["images"][0]["status"], "ready", "{product}");
    let mut classes = Vec::new();
    for id in &hung_products {
        let product = settled(&api, id, 3).await;
        let image = &product["images"][0];
        assert_eq!(image["status"], "failed", "{product}");
        classes.push(image["error_class"].as_str().unwrap().to_owned());
    }
    // After two timeouts the origin is skipped: later attempts do not wait for it.
    assert!(
        classes.iter().any(|c| c == "origin_unavailable"),
        "{classes:?}"
    );
    assert!(
        classes
            .iter()
            .all(|c| c == "origin_unavailable" || c == "timeout"),
        "{classes:?}"
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_caught_by_an_s3_pause_are_retried_and_none_fails_for_good() {
    let s3 = crate::procs::PrivateS3::start().await;
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let mut config = env.worker_config();
    config.store.endpoint = s3.endpoint();
    config.store.store_timeout_ms = 500;
    config.store.store_breaker_cool_down_ms = 500;
    // The ladder outlasts the pause and the breaker's cool-down by far: retries 1, 2, 4 and 8 s after
    // a failure (a retry that meets the circuit still open, or another job's probe in flight, only
    // climbs one rung).
    config.retry_delays_ms = vec![1_000, 2_000, 4_000, 8_000];
    let worker = env.spawn_worker_with(config);
    let user = api.create_user().await;
    let first = create_product(&api, &user, &[server.url("/photo/before-pause.jpg")]).await;
    assert_eq!(
        settled(&api, &first, 3).await["images"][0]["status"],
        "ready"
    );

    // Uploads in flight when S3 stops answering, and jobs arriving while it is stopped.
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(
            create_product(&api, &user, &[server.url(&format!("/photo/pause-{n}.jpg"))]).await,
        );
    }
    s3.pause();
    for n in 4..6 {
        ids.push(
            create_product(&api, &user, &[server.url(&format!("/photo/pause-{n}.jpg"))]).await,
        );
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    s3.resume();
    for id in &ids {
        let product = settled(&api, id, 3).await;
        assert_eq!(product["images"][0]["status"], "ready", "{product}");
    }
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jpeg_cut_in_half_fails_as_corrupt_and_nothing_is_stored_for_it() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let config = env.worker_config();
    let store = image_worker::storage::ImageStore::new(&config.store).unwrap();
    let worker = env.spawn_worker_with(config);
    let user = api.create_user().await;
    let id = create_product(&api, &user, &[server.url("/truncated.jpg")]).await;
    let product = settled(&api, &id, 3).await;
    let image = &product["images"][0];
    assert_eq!(image["status"], "failed", "{product}");
    assert_eq!(image["error_class"], "corrupt");
    assert!(image["reason"].as_str().unwrap().contains("truncated"));
    assert!(
        store.list("").await.unwrap().is_empty(),
        "no variant stored"
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_worker_cannot_read_are_kept_with_their_reason_not_dropped() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let worker_config = env.worker_config();
    let topics =
        image_worker::PipelineTopics::new(&env.kafka(), worker_config.retry_delays_ms.len());
    let worker = env.spawn_worker_with(worker_config);
    let producer = platform::kafka::producer(&env.kafka(), "test").unwrap();
    let marked = |ce_type: &str| {
        crate::helpers::fixture_headers().insert(rdkafka::message::Header {
            key: "ce_type",
            value: Some(ce_type),
        })
    };
    let garbage = [
        // Claims to be a job and is not readable: kept.
        (
            topics.products.clone(),
            b"{\"event_type\":\"ImagesRequested\"".to_vec(),
            marked("ImagesRequested"),
        ),
        // Another consumer's business (an event type of the future): not the worker's, not kept.
        (
            topics.products.clone(),
            b"{}".to_vec(),
            marked("ProductRenamed"),
        ),
        // A garbled retry message: kept.
        (
            topics.retries[0].clone(),
            b"not a job".to_vec(),
            crate::helpers::fixture_headers(),
        ),
    ];
    for (topic, payload, headers) in &garbage {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(topic)
                    .key("garbage")
                    .payload(payload)
                    .headers(headers.clone()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // The worker goes on with real jobs after them (a product without images still gets its answer).
    let user = api.create_user().await;
    let id = create_product(&api, &user, &[]).await;
    assert_eq!(settled(&api, &id, 3).await["version"], 3);
    let kept = eventually("unreadable messages are kept", || async {
        let rows = env
            .pg()
            .await
            .query(
                "SELECT topic, reason FROM pipeline_rejected ORDER BY topic",
                &[],
            )
            .await
            .ok()?;
        (rows.len() >= 2).then(|| {
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        })
    })
    .await;
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter()
            .any(|(t, r)| *t == topics.products && r.contains("malformed")),
        "{kept:?}"
    );
    assert!(
        kept.iter()
            .any(|(t, r)| *t == topics.retries[0] && r.contains("not an image job")),
        "{kept:?}"
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

/// `just dev`'s set-up: variants in the local file store, served read-only by the API, so the URLs in
/// `compressed_product_images` open in a browser, with their type and an immutable cache lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_local_store_variant_urls_are_served_by_the_api() {
    let env = TestEnv::new().await;
    let images = ImageServer::start(0).await;
    let dir = std::env::temp_dir().join(format!("catalog-local-images-{}", uuid::Uuid::new_v4()));
    let mut api_config = env.api_config();
    api_config.local_images_dir = dir.display().to_string();
    let api = env.spawn_api_with(api_config).await;
    let projector = env.spawn_projector();
    let mut worker_config = env.worker_config();
    worker_config.store.kind = "local".into();
    worker_config.store.local_dir = dir.display().to_string();
    worker_config.store.public_base_url.clone_from(&api.base);
    // A directory of its own: no per-test key prefix (the route serves `images/…` keys, as `just dev`
    // writes them).
    worker_config.store.key_prefix = String::new();
    let worker = env.spawn_worker_with(worker_config);

    let user = api.create_user().await;
    let id = create_product(&api, &user, &[images.url("/photo/local.jpg")]).await;
    let product = settled(&api, &id, 3).await;
    let variants = product["compressed_product_images"].as_array().unwrap();
    assert_eq!(variants.len(), 4);
    let plain = reqwest::Client::new();
    for v in variants {
        let url = v["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/images/", api.base)), "{url}");
        let r = plain.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let expected = if v["format"] == "webp" {
            "image/webp"
        } else {
            "image/jpeg"
        };
        assert_eq!(r.headers()["content-type"], expected);
        assert_eq!(
            r.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        let bytes = r.bytes().await.unwrap();
        assert_eq!(bytes.len() as u64, v["bytes"].as_u64().unwrap());
        image::load_from_memory(&bytes).unwrap();
    }
    // Only variant paths are served: nothing else of the directory, nothing outside it.
    let hash = variants[0]["key"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(2)
        .unwrap();
    for path in [
        format!("/images/{}/{hash}/..%2F..%2Fsecret", &hash[..2]),
        format!("/images/{}/{hash}/.hidden", &hash[..2]),
        format!("/images/00/{hash}/x.webp"),
        "/images/../../etc/passwd".to_owned(),
    ] {
        let r = plain.get(api.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }

    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    let _ = std::fs::remove_dir_all(dir);
    env.cleanup().await;
}
