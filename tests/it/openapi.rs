//! The OpenAPI document against the running API: every operation it lists is served, and every answer
//! the API really gives (successes and errors) is one the document lists for that operation, with a body
//! that validates against the schema it gives.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::{TestApi, TestEnv, product_body};

/// Checks answers against the document and remembers which operations were exercised.
struct Checker {
    doc: Value,
    seen: BTreeSet<(String, String)>,
}

impl Checker {
    /// Sends `request` for the operation `method path` and checks the answer; returns status and body.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = response.text().await.unwrap();
        let operation = &self.doc["paths"][path][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {path} is served but not in the document"
        );
        let answer = &operation["responses"][status.to_string()];
        assert!(
            answer.is_object(),
            "{method} {path} answered {status}, which the document does not list: {text}"
        );
        let body = if content_type.starts_with("application/json") {
            let body: Value = serde_json::from_str(&text).unwrap();
            let schema = &answer["content"]["application/json"]["schema"];
            assert!(
                schema.is_object(),
                "{method} {path} {status} has a JSON body the document does not describe"
            );
            let mut with_components = schema.clone();
            with_components["components"] = self.doc["components"].clone();
            let validator = jsonschema::draft202012::new(&with_components).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {path} {status}: the body does not match the document: {errors:?}\n{body:#}"
            );
            body
        } else {
            Value::String(text)
        };
        self.seen.insert((method.to_lowercase(), path.to_owned()));
        (status, body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_and_answers_as_documented() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();

    let served: Value = api.get("/openapi.json").await.json().await.unwrap();
    let doc: Value = serde_json::from_str(&api::openapi_document()).unwrap();
    assert_eq!(served, doc, "/openapi.json is the generated document");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut c = Checker {
        doc,
        seen: BTreeSet::new(),
    };
    exercise(&mut c, &api).await;

    let documented: BTreeSet<(String, String)> = c.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "patch", "put", "delete"].contains(&k.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let missed: Vec<_> = documented.difference(&c.seen).collect();
    assert!(missed.is_empty(), "operations never exercised: {missed:?}");

    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

/// One call (or more) of every operation, successes and the usual errors.
async fn exercise(c: &mut Checker, api: &TestApi) {
    let http = &api.http;
    let url = |p: &str| api.url(p);
    c.call("GET", "/healthz", http.get(url("/healthz"))).await;
    c.call("GET", "/readyz", http.get(url("/readyz"))).await;
    c.call("GET", "/metrics", http.get(url("/metrics"))).await;
    let (s, _) = c
        .call(
            "GET",
            "/images/{shard}/{hash}/{file}",
            http.get(url(&format!("/images/ab/ab{}/x.webp", "0".repeat(62)))),
        )
        .await;
    assert_eq!(
        s, 404,
        "served only with API_LOCAL_IMAGES_DIR (tests/it/pipeline.rs)"
    );
    c.call("GET", "/openapi.json", http.get(url("/openapi.json")))
        .await;
    c.call("GET", "/asyncapi.yaml", http.get(url("/asyncapi.yaml")))
        .await;
    let (s, _) = c
        .call(
            "GET",
            "/schemas/{name}",
            http.get(url("/schemas/ProductCreated.v2.json")),
        )
        .await;
    assert_eq!(s, 200);
    c.call(
        "GET",
        "/schemas/{name}",
        http.get(url("/schemas/nope.json")),
    )
    .await;
    c.call(
        "GET",
        "/schemas/pipeline/{name}",
        http.get(url("/schemas/pipeline/DeadLetter.v1.json")),
    )
    .await;

    // Users and keys.
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let (s, user) = c
        .call(
            "POST",
            "/users",
            http.post(url("/users"))
                .json(&json!({"name": "Ada", "email": email})),
        )
        .await;
    assert_eq!(s, 201);
    let user_id = user["id"].as_str().unwrap().to_owned();
    let (s, _) = c
        .call(
            "POST",
            "/users",
            http.post(url("/users"))
                .json(&json!({"name": "", "email": 3})),
        )
        .await;
    assert_eq!(s, 422);
    c.call(
        "POST",
        "/users",
        http.post(url("/users"))
            .header("content-type", "text/plain")
            .body("x"),
    )
    .await;
    let (s, _) = c
        .call(
            "GET",
            "/users/{id}",
            http.get(url(&format!("/users/{user_id}"))),
        )
        .await;
    assert_eq!(s, 200);
    c.call("GET", "/users/{id}", http.get(url("/users/not-a-uuid")))
        .await;
    let (s, key) = c
        .call(
            "POST",
            "/users/{id}/api-keys",
            http.post(url(&format!("/users/{user_id}/api-keys"))),
        )
        .await;
    assert_eq!(s, 201);
    let key_id = key["id"].as_str().unwrap();
    let (s, _) = c
        .call(
            "DELETE",
            "/users/{id}/api-keys/{key_id}",
            http.delete(url(&format!("/users/{user_id}/api-keys/{key_id}"))),
        )
        .await;
    assert_eq!(s, 204);

    // Products: create, read, list, history, edit, errors, delete.
    let (s, product) = c
        .call(
            "POST",
            "/products",
            http.post(url("/products")).json(&product_body(&user_id)),
        )
        .await;
    assert_eq!(s, 201);
    let id = product["id"].as_str().unwrap().to_owned();
    let one = format!("/products/{id}");
    let (s, _) = c
        .call(
            "GET",
            "/products/{id}",
            http.get(url(&format!("{one}?min_version=2"))),
        )
        .await;
    assert_eq!(s, 200);
    c.call(
        "GET",
        "/products/{id}",
        http.get(url(&one)).header("if-none-match", "\"2\""),
    )
    .await;
    c.call(
        "GET",
        "/products/{id}",
        http.get(url(&format!("{one}?min_version=0"))),
    )
    .await;
    c.call(
        "POST",
        "/products",
        http.post(url("/products"))
            .json(&json!({"product_price": "1.999"})),
    )
    .await;
    c.call(
        "POST",
        "/products",
        http.post(url("/products"))
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    let (s, _) = c
        .call(
            "GET",
            "/products",
            http.get(url(&format!("/products?user_id={user_id}&max_price=400"))),
        )
        .await;
    assert_eq!(s, 200);
    c.call("GET", "/products", http.get(url("/products"))).await;
    let (s, _) = c
        .call(
            "GET",
            "/products/changes",
            http.get(url("/products/changes?user_id=nope")),
        )
        .await;
    assert_eq!(
        s, 422,
        "the stream itself is checked in tests/it/changes.rs"
    );
    let (s, _) = c
        .call(
            "GET",
            "/products/{id}/events",
            http.get(url(&format!("{one}/events"))),
        )
        .await;
    assert_eq!(s, 200);
    let patch = |body: Value| {
        http.patch(url(&one))
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
    };
    let (s, _) = c
        .call(
            "PATCH",
            "/products/{id}",
            patch(json!({"product_price": "10.00"})).header("if-match", "\"2\""),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = c
        .call(
            "PATCH",
            "/products/{id}",
            patch(json!({"product_name": "x"})).header("if-match", "\"2\""),
        )
        .await;
    assert_eq!(s, 412);
    let (s, _) = c
        .call(
            "PATCH",
            "/products/{id}",
            patch(json!({"user_id": user_id, "product_name": ""})),
        )
        .await;
    assert_eq!(s, 422);
    let (s, _) = c
        .call(
            "GET",
            "/products/{id}",
            http.get(url(&format!("{one}?as_of_version=1"))),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = c
        .call("DELETE", "/products/{id}", http.delete(url(&one)))
        .await;
    assert_eq!(s, 204);
    let (s, _) = c.call("GET", "/products/{id}", http.get(url(&one))).await;
    assert_eq!(s, 410);
    let (s, _) = c
        .call(
            "DELETE",
            "/products/{id}",
            http.delete(url(&format!("/products/{}", uuid::Uuid::now_v7()))),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = c
        .call(
            "POST",
            "/products",
            reqwest::Client::new()
                .post(url("/products"))
                .json(&product_body(&user_id)),
        )
        .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn the_docs_page_is_served_without_the_internet() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let page = api.get("/docs/").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // Every script and style the page loads comes from the API itself.
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        let r = api.get(&format!("/docs/{asset}")).await;
        assert_eq!(r.status(), 200, "{asset}");
    }
    let init = api
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
    assert!(
        !html.contains("https://"),
        "the page loads nothing remote: {html}"
    );
    api.stop().await;
    env.cleanup().await;
}

/// The Chromium binary: `CHROMIUM`, else `chromium` or `chromium-browser` on PATH (`just test`
/// installs Debian's `chromium` when it is missing).
fn chromium() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_owned();
        }
    }
    panic!("no Chromium: install Debian's `chromium` (just test does) or set CHROMIUM");
}

/// Runs headless Chromium on `url` with `args` (offline: no background networking).
fn headless(url: &str, args: &[&str]) -> std::process::Output {
    let profile = std::env::temp_dir().join(format!("catalog-chromium-{}", uuid::Uuid::new_v4()));
    let output = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    output
}

/// A real browser loads `/docs` and the page lists every operation of the document; a screenshot is
/// left in the target directory (`docs-page.png`, kept by CI) for people to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shows_every_operation_on_the_docs_page() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let url = api.url("/docs/");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || headless(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let doc: Value = serde_json::from_str(&api::openapi_document()).unwrap();
    let mut missing = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let rendered = format!("opblock-{method}");
            let path_attr = format!("data-path=\"{path}\"");
            if !dom.contains(&rendered) || !dom.contains(&path_attr) {
                missing.push(format!("{method} {path}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs page does not show {missing:?}; page:\n{dom}"
    );
    assert!(dom.contains("Catalog API"), "the title is shown");

    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let shot = target.join("docs-page.png");
    let shot_arg = format!("--screenshot={}", shot.display());
    let out = tokio::task::spawn_blocking(move || {
        headless(&url, &[shot_arg.as_str(), "--window-size=1280,2000"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real picture"
    );

    api.stop().await;
    env.cleanup().await;
}
