//! The change feed (`GET /products/changes`, Server-Sent Events) over real HTTP: filtered by user,
//! resumed with `Last-Event-ID` after a disconnect with no gap and no duplicate, and a slow subscriber
//! cut off with a clear last event while another subscriber gets everything.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::{TEST_ADMIN_KEY, TestApi, TestEnv, product_body};

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Takes every complete event (ended by a blank line) off the front of `buffer`; comments skipped.
fn take_events(buffer: &mut String) -> Vec<SseEvent> {
    let mut events = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let frame: String = buffer.drain(..end + 2).collect();
        let mut event = SseEvent::default();
        let mut has_field = false;
        for line in frame.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => event.id = Some(value.to_owned()),
                "event" => event.event = Some(value.to_owned()),
                "data" => {
                    if !event.data.is_empty() {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                }
                _ => continue, // comments (keep-alives)
            }
            has_field = true;
        }
        if has_field {
            events.push(event);
        }
    }
    events
}

/// A subscriber reading the feed through reqwest.
struct Subscriber {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    pending: std::collections::VecDeque<SseEvent>,
}

impl Subscriber {
    async fn open(api: &TestApi, query: &str, last_event_id: Option<&str>) -> Self {
        let mut request = api.http.get(api.url(&format!("/products/changes{query}")));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            pending: Default::default(),
        }
    }

    /// The next event, or `None` when the stream ends or nothing comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let chunk = tokio::time::timeout(wait, self.body.next()).await.ok()??;
            self.buffer
                .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
            self.pending.extend(take_events(&mut self.buffer));
        }
    }

    /// Change events until `done` holds for them (the `ready` event is checked and skipped).
    async fn until(&mut self, done: impl Fn(&[Value]) -> bool) -> Vec<(String, Value)> {
        let mut seen: Vec<(String, Value)> = Vec::new();
        let mut envelopes: Vec<Value> = Vec::new();
        while !done(&envelopes) {
            let event = self
                .next(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("the feed stopped; so far: {envelopes:#?}"));
            if event.event.as_deref() == Some("ready") {
                continue;
            }
            assert_eq!(event.event, None, "a change is a plain message: {event:?}");
            let envelope: Value = serde_json::from_str(&event.data).unwrap();
            envelopes.push(envelope.clone());
            seen.push((event.id.unwrap(), envelope));
        }
        seen
    }
}

fn event_ids(envelopes: &[Value]) -> Vec<String> {
    envelopes
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The product's event ids in stream order, from the event store (the authority).
async fn history(env: &TestEnv, id: &str) -> Vec<String> {
    env.pg()
        .await
        .query(
            "SELECT event_id::text FROM event_store WHERE aggregate_id = $1::text::uuid
              ORDER BY sequence",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn create(api: &TestApi, user: &str) -> String {
    let mut body = product_body(user);
    body["product_images"] = json!([]);
    let r = api.post("/products", &body).await;
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_filter_shows_that_users_changes_as_on_the_topic() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let (alice, bob) = (api.create_user().await, api.create_user().await);

    let mut feed = Subscriber::open(&api, &format!("?user_id={alice}"), None).await;
    let ready = feed.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ready.event.as_deref(), Some("ready"));
    assert!(
        ready.id.is_some(),
        "the starting position is an id to resume from"
    );

    let bobs = create(&api, &bob).await;
    let id = create(&api, &alice).await;
    let r = api
        .http
        .patch(api.url(&format!("/products/{id}")))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"product_price":"5.00"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Bob's edit comes after Alice's: the feed must skip it.
    let r = api
        .http
        .delete(api.url(&format!("/products/{bobs}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = api
        .http
        .delete(api.url(&format!("/products/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let seen = feed
        .until(|e| e.iter().any(|e| e["event_type"] == "ProductDeleted"))
        .await;
    let envelopes: Vec<Value> = seen.iter().map(|(_, e)| e.clone()).collect();
    assert!(
        envelopes.iter().all(|e| e["aggregate_id"] == id.as_str()),
        "only Alice's product: {envelopes:#?}"
    );
    let types: Vec<&str> = envelopes
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "ProductCreated",
            "ImagesRequested",
            "ProductUpdated",
            "ProductDeleted"
        ]
    );
    // The same events, in the same order, as the product's history (the JSON of the topic).
    assert_eq!(event_ids(&envelopes), history(&env, &id).await);
    let topic = env
        .read_products_topic(|m| {
            m.iter()
                .filter(|m| crate::helpers::header(m, "ce_subject").as_deref() == Some(id.as_str()))
                .count()
                >= 4
        })
        .await;
    let on_topic: Vec<Value> = crate::helpers::keyed(&topic, &id)
        .iter()
        .map(|m| serde_json::from_slice(rdkafka::Message::payload(*m).unwrap()).unwrap())
        .collect();
    assert_eq!(
        envelopes, on_topic,
        "each event is the topic's envelope, as is"
    );

    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_last_event_id_resumes_without_gap_or_duplicate() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let user = api.create_user().await;

    let mut first = Subscriber::open(&api, "", None).await;
    let mut products = Vec::new();
    for _ in 0..3 {
        products.push(create(&api, &user).await);
    }
    // Read three events, then hang up mid-stream.
    let part = first.until(|e| e.len() >= 3).await;
    let last_id = part.last().unwrap().0.clone();
    drop(first);
    for _ in 0..2 {
        products.push(create(&api, &user).await);
    }
    let mut second = Subscriber::open(&api, "", Some(&last_id)).await;
    let ready = second.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ready.event.as_deref(), Some("ready"));
    assert_eq!(
        ready.id.as_deref(),
        Some(last_id.as_str()),
        "resumes where it left off"
    );
    // Five products, two events each.
    let rest = second.until(|e| e.len() + 3 >= 10).await;

    let all: Vec<Value> = part.iter().chain(&rest).map(|(_, e)| e.clone()).collect();
    let ids = event_ids(&all);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "no event twice: {ids:?}");
    let mut expected = HashSet::new();
    for p in &products {
        expected.extend(history(&env, p).await);
    }
    assert_eq!(
        distinct,
        expected.iter().collect::<HashSet<_>>(),
        "every event of the five products"
    );
    // Nothing more arrives: no duplicate later either.
    assert!(second.next(Duration::from_millis(500)).await.is_none());

    // Garbage cursors are refused by name.
    let r = api
        .http
        .get(api.url("/products/changes"))
        .header("last-event-id", "0:1,7:3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "Last-Event-ID");
    let r = api.get("/products/changes?user_id=nope").await;
    assert_eq!(r.status(), 422);

    api.stop().await;
    env.cleanup().await;
}

/// Reads a raw HTTP/1.0 response (no chunking: the body is the SSE text) until the server closes.
async fn read_to_end(stream: &mut tokio::net::TcpStream) -> String {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("the server ends the stream")
        .unwrap();
    String::from_utf8(raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_cut_off_with_a_last_event_and_never_slows_another() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.changes_buffer = 4;
    config.changes_slow_client_ms = 300;
    let api = env.spawn_api_with(config).await;

    // The slow one: a socket with a small receive buffer that is not read until the server has cut
    // it off. Its `ready` event is read first, so its subscription surely starts before the events.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = api.base.trim_start_matches("http://").parse().unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    slow.write_all(
        format!(
            "GET /products/changes HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TEST_ADMIN_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !String::from_utf8_lossy(&head).contains("event: ready\n") || !head.ends_with(b"\n\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut byte))
            .await
            .expect("the slow subscriber's ready event")
            .unwrap();
        assert_eq!(
            n, 1,
            "the server closed the slow subscription before it began"
        );
        head.push(byte[0]);
    }
    let mut fast = Subscriber::open(&api, "", None).await;
    let ready = fast.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ready.event.as_deref(), Some("ready"));

    // Rounds of 100 events of ~25 KiB (2.5 MB), until the server reports the slow subscriber cut
    // off: how much the kernel buffers on the way differs between machines, so no fixed amount is
    // assumed to be enough. The fast subscriber reads every round as it is published.
    let user = Uuid::now_v7();
    let mut fast_ids: HashSet<String> = HashSet::new();
    let mut total = 0usize;
    let too_slow = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("changes_disconnects_total{reason=\"client_too_slow\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // The count before (other tests' APIs may share this process's metrics).
    let before = too_slow(&api.get("/metrics").await.text().await.unwrap());
    let slow_cut = |text: &str| too_slow(text) > before;
    for round in 0.. {
        assert!(
            round < 40,
            "the slow subscriber was not cut off after {total} events"
        );
        let events: Vec<events::Envelope<events::ProductEvent>> = (0..100)
            .map(|i| {
                let i = total + i;
                events::Envelope::new(
                    Uuid::now_v7(),
                    1,
                    chrono::Utc::now(),
                    None,
                    events::ProductEvent::Created(events::ProductCreated {
                        user_id: user,
                        product_name: format!("Bulk {i}"),
                        product_description: "x".repeat(4000),
                        product_price: events::Decimal::new(100, 2),
                        currency: "EUR".into(),
                        product_images: (0..10)
                            .map(|j| {
                                format!(
                                    "https://images.example.com/{}/{i}-{j}.jpg",
                                    "a".repeat(1900)
                                )
                            })
                            .collect(),
                    }),
                )
            })
            .collect();
        let published = {
            let env = &env;
            let events = &events;
            async move { env.publish(events).await }
        };
        let (_, got) = tokio::join!(published, fast.until(|e| e.len() >= 100));
        fast_ids.extend(event_ids(
            &got.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        ));
        total += 100;
        assert_eq!(
            fast_ids.len(),
            total,
            "the other subscriber got every event"
        );
        // The slow subscriber's buffer fills within `changes_slow_client_ms` of its socket filling.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if slow_cut(&api.get("/metrics").await.text().await.unwrap()) {
            break;
        }
    }

    let mut body = read_to_end(&mut slow).await;
    let received = take_events(&mut body);
    let last = received.last().unwrap();
    assert_eq!(
        last.event.as_deref(),
        Some("overflow"),
        "a clear last message"
    );
    let overflow: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(overflow["code"], "client_too_slow");
    let changes: Vec<&SseEvent> = received.iter().filter(|e| e.event.is_none()).collect();
    assert!(
        changes.len() < total,
        "it was cut off before the end ({} events)",
        changes.len()
    );
    // Where it was cut off is where the last delivered event left it: resuming there loses nothing.
    let resume_from = overflow["resume_from"].as_str().unwrap();
    let head = String::from_utf8(head).unwrap();
    let (_, head) = head.split_once("\r\n\r\n").unwrap();
    let mut head = head.to_owned();
    let ready = take_events(&mut head).pop().unwrap();
    let last_delivered = changes
        .last()
        .map_or_else(|| ready.id.clone().unwrap(), |e| e.id.clone().unwrap());
    assert_eq!(resume_from, last_delivered);
    let mut ids: Vec<String> = changes
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut again = Subscriber::open(&api, "", Some(resume_from)).await;
    let rest = again.until(|e| e.len() + ids.len() >= total).await;
    ids.extend(event_ids(
        &rest.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
    ));
    let distinct: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(distinct.len(), ids.len(), "no duplicate across the cut");
    assert_eq!(distinct, fast_ids, "no gap across the cut");

    api.stop().await;
    env.cleanup().await;
}

/// Under a `user_id` filter the feed must know whose product each event is; when PostgreSQL cannot
/// say (here: the read model is locked past `DB_TIMEOUT_MS`), the event is neither sent nor
/// skipped: the subscription ends with `unavailable`, and resuming from its `resume_from` delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_feed_that_cannot_look_up_an_owner_ends_and_resumes_without_a_gap() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.db.timeout_ms = 1000;
    let api = env.spawn_api_with(config).await;
    let user = api.create_user().await;
    // Created before the subscription starts: the feed never sees its ProductCreated, so it must ask
    // PostgreSQL whose product it is.
    let id = create(&api, &user).await;
    let mut feed = Subscriber::open(&api, &format!("?user_id={user}"), None).await;
    let ready = feed.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ready.event.as_deref(), Some("ready"));

    let mut lock = env.pg().await;
    let tx = lock.transaction().await.unwrap();
    // The owner lookup reads the read model first; the write does not touch it (no projector runs).
    tx.batch_execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let edit = api
        .http
        .patch(api.url(&format!("/products/{id}")))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"product_price":"7.00"}"#);
    let (written, ended) = tokio::join!(
        async { edit.send().await.unwrap().status() },
        feed.next(Duration::from_secs(20))
    );
    let ended = ended.expect("the feed says why it ends");
    tx.rollback().await.unwrap();
    drop(lock);
    assert_eq!(written, 200);
    assert_eq!(ended.event.as_deref(), Some("unavailable"), "{ended:?}");
    let body: Value = serde_json::from_str(&ended.data).unwrap();
    let resume_from = body["resume_from"].as_str().unwrap();
    assert_eq!(
        Some(resume_from),
        ready.id.as_deref(),
        "nothing was delivered"
    );
    assert!(
        feed.next(Duration::from_secs(2)).await.is_none(),
        "and it ended"
    );

    let mut again = Subscriber::open(&api, &format!("?user_id={user}"), Some(resume_from)).await;
    let got = again.until(|e| !e.is_empty()).await;
    assert_eq!(got[0].1["event_type"], "ProductUpdated");
    assert_eq!(got[0].1["aggregate_id"], id.as_str());

    api.stop().await;
    env.cleanup().await;
}
