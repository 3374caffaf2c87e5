//! Property-based fuzzing of every route over real HTTP: generated methods, paths, query strings,
//! headers and bodies (well-formed, almost well-formed and garbage), `FUZZ_CASES` (2000) per run.
//! Whatever arrives, the API answers within its time limits, never with a 5xx, and every refusal is a
//! JSON error body with a `code`.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestEnv, product_body};

/// What the generated requests may refer to: things that exist, so cases reach past the 404s.
#[derive(Debug, Clone)]
struct Known {
    user_id: String,
    api_key: String,
    product_id: String,
    key_id: String,
}

#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    path: String,
    query: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        "[0-9]{1,30}(\\.[0-9]{0,30})?".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for one field: plausible, edge-case or anything at all.
fn field(plausible: Vec<Value>) -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(plausible),
        1 => any_json(),
        1 => prop_oneof![
            Just(json!("")),
            Just(json!(" ")),
            Just(json!("\u{200b}\u{202e}")),
            Just(json!("\u{0000}")),
            Just(json!("x".repeat(10_000))),
            Just(json!(-1)),
            Just(json!(1e308)),
            Just(json!("1e400")),
            Just(json!("-0.00")),
            Just(json!("NaN")),
            Just(json!("99999999999999999999999999.99")),
        ],
    ]
}

/// A JSON object built from `fields` (each present or not), sometimes with an unknown field.
fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let parts: Vec<_> = fields
        .into_iter()
        .map(|(name, value)| prop::option::weighted(0.8, value).prop_map(move |v| (name, v)))
        .collect();
    (parts, prop::option::weighted(0.15, (".{1,10}", any_json())))
        .prop_map(|(parts, extra)| {
            let mut map = serde_json::Map::new();
            for (name, value) in parts {
                if let Some(v) = value {
                    map.insert(name.to_owned(), v);
                }
            }
            if let Some((k, v)) = extra {
                map.insert(k, v);
            }
            Value::Object(map)
        })
        .boxed()
}

fn product_fields(known: &Known, with_user: bool) -> BoxedStrategy<Value> {
    let urls = prop::collection::vec(
        field(vec![
            json!("http://images.invalid/a.jpg"),
            json!("https://example.invalid/b.png"),
            json!("ftp://example.invalid/c.gif"),
            json!("http://127.0.0.1/x.jpg"),
            json!("not a url"),
        ]),
        0..12,
    )
    .prop_map(Value::from)
    .boxed();
    let mut fields = vec![
        (
            "product_name",
            field(vec![json!("Desk lamp"), json!("Ünïcödé ✓")]).boxed(),
        ),
        (
            "product_description",
            field(vec![json!("Brass, 40 cm."), json!("")]).boxed(),
        ),
        (
            "product_price",
            field(vec![
                json!("19.99"),
                json!("0.01"),
                json!(12),
                json!("12.345"),
            ])
            .boxed(),
        ),
        ("product_images", urls),
    ];
    if with_user {
        fields.push((
            "user_id",
            field(vec![
                json!(known.user_id),
                json!(Uuid::new_v4().to_string()),
            ])
            .boxed(),
        ));
    }
    object(fields)
}

fn user_fields() -> BoxedStrategy<Value> {
    object(vec![
        (
            "name",
            field(vec![json!("Ada"), json!("Grace Hopper")]).boxed(),
        ),
        (
            "email",
            field(vec![
                json!("fuzz@example.com"),
                json!("a@b"),
                json!("Ａda@example.com"),
                json!("no-at-sign"),
            ])
            .boxed(),
        ),
    ])
}

/// A path segment: an id that exists, a fresh UUID, or any text (percent-encoded).
fn segment(existing: Vec<String>) -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(existing),
        1 => Just(Uuid::new_v4().to_string()),
        1 => ".{0,40}".prop_map(|s| urlencode(&s)),
        1 => prop::sample::select(vec![
            "%00".to_owned(), "..".to_owned(), "%2e%2e%2f".to_owned(),
            "00000000-0000-0000-0000-000000000000".to_owned(), "9".repeat(400),
        ]),
    ]
    .boxed()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn query(known: &Known) -> BoxedStrategy<String> {
    let keys = vec![
        "user_id",
        "min_price",
        "max_price",
        "name",
        "cursor",
        "limit",
        "min_version",
        "currency",
        "error_class",
    ];
    let value = prop_oneof![
        Just(known.user_id.clone()),
        Just("10".to_owned()),
        Just("-1".to_owned()),
        Just("1e999".to_owned()),
        Just("%00".to_owned()),
        Just("18446744073709551616".to_owned()),
        ".{0,30}".prop_map(|s| urlencode(&s)),
    ];
    prop::collection::vec((prop::sample::select(keys), value), 0..5)
        .prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        })
        .boxed()
}

fn headers(known: &Known) -> BoxedStrategy<Vec<(&'static str, String)>> {
    let auth = prop_oneof![
        Just(None),
        Just(Some(format!("Bearer {}", known.api_key))),
        Just(Some(format!("Bearer {}", crate::helpers::TEST_ADMIN_KEY))),
        Just(Some("Bearer ".to_owned())),
        Just(Some("Basic YWRhOmFkYQ==".to_owned())),
        "[ -~]{0,60}".prop_map(Some),
    ];
    let content_type = prop::option::of(prop::sample::select(vec![
        "application/json".to_owned(),
        "application/merge-patch+json".to_owned(),
        "text/plain".to_owned(),
        "application/json; charset=latin1".to_owned(),
        "multipart/form-data; boundary=x".to_owned(),
    ]));
    let if_match = prop::option::weighted(
        0.3,
        prop_oneof![
            Just("\"1\"".to_owned()),
            Just("*".to_owned()),
            Just("\"99999999999999999999\"".to_owned()),
            "[ -~]{0,20}",
        ],
    );
    let idempotency = prop::option::weighted(0.3, "[ -~]{0,300}");
    let request_id = prop::option::weighted(0.2, "[ -~]{0,300}");
    (auth, content_type, if_match, idempotency, request_id)
        .prop_map(|(auth, content_type, if_match, idempotency, request_id)| {
            let mut h = Vec::new();
            if let Some(v) = auth {
                h.push(("authorization", v));
            }
            if let Some(v) = content_type {
                h.push(("content-type", v));
            }
            if let Some(v) = if_match {
                h.push(("if-match", v));
            }
            if let Some(v) = idempotency {
                h.push(("idempotency-key", v));
            }
            if let Some(v) = request_id {
                h.push(("x-request-id", v));
            }
            h
        })
        .boxed()
}

fn body(json_body: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        6 => json_body.prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
        1 => any_json().prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Some),
        1 => Just(Some(b"{\"product_name\": ".to_vec())),
        1 => Just(Some(vec![b'['; 5000])),
        1 => Just(None),
    ]
}

fn case(known: Known) -> impl Strategy<Value = Case> {
    let products = segment(vec![known.product_id.clone()]);
    let users = segment(vec![known.user_id.clone()]);
    let keys = segment(vec![known.key_id.clone()]);
    let route = prop_oneof![
        Just(("/products".to_owned(), 0u8)),
        products
            .clone()
            .prop_map(|id| (format!("/products/{id}"), 1)),
        products.prop_map(|id| (format!("/products/{id}/events"), 2)),
        Just(("/products/changes".to_owned(), 8)),
        Just(("/users".to_owned(), 3)),
        users.clone().prop_map(|id| (format!("/users/{id}"), 4)),
        users
            .clone()
            .prop_map(|id| (format!("/users/{id}/api-keys"), 5)),
        (users, keys).prop_map(|(u, k)| (format!("/users/{u}/api-keys/{k}"), 6)),
        prop::sample::select(vec![
            "/healthz",
            "/readyz",
            "/asyncapi.yaml",
            "/schemas/ProductCreated.json",
            "/schemas/pipeline/ImageJob.json",
            "/schemas/..%2f..%2fetc%2fpasswd",
            "/",
            "/products/",
            "//products",
            "/products?",
            "/nope",
        ])
        .prop_map(|p| (p.to_owned(), 7)),
    ];
    // Mostly a method the route has (so cases get past routing), sometimes any.
    let methods_of = |kind: u8| -> Vec<&'static str> {
        match kind {
            0 => vec!["GET", "POST"],
            1 => vec!["GET", "PATCH", "DELETE"],
            3 | 5 => vec!["POST"],
            6 => vec!["DELETE"],
            _ => vec!["GET"],
        }
    };
    let any_method = prop::sample::select(vec![
        "GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS",
    ]);
    let routed = route.prop_flat_map(move |(path, kind)| {
        (
            Just((path, kind)),
            prop_oneof![4 => prop::sample::select(methods_of(kind)), 1 => any_method.clone()],
        )
    });
    (
        routed,
        query(&known),
        headers(&known),
        body(product_fields(&known, true)),
        body(product_fields(&known, false)),
        body(user_fields()),
    )
        .prop_map(
            |(((path, kind), method), query, headers, create, patch, user)| {
                let body = match (kind, method) {
                    (0, _) => create,
                    (1, _) => patch,
                    (3 | 5, _) => user,
                    (_, "GET" | "HEAD" | "DELETE") => None,
                    _ => create,
                };
                Case {
                    method,
                    path,
                    query,
                    headers,
                    body,
                }
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_never_get_a_5xx_or_hang() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    // Waits for versions that never come are the API working as documented, not a hang: keep
    // them short so the run is about the inputs.
    config.read_wait_ms = 100;
    // Generated writes come fast from one address and one key.
    config.auth.rate_per_sec = 1_000_000.0;
    config.auth.rate_burst = 1_000_000.0;
    config.auth.anonymous_rate_per_sec = 1_000_000.0;
    let api = env.spawn_api_with(config).await;
    let projector = env.spawn_projector();

    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let user: Value = api
        .post("/users", &json!({"name": "Fuzz", "email": email}))
        .await
        .json()
        .await
        .unwrap();
    let user_id = user["id"].as_str().unwrap().to_owned();
    let created: Value = api
        .post("/products", &product_body(&user_id))
        .await
        .json()
        .await
        .unwrap();
    let key: Value = api
        .post(&format!("/users/{user_id}/api-keys"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let known = Known {
        user_id,
        api_key: user["api_key"].as_str().unwrap_or_default().to_owned(),
        product_id: created["id"].as_str().unwrap().to_owned(),
        key_id: key["id"].as_str().unwrap_or_default().to_owned(),
    };

    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        // Shrinking re-sends requests; a few rounds find a small failing case without a long tail.
        max_shrink_iters: 200,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let handle = tokio::runtime::Handle::current();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let base = api.base.clone();
    let counts = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    let result = tokio::task::block_in_place(|| {
        runner
            .run(&case(known), |case| {
                let status = handle.block_on(send(&http, &base, &case))?;
                *counts.lock().unwrap().entry(status).or_default() += 1;
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    println!("statuses: {:?}", counts.lock().unwrap());
    if let Err(error) = result {
        panic!("{error}");
    }
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

async fn send(http: &reqwest::Client, base: &str, case: &Case) -> Result<u16, TestCaseError> {
    let url = if case.query.is_empty() {
        format!("{base}{}", case.path)
    } else {
        format!("{base}{}?{}", case.path, case.query)
    };
    let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
    let mut request = http.request(method, &url);
    for (name, value) in &case.headers {
        request = request.header(*name, value.as_str());
    }
    if let Some(body) = &case.body {
        request = request.body(body.clone());
    }
    let started = std::time::Instant::now();
    let response = request.send().await.map_err(|e| {
        TestCaseError::fail(format!("no answer ({e}) after {:?}", started.elapsed()))
    })?;
    let status = response.status();
    let is_stream = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if status.is_success() && is_stream && case.method != "HEAD" {
        // The change feed never ends: its first event must come at once, then the case is done.
        let mut body = response.bytes_stream();
        let first =
            tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut body))
                .await
                .map_err(|_| TestCaseError::fail("the change feed sent nothing"))?;
        let first = first
            .and_then(Result::ok)
            .ok_or_else(|| TestCaseError::fail("the change feed ended at once"))?;
        if !first.starts_with(b"event: ready") {
            return Err(TestCaseError::fail(format!(
                "the change feed did not start with `ready`: {:?}",
                String::from_utf8_lossy(&first)
            )));
        }
        return Ok(status.as_u16());
    }
    let is_json = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let text = response
        .text()
        .await
        .map_err(|e| TestCaseError::fail(format!("body not read: {e}")))?;
    if status.is_server_error() {
        return Err(TestCaseError::fail(format!("{status}: {text}")));
    }
    if status.is_client_error() && case.method != "HEAD" {
        let body: Value = serde_json::from_str(&text)
            .map_err(|_| TestCaseError::fail(format!("{status} without a JSON body: {text:?}")))?;
        if !is_json || !body["code"].is_string() {
            return Err(TestCaseError::fail(format!(
                "{status} without a code: {text}"
            )));
        }
    }
    Ok(status.as_u16())
}
