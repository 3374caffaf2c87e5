//! The Redis-cached read path: hits and misses, invalidation, the stale-fill race, Redis away,
//! conditional GET and read-your-writes by version.

use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{TestApi, TestEnv, eventually, product_body};

fn cache_config(env: &TestEnv) -> platform::cache::CacheConfig {
    env.api_config().cache
}

async fn connected_cache(env: &TestEnv) -> platform::cache::ProductCache {
    let cache = platform::cache::ProductCache::connect(&cache_config(env))
        .unwrap()
        .unwrap();
    assert!(
        cache.wait_connected(Duration::from_secs(15)).await,
        "Redis must run on 127.0.0.1:6379"
    );
    cache
}

async fn get(api: &TestApi, path: &str) -> (u16, String, Value) {
    let r = api.get(path).await;
    let status = r.status().as_u16();
    let source = r
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, source, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_hit_the_cache_and_every_change_invalidates_it() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let cache = connected_cache(&env).await;
    let user = api.create_user().await;
    let created: Value = api
        .post("/products", &product_body(&user))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/products/{id}");

    let (status, source, first) = get(&api, &path).await;
    assert_eq!((status, source.as_str()), (200, "miss"));
    assert_eq!(first, created);
    let (_, source, second) = get(&api, &path).await;
    assert_eq!(source, "hit");
    assert_eq!(second, first, "a hit answers the same bytes");

    // A change (here an ImagesProcessed, produced as the worker would) invalidates the entry once its
    // row is committed, so the next read is fresh.
    let uuid: Uuid = id.parse().unwrap();
    append_failed_result(&env, &created).await;
    let fresh: Value = eventually("the cache entry is invalidated", || async {
        match cache.get(uuid).await.unwrap() {
            None => Some(()),
            Some(_) => None,
        }
    })
    .then(|()| async { get(&api, &path).await.2 })
    .await;
    assert_eq!(fresh["version"], 3);
    assert_eq!(fresh["images"][0]["status"], "failed");
    let (_, source, _) = get(&api, &path).await;
    assert_eq!(source, "hit");

    // Conditional GET.
    let r = api
        .http
        .get(api.url(&path))
        .header("If-None-Match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], "\"3\"");
    let r = api
        .http
        .get(api.url(&path))
        .header("If-None-Match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Read-your-writes by version: reached → 200; a version nobody wrote → 422 at once (waiting
    // could not bring it); written but not projected → 503 naming the problem.
    let (status, _, body) = get(&api, &format!("{path}?min_version=3")).await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(3)));
    let started = std::time::Instant::now();
    let (status, _, body) = get(&api, &format!("{path}?min_version=9")).await;
    assert_eq!(
        (status, body["errors"][0]["field"].as_str()),
        (422, Some("min_version"))
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let (status, _, body) = get(&api, &format!("{path}?min_version=x")).await;
    assert_eq!(
        (status, body["errors"][0]["field"].as_str()),
        (422, Some("min_version"))
    );
    projector.stop().await;
    let r = api
        .http
        .patch(api.url(&path))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"product_name":"Renamed"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _, body) = get(&api, &format!("{path}?min_version=4")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("projection_behind"))
    );

    api.stop().await;
    env.cleanup().await;
}

/// Appends the `ImagesProcessed` (every image failed) that answers `created`'s `ImagesRequested`, as the
/// image worker would.
async fn append_failed_result(env: &TestEnv, created: &Value) {
    let uuid: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let processed = events::Envelope::new(
        uuid,
        3,
        chrono::Utc::now(),
        None,
        events::ProductEvent::ImagesProcessed(events::ImagesProcessed {
            request_sequence: 2,
            request_event_id: None,
            images: created["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| events::ImageOutcome {
                    position: i["position"].as_u64().unwrap() as u32,
                    url: i["url"].as_str().unwrap().to_owned(),
                    status: events::ImageOutcomeStatus::Failed,
                    variants: vec![],
                    error_class: Some("http_4xx".into()),
                    reason: Some("404".into()),
                    placeholder: None,
                })
                .collect(),
        }),
    );
    env.append_through_store(processed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_tier_is_stale_for_at_most_its_lifetime() {
    const TTL_MS: u64 = 300;
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.cache_local_ttl_ms = TTL_MS;
    let api = env.spawn_api_with(config).await;
    let projector = env.spawn_projector();
    let user = api.create_user().await;
    let created: Value = api
        .post("/products", &product_body(&user))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/products/{id}");
    assert_eq!(get(&api, &path).await.1, "miss");
    assert_eq!(get(&api, &path).await.1, "local");

    append_failed_result(&env, &created).await;
    let client = env.pg().await;
    let uuid: Uuid = id.parse().unwrap();
    eventually("version 3 is projected", || async {
        let v: i64 = client
            .query_one("SELECT version FROM products WHERE id = $1", &[&uuid])
            .await
            .unwrap()
            .get(0);
        (v == 3).then_some(())
    })
    .await;
    let projected_at = std::time::Instant::now();
    // Asking for the new version bypasses the tier at once.
    let (status, _, body) = get(&api, &format!("{path}?min_version=3")).await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(3)));
    // Without it, the old version may be served until its entry's lifetime ends, never longer.
    eventually("plain reads see version 3", || async {
        (get(&api, &path).await.2["version"] == 3).then_some(())
    })
    .await;
    let stale_for = projected_at.elapsed();
    assert!(
        stale_for <= Duration::from_millis(TTL_MS + 1_000),
        "stale for {stale_for:?}, bound {TTL_MS} ms (+1 s scheduling slack)"
    );
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_cannot_put_an_old_version_back() {
    let env = TestEnv::new().await;
    let cache = connected_cache(&env).await;
    let id = Uuid::now_v7();

    // A reader reads version 2 from PostgreSQL, then stalls. Meanwhile version 3 is committed and the
    // projector invalidates. The reader's fill must be refused.
    assert!(
        cache.fill(id, 2, b"{\"version\":2}").await.unwrap(),
        "a first fill is stored"
    );
    cache.invalidate(id, 3).await.unwrap();
    assert!(
        cache.get(id).await.unwrap().is_none(),
        "invalidation drops the entry"
    );
    assert!(
        !cache.fill(id, 2, b"{\"version\":2}").await.unwrap(),
        "an older fill is refused"
    );
    assert!(cache.get(id).await.unwrap().is_none());
    assert!(
        cache.fill(id, 3, b"{\"version\":3}").await.unwrap(),
        "the current version fills"
    );
    assert!(
        !cache.fill(id, 2, b"{\"version\":2}").await.unwrap(),
        "never replaced by an older one"
    );
    let (version, json) = cache.get(id).await.unwrap().unwrap();
    assert_eq!((version, &json[..]), (3, &b"{\"version\":3}"[..]));

    // The projector's invalidation keeps an entry a reader already filled at the projected version
    // (it is as new as the rows) and drops an older one.
    cache.invalidate_projected(&[(id, 3)]).await.unwrap();
    assert_eq!(cache.get(id).await.unwrap().map(|(v, _)| v), Some(3));
    cache.invalidate_projected(&[(id, 4)]).await.unwrap();
    assert!(cache.get(id).await.unwrap().is_none());
    assert!(
        !cache.fill(id, 3, b"{\"version\":3}").await.unwrap(),
        "the floor moved to 4"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_or_silent_reads_still_answer_from_postgres() {
    let env = TestEnv::new().await;
    let projector = env.spawn_projector();
    // Nothing listens on port 1; the second "Redis" accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("redis://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    for url in ["redis://127.0.0.1:1".to_owned(), silent_url] {
        let mut config = env.api_config();
        config.cache.redis_url = url.clone();
        let api = env.spawn_api_with(config).await;
        let user = api.create_user().await;
        let created: Value = api
            .post("/products", &product_body(&user))
            .await
            .json()
            .await
            .unwrap();
        for _ in 0..3 {
            let (status, source, body) = get(
                &api,
                &format!("/products/{}", created["id"].as_str().unwrap()),
            )
            .await;
            assert_eq!(status, 200, "{url}");
            assert_eq!(source, "bypass", "{url}");
            assert_eq!(body, created);
        }
        api.stop().await;
    }
    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_database_read() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = api.create_user().await;
    let created: Value = api
        .post("/products", &product_body(&user))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/products/{}", created["id"].as_str().unwrap());
    let (status, ..) = get(&api, &path).await; // projected and cached once
    assert_eq!(status, 200);
    let cache = connected_cache(&env).await;
    cache
        .invalidate(created["id"].as_str().unwrap().parse().unwrap(), 2)
        .await
        .unwrap();

    let responses = futures::future::join_all((0..50).map(|_| get(&api, &path))).await;
    assert!(
        responses
            .iter()
            .all(|(status, _, body)| *status == 200 && *body == created)
    );
    let count = |what: &str| responses.iter().filter(|(_, s, _)| s == what).count();
    // The first miss reads PostgreSQL; misses during that read share it ("coalesced"); later requests
    // hit the entry it filled. A handful of leaders at most, never one read per request.
    assert!(count("miss") >= 1);
    assert!(
        count("miss") <= 5,
        "{} database reads for 50 concurrent misses",
        count("miss")
    );
    assert_eq!(count("miss") + count("coalesced") + count("hit"), 50);
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_one_timeout_per_cool_down_not_one_per_request() {
    let logs = crate::helpers::capture_logs();
    let env = TestEnv::new().await;
    let projector = env.spawn_projector();
    let redis = crate::procs::PrivateRedis::start();
    let port = redis.port;
    let mut config = env.api_config();
    config.cache.redis_url = format!("redis://127.0.0.1:{port}");
    let api = env.spawn_api_with(config).await;
    let user = api.create_user().await;
    let created: Value = api
        .post("/products", &product_body(&user))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/products/{}", created["id"].as_str().unwrap());
    eventually("the entry is cached", || async {
        (get(&api, &path).await.1 == "hit").then_some(())
    })
    .await;

    redis.pause();
    for _ in 0..40 {
        let (status, _, body) = get(&api, &path).await;
        assert_eq!(status, 200);
        assert_eq!(body, created);
    }
    redis.resume();
    let logged = logs.text();
    let timeouts = logged
        .matches("cache unavailable; reading PostgreSQL")
        .count();
    assert!(logged.contains("circuit opened"), "the breaker opened");
    // Without the breaker every one of the 40 reads waits for a timeout; with it, the threshold (3)
    // plus one probe per cool-down (1 s) while the reads run.
    assert!(timeouts <= 10, "{timeouts} reads waited for Redis");
    // Redis back: the breaker closes after a probe and reads hit the cache again.
    eventually("reads use Redis again", || async {
        (get(&api, &path).await.1 != "bypass").then_some(())
    })
    .await;
    drop(redis);
    api.stop().await;
    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_never_stalls_the_projector_and_its_invalidations_arrive_when_it_answers() {
    let logs = crate::helpers::capture_logs();
    let env = TestEnv::new().await;
    let redis = crate::procs::PrivateRedis::start();
    let port = redis.port;
    let redis_url = format!("redis://127.0.0.1:{port}");
    let mut projector_config = env.projector_config();
    projector_config.cache.redis_url = redis_url.clone();
    let projector = env.spawn_projector_with(projector_config);
    let mut config = env.api_config();
    config.cache.redis_url = redis_url;
    let api = env.spawn_api_with(config.clone()).await;
    let user = api.create_user().await;
    let created: Value = api
        .post("/products", &product_body(&user))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/products/{id}");
    eventually("the entry is cached", || async {
        (get(&api, &path).await.1 == "hit").then_some(())
    })
    .await;

    redis.pause();
    // While Redis hangs, the product changes and more products are written: all of it is projected
    // (the projector hands invalidations to a background task and never waits for Redis).
    let patched = api
        .http
        .patch(api.url(&path))
        .header("content-type", "application/merge-patch+json")
        .json(&serde_json::json!({"product_name": "renamed while Redis hung"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let mut more = Vec::new();
    for _ in 0..20 {
        let body: Value = api
            .post("/products", &product_body(&user))
            .await
            .json()
            .await
            .unwrap();
        more.push(Uuid::parse_str(body["id"].as_str().unwrap()).unwrap());
    }
    let client = env.pg().await;
    let id_uuid = Uuid::parse_str(&id).unwrap();
    eventually(
        "the edit and the new products are projected while Redis hangs",
        || async {
            let edited: i64 = client
                .query_one("SELECT version FROM products WHERE id = $1", &[&id_uuid])
                .await
                .unwrap()
                .get(0);
            let projected: i64 = client
                .query_one("SELECT count(*) FROM products WHERE id = ANY($1)", &[&more])
                .await
                .unwrap()
                .get(0);
            (edited == 3 && projected == 20).then_some(())
        },
    )
    .await;
    // The stale entry is still in the paused Redis; once it answers, the kept invalidation lands.
    redis.resume();
    eventually(
        "the projector reports its pending invalidations applied",
        || async {
            logs.text()
                .contains("cache reachable again; pending invalidations applied")
                .then_some(())
        },
    )
    .await;
    let cache = platform::cache::ProductCache::connect(&config.cache)
        .unwrap()
        .unwrap();
    assert!(cache.wait_connected(Duration::from_secs(15)).await);
    if let Some((version, _)) = cache.get(id_uuid).await.unwrap() {
        assert!(version >= 3, "entry at version {version} survived the edit");
    }
    // A fill of the old version is refused by the raised floor.
    assert!(!cache.fill(id_uuid, 2, b"{}").await.unwrap());
    eventually("reads serve the edit", || async {
        let (status, _, body) = get(&api, &path).await;
        (status == 200 && body["product_name"] == "renamed while Redis hung").then_some(())
    })
    .await;
    drop(redis);
    api.stop().await;
    projector.stop().await;
    env.cleanup().await;
}
