//! Hostile clients: requests that are abandoned half-way must not cost anyone else anything.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::{TestApi, TestEnv, eventually, product_body};

/// Products the API accepted and no projector projects (none runs in these tests): a read of one
/// waits the whole read wait for it (an id the event store never accepted is answered at once).
async fn unprojected(api: &TestApi, n: usize) -> Vec<String> {
    let user = api.create_user().await;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let r = api.post("/products", &product_body(&user)).await;
        assert_eq!(r.status(), 201);
        let body: serde_json::Value = r.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// `n` reads started in the background, each waiting the whole read wait for a product no projector
/// projects; each ends with its status.
async fn waiting_reads(
    api: &TestApi,
    n: usize,
) -> Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::StatusCode>>> {
    unprojected(api, n)
        .await
        .into_iter()
        .map(|id| {
            let http = api.http.clone();
            let url = api.url(&format!("/products/{id}?min_version=1"));
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status()) })
        })
        .collect()
}

/// Sends a raw GET and hangs up after `after`, as an impatient client does.
async fn get_and_disconnect(base: &str, path: &str, after: Duration) {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let _ = tokio::time::timeout(after, stream.read(&mut buf)).await;
    drop(stream);
}

#[tokio::test]
async fn clients_that_disconnect_while_waiting_do_not_wedge_the_api() {
    let env = TestEnv::new().await;
    // The pool is 8 connections in tests; three times as many abandoned waits as connections.
    let api = env.spawn_api().await;
    let ids = unprojected(&api, 24).await;
    let abandoned = ids.iter().map(|id| {
        let path = format!("/products/{id}?min_version=1");
        let base = api.base.clone();
        async move { get_and_disconnect(&base, &path, Duration::from_millis(100)).await }
    });
    futures::future::join_all(abandoned).await;

    // Every request that needs PostgreSQL is served again promptly: 404 for an unknown user, not 503
    // after the pool's checkout timeout, and readiness reports PostgreSQL ok.
    eventually("reads answer from PostgreSQL again", || async {
        let started = std::time::Instant::now();
        let r = api.get(&format!("/users/{}", Uuid::new_v4())).await;
        (r.status() == 404 && started.elapsed() < Duration::from_secs(1)).then_some(())
    })
    .await;
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn many_waiting_reads_do_not_starve_other_requests() {
    let env = TestEnv::new().await;
    // Reads wait for the projection longer than a pool checkout may take (5 s): a waiting read that
    // held its connection would make the plain read below time out at the pool and answer 503.
    let mut config = env.api_config();
    config.read_wait_ms = 8_000;
    let api = env.spawn_api_with(config).await;
    // Four times the pool size of reads waiting for versions that never come.
    let waiting = waiting_reads(&api, 32).await;
    // Plain reads all along the waits are answered from the pool, never left to time out at it.
    for _ in 0..20 {
        let r = api.get(&format!("/users/{}", Uuid::new_v4())).await;
        assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    }
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap(), 404, "a version that never comes");
    }
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn one_client_cannot_hold_more_than_its_share_of_requests() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.client_concurrency = 4;
    config.read_wait_ms = 3_000;
    let api = env.spawn_api_with(config).await;
    // Four waits (for versions that never come) take every slot of this client address.
    let waiting = waiting_reads(&api, 4).await;
    // (They wait 3 s; half a second is ample for all four to arrive.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A fifth request is refused at once, with the reason and when to retry.
    let started = std::time::Instant::now();
    let r = api.get(&format!("/users/{}", Uuid::new_v4())).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "too_many_in_flight");
    // Probes are never refused for it.
    assert_eq!(api.get("/healthz").await.status(), 200);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap(), 404, "a version that never comes");
    }
    // Slots are given back when requests end.
    let r = api.get(&format!("/users/{}", Uuid::new_v4())).await;
    assert_eq!(r.status(), 404);
    api.stop().await;
    env.cleanup().await;
}

/// Reads from `stream` until the server closes it; `None` if it is still open after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn connections_that_trickle_headers_or_sit_idle_are_closed() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.header_timeout_ms = 500;
    let api = env.spawn_api_with(config).await;
    let addr = api.base.trim_start_matches("http://").to_owned();

    // Half a request's headers, then nothing (slowloris).
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5))
            .await
            .is_some(),
        "a connection that never finishes its headers is closed"
    );

    // A whole request is served; the idle keep-alive connection after it is closed.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle connection is closed");
    assert!(answered.starts_with(b"HTTP/1.1 200"), "{answered:?}");
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_connections() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.client_connections = 3;
    config.header_timeout_ms = 1_000;
    let api = env.spawn_api_with(config).await;
    let addr = api.base.trim_start_matches("http://").to_owned();
    // The test client's keep-alive connection from start-up is closed after the header timeout.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let answer = closed_within(&mut extra, Duration::from_secs(5))
        .await
        .expect("a connection over the limit is closed");
    assert!(answer.is_empty(), "closed unanswered: {answer:?}");
    // The connections within the limit are served.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut first, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn list_filters_postgres_cannot_store_are_refused_by_name() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let user = Uuid::new_v4();
    let far = format!(
        "-{:x}.{}",
        1_000_000_000_000_000_000_i64,
        Uuid::nil().simple()
    );
    for (query, field) in [
        (format!("user_id={user}&name=%00"), "name"),
        (format!("user_id={user}&name=desk%07"), "name"),
        (format!("user_id={user}&cursor={far}"), "cursor"),
    ] {
        let r = api.get(&format!("/products?{query}")).await;
        assert_eq!(r.status(), 422, "{query}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["field"], field, "{query}");
    }
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_client_request_id_is_kept_only_when_short_and_plain() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let echoed = |id: String| {
        let api = &api;
        async move {
            let r = api
                .http
                .get(api.url("/healthz"))
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            r.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(echoed("order-42.retry:1".into()).await, "order-42.retry:1");
    for hostile in [
        "x".repeat(10_000),
        "a b".into(),
        "<script>".into(),
        "id\"}".into(),
    ] {
        let id = echoed(hostile.clone()).await;
        assert!(
            Uuid::parse_str(&id).is_ok(),
            "{hostile:.20} was replaced by a fresh id, got {id:.40}"
        );
    }
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn one_address_in_two_unicode_spellings_registers_once_and_invisible_names_are_refused() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let local = Uuid::new_v4().simple().to_string();
    let composed = format!("zo\u{00eb}{local}@example.com");
    let decomposed = format!("zoe\u{0308}{local}@example.com");
    let first = api
        .post(
            "/users",
            &serde_json::json!({"name": "Zoë", "email": composed}),
        )
        .await;
    assert_eq!(first.status(), 201);
    let second = api
        .post(
            "/users",
            &serde_json::json!({"name": "Zoë", "email": decomposed}),
        )
        .await;
    assert_eq!(
        second.status(),
        409,
        "the same address, spelled differently"
    );
    let invisible = api
        .post(
            "/users",
            &serde_json::json!({"name": "\u{200b}\u{2060}", "email": format!("x{local}@example.com")}),
        )
        .await;
    assert_eq!(invisible.status(), 422);
    let body: serde_json::Value = invisible.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "name");
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reads_are_shed_with_retry_after_and_never_starve_writes() {
    let env = TestEnv::new().await;
    let projector = env.spawn_projector();
    let mut config = env.api_config();
    config.read_pool_size = 2;
    config.pool_wait_ms = 300;
    let api = env.spawn_api_with(config).await;
    let user = api.create_user().await;
    let created: serde_json::Value = api
        .post("/products", &crate::helpers::product_body(&user))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/products?user_id={user}");
    assert_eq!(api.get(&path).await.status(), 200);

    // PostgreSQL turns slow for reads of products: a lock held by another session.
    let mut locker = env.pg().await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let http = api.http.clone();
            let url = api.url(&path);
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                (r.status().as_u16(), r.headers().get("retry-after").cloned())
            })
        })
        .collect();
    // Meanwhile writes go on: they have connections of their own.
    let write = api
        .post("/products", &crate::helpers::product_body(&user))
        .await;
    assert_eq!(write.status(), 201, "a write while reads pile up");
    // Reads beyond the two that hold the read connections are shed after the bounded wait, while the
    // two wait for the lock.
    eventually(
        "the reads that found no connection are answered",
        || async { (reads.iter().filter(|r| r.is_finished()).count() >= 6).then_some(()) },
    )
    .await;
    let (done, blocked): (Vec<_>, Vec<_>) = reads.into_iter().partition(|r| r.is_finished());
    for read in done {
        let (status, retry_after) = read.await.unwrap();
        assert_eq!(status, 503, "shed, not queued");
        assert!(retry_after.is_some(), "503 says when to retry");
    }
    tx.rollback().await.unwrap();
    for read in blocked {
        assert_eq!(
            read.await.unwrap().0,
            200,
            "the reads that held a connection finish"
        );
    }
    eventually("reads are served again", || async {
        (api.get(&path).await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        api.get(&format!("/products/{}", created["id"].as_str().unwrap()))
            .await
            .status(),
        200
    );
    api.stop().await;
    projector.stop().await;
    env.cleanup().await;
}
