//! Who may change what: API keys, JWTs from an identity provider, ownership, rate limits, the actor
//! on every event, and no secret in any log line.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApi, TestEnv, capture_logs};

/// An HTTP client without credentials.
fn anonymous() -> reqwest::Client {
    reqwest::Client::new()
}

async fn sign_up(api: &TestApi) -> (String, String, String) {
    let r = anonymous()
        .post(api.url("/users"))
        .json(&json!({"name": "Ada", "email": format!("{}@example.com", Uuid::new_v4().simple())}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    (
        body["id"].as_str().unwrap().to_owned(),
        body["api_key"].as_str().unwrap().to_owned(),
        body["api_key_id"].as_str().unwrap().to_owned(),
    )
}

fn product(user: Option<&str>) -> Value {
    let mut body = json!({"product_name": "Desk", "product_price": "10.00"});
    if let Some(user) = user {
        body["user_id"] = user.into();
    }
    body
}

/// Issues another API key to `user`, asked with `key` (one of the user's own): its id and the key.
async fn issue_key(api: &TestApi, user: &str, key: &str) -> (String, String) {
    let issued: Value = anonymous()
        .post(api.url(&format!("/users/{user}/api-keys")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        issued["id"].as_str().unwrap().to_owned(),
        issued["api_key"].as_str().unwrap().to_owned(),
    )
}

/// Revokes key `key_id` of `user`, asked with `key`: `204`.
async fn revoke_key(api: &TestApi, user: &str, key_id: &str, key: &str) {
    let revoked = anonymous()
        .delete(api.url(&format!("/users/{user}/api-keys/{key_id}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
}

/// `PATCH url {"product_name": "Oak desk"}` with `key`: a patch that changes nothing once the product
/// is renamed so.
async fn rename_to_oak(url: &str, key: &str) -> reqwest::StatusCode {
    anonymous()
        .patch(url)
        .bearer_auth(key)
        .json(&json!({"product_name": "Oak desk"}))
        .send()
        .await
        .unwrap()
        .status()
}

async fn post_product(api: &TestApi, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut r = anonymous().post(api.url("/products")).json(body);
    if let Some(token) = token {
        r = r.bearer_auth(token);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_a_valid_credential_of_the_owner_and_no_secret_is_ever_logged() {
    let logs = capture_logs();
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let second = env.spawn_api().await;
    let projector = env.spawn_projector();
    let (ada, ada_key, ada_key_id) = sign_up(&api).await;
    let (bob, bob_key, _) = sign_up(&api).await;
    assert!(
        ada_key.starts_with("cat_") && ada_key.len() == 68,
        "{ada_key}"
    );

    // 401: without, with an unknown key, with garbage; the challenge names the scheme.
    for token in [None, Some("cat_0000"), Some("not a token")] {
        let r = post_product(&api, token, &product(None)).await;
        assert_eq!(r.status(), 401, "{token:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthenticated");
    }

    // The caller owns what it creates; a foreign user_id is 403.
    let r = post_product(&api, Some(&ada_key), &product(None)).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["user_id"], ada.as_str());
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        post_product(&api, Some(&ada_key), &product(Some(&bob)))
            .await
            .status(),
        403
    );
    assert_eq!(
        post_product(&api, Some(&ada_key), &product(Some(&ada)))
            .await
            .status(),
        201
    );

    // Bob may not change or delete Ada's product; Ada may.
    let url = api.url(&format!("/products/{id}"));
    let bob_patch = anonymous()
        .patch(&url)
        .bearer_auth(&bob_key)
        .json(&json!({"product_name": "Mine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bob_patch.status(), 403);
    let body: Value = bob_patch.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");
    assert_eq!(
        anonymous()
            .delete(&url)
            .bearer_auth(&bob_key)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        anonymous()
            .patch(&url)
            .bearer_auth(&ada_key)
            .json(&json!({"product_name": "Oak desk"}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The actor of each event is who caused it.
    assert_eq!(
        api.get(&format!("/products/{id}?min_version=3"))
            .await
            .status(),
        200
    );
    let events: Value = api
        .get(&format!("/products/{id}/events"))
        .await
        .json()
        .await
        .unwrap();
    let actors: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors, [ada.as_str(), ada.as_str(), ada.as_str()]);

    // Keys: another one for Ada (by Ada only), then revoking the first is seen by the second process.
    let keys_url = api.url(&format!("/users/{ada}/api-keys"));
    assert_eq!(
        anonymous()
            .post(&keys_url)
            .bearer_auth(&bob_key)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let (_, new_key) = issue_key(&api, &ada, &ada_key).await;
    assert_eq!(
        post_product(&second, Some(&ada_key), &product(None))
            .await
            .status(),
        201
    );
    revoke_key(&api, &ada, &ada_key_id, &new_key).await;
    // The other process used the key (and remembers it): its very next request is refused all the same.
    let refused = post_product(&second, Some(&ada_key), &product(None)).await;
    assert_eq!(
        refused.status(),
        401,
        "the other process refuses the revoked key"
    );
    assert_eq!(
        post_product(&second, Some(&new_key), &product(None))
            .await
            .status(),
        201
    );

    // A replayed sign-up does not show the key again.
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let signup = || {
        anonymous()
            .post(api.url("/users"))
            .header("idempotency-key", "signup-1")
            .json(&json!({"name": "Cy", "email": email}))
            .send()
    };
    let first: Value = signup().await.unwrap().json().await.unwrap();
    let again: Value = signup().await.unwrap().json().await.unwrap();
    assert!(first["api_key"].is_string());
    assert!(again.get("api_key").is_none(), "{again}");

    projector.stop().await;
    api.stop().await;
    second.stop().await;
    let logged = logs.text();
    assert!(logged.contains("API key revoked"), "logs are captured");
    for secret in [
        ada_key.as_str(),
        bob_key.as_str(),
        new_key.as_str(),
        first["api_key"].as_str().unwrap(),
    ] {
        assert!(!logged.contains(secret), "a key reached the logs");
        assert!(
            !logged.contains(&secret[4..20]),
            "part of a key reached the logs"
        );
    }
    env.cleanup().await;
}

/// A process remembers the API keys it has seen, for product commands. The statement that records a
/// command checks the key, and every answer that statement does not decide (a refusal, a replayed
/// answer) looks it up: a key revoked through another process is refused on every command path by the
/// very next request, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_elsewhere_is_refused_on_every_command_path_of_a_process_that_remembers_it() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let other = env.spawn_api().await;
    let (ada, ada_key, _) = sign_up(&api).await;
    let created: Value = post_product(&other, Some(&ada_key), &product(None))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let url = other.url(&format!("/products/{id}"));
    let rename = |key: &str| {
        anonymous()
            .patch(&url)
            .bearer_auth(key)
            .header("idempotency-key", "rename-1")
            .json(&json!({"product_name": "Oak desk"}))
    };
    let renamed = rename(&ada_key).send().await.unwrap();
    assert_eq!(renamed.status(), 200);
    assert_eq!(renamed.headers()["etag"], "\"3\"");

    // One key per path; `other` sees each valid once (a patch that changes nothing), then `api`
    // revokes them all.
    let cases = [
        "create",
        "create with a bad body",
        "patch an unknown product",
        "patch with a stale If-Match",
        "replay an answered patch",
        "patch",
        "patch that changes nothing",
        "delete",
    ];
    let mut keys = Vec::new();
    for _ in cases {
        let (key_id, secret) = issue_key(&api, &ada, &ada_key).await;
        assert_eq!(
            rename_to_oak(&url, &secret).await,
            200,
            "a patch that changes nothing"
        );
        keys.push((key_id, secret));
    }
    // `other` remembers them: a command by one reads no key (the write checks it).
    let lookups_before = key_lookups(&other).await;
    assert_eq!(rename_to_oak(&url, &keys[0].1).await, 200);
    assert_eq!(
        key_lookups(&other).await,
        lookups_before,
        "a remembered key is not looked up for a command"
    );
    for (key_id, _) in &keys {
        revoke_key(&api, &ada, key_id, &ada_key).await;
    }

    let unknown = other.url(&format!("/products/{}", Uuid::now_v7()));
    for (case, (_, key)) in cases.iter().zip(&keys) {
        let request = match *case {
            "create" => anonymous()
                .post(other.url("/products"))
                .json(&product(None)),
            "create with a bad body" => anonymous()
                .post(other.url("/products"))
                .json(&json!({"product_name": "Desk", "product_price": "ten"})),
            "patch an unknown product" => anonymous()
                .patch(&unknown)
                .json(&json!({"product_name": "Chair"})),
            "patch with a stale If-Match" => anonymous()
                .patch(&url)
                .header("if-match", "\"1\"")
                .json(&json!({"product_name": "Chair"})),
            "replay an answered patch" => rename(key),
            "patch" => anonymous()
                .patch(&url)
                .json(&json!({"product_name": "Chair"})),
            "patch that changes nothing" => anonymous()
                .patch(&url)
                .json(&json!({"product_name": "Oak desk"})),
            "delete" => anonymous().delete(&url),
            case => unreachable!("{case}"),
        };
        let r = request.bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 401, "{case}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthenticated", "{case}");
    }
    // Found revoked, the key is forgotten: refused again.
    let again = post_product(&other, Some(&keys[0].1), &product(None)).await;
    assert_eq!(again.status(), 401);

    // Over its rate, a remembered key is told 429 while valid and 401 once revoked.
    let mut config = env.api_config();
    config.auth.rate_per_sec = 0.01;
    config.auth.rate_burst = 1.0;
    let strict = env.spawn_api_with(config).await;
    let strict_url = strict.url(&format!("/products/{id}"));
    let issue_and_use_up = async || {
        let (key_id, secret) = issue_key(&api, &ada, &ada_key).await;
        assert_eq!(
            rename_to_oak(&strict_url, &secret).await,
            200,
            "the one request its rate allows"
        );
        (key_id, secret)
    };
    let (_, valid) = issue_and_use_up().await;
    let (revoked_id, revoked) = issue_and_use_up().await;
    revoke_key(&api, &ada, &revoked_id, &ada_key).await;
    assert_eq!(
        post_product(&strict, Some(&valid), &product(None))
            .await
            .status(),
        429
    );
    assert_eq!(
        post_product(&strict, Some(&revoked), &product(None))
            .await
            .status(),
        401
    );
    strict.stop().await;

    // Nothing was written: the product is still at version 3, and a valid key changes it.
    let r = anonymous()
        .patch(&url)
        .bearer_auth(&ada_key)
        .header("if-match", "\"3\"")
        .json(&json!({"product_name": "Chair"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    api.stop().await;
    other.stop().await;
    env.cleanup().await;
}

/// The API's `api_key_lookups_total`, all results together.
async fn key_lookups(api: &TestApi) -> f64 {
    crate::metrics::sum(
        &crate::metrics::scrape(&api.url("/metrics")).await,
        "api_key_lookups_total",
        &[],
    )
}

#[tokio::test]
async fn a_credential_over_its_rate_gets_429_with_retry_after() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.auth.rate_per_sec = 1.0;
    config.auth.rate_burst = 3.0;
    let api = env.spawn_api_with(config).await;
    let (_, key, _) = sign_up(&api).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = post_product(&api, Some(&key), &product(None)).await;
        let status = r.status().as_u16();
        if status == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["code"], "rate_limited");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [201, 201, 201, 429, 429]);
    api.stop().await;
    env.cleanup().await;
}

/// base64url without padding, for JWKs.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

struct Signer {
    kid: &'static str,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

fn ed25519(kid: &'static str) -> Signer {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Signer {
        kid,
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
                    "x": b64(pair.public_key().as_ref())}),
    }
}

fn es256(kid: &'static str) -> Signer {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref(); // 0x04 || X || Y
    Signer {
        kid,
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                    "x": b64(&public[1..33]), "y": b64(&public[33..65])}),
    }
}

/// An RS256 key made by the openssl command (ring cannot generate RSA keys).
fn rs256(kid: &'static str, dir: &std::path::Path) -> Signer {
    let pem = dir.join(format!("{kid}.pem"));
    let status = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&pem)
        .arg("2048")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success());
    let modulus = std::process::Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let hex = String::from_utf8(modulus.stdout).unwrap();
    let hex = hex.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let der = std::process::Command::new("openssl")
        .args(["rsa", "-traditional", "-outform", "DER", "-in"])
        .arg(&pem)
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(der.status.success());
    Signer {
        kid,
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_der(&der.stdout),
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(&n), "e": "AQAB"}),
    }
}

fn token(signer: &Signer, claims: &Value) -> String {
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid.to_owned());
    jsonwebtoken::encode(&header, claims, &signer.key).unwrap()
}

#[tokio::test]
async fn jwts_from_an_identity_provider_are_checked_against_its_jwks() {
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("jwks-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ed = ed25519("ed-1");
    let ec = es256("ec-1");
    let rsa = rs256("rsa-1", &dir);
    let impostor = ed25519("ed-1"); // same kid, another key: a wrong signature
    let jwks = dir.join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [ed.jwk, ec.jwk, rsa.jwk]}).to_string(),
    )
    .unwrap();
    let mut config = env.api_config();
    config.auth.jwks_url = jwks.display().to_string();
    config.auth.jwt_issuer = "https://id.example".into();
    config.auth.jwt_audience = "catalog".into();
    let api = env.spawn_api_with(config).await;
    let (user, _, _) = sign_up(&api).await;
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64, aud: &str| json!({"sub": user, "iss": "https://id.example", "aud": aud, "exp": exp, "nbf": now - 10});
    let valid = claims(now + 600, "catalog");
    for signer in [&ed, &ec, &rsa] {
        let r = post_product(&api, Some(&token(signer, &valid)), &product(None)).await;
        assert_eq!(r.status(), 201, "{:?}", signer.alg);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["user_id"], user.as_str());
    }
    let refused = [
        ("expired", token(&ed, &claims(now - 600, "catalog"))),
        ("wrong audience", token(&ed, &claims(now + 600, "other"))),
        ("wrongly signed", token(&impostor, &valid)),
        ("not yet valid", {
            let mut early = valid.clone();
            early["nbf"] = (now + 600).into();
            token(&ed, &early)
        }),
        ("unknown key", {
            let stranger = ed25519("other-kid");
            token(&stranger, &valid)
        }),
    ];
    for (what, jwt) in refused {
        let r = post_product(&api, Some(&jwt), &product(None)).await;
        assert_eq!(r.status(), 401, "{what}");
        assert!(
            !r.text().await.unwrap().contains(&jwt),
            "the token is not echoed"
        );
    }
    api.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

#[tokio::test]
async fn with_authenticated_reads_a_read_needs_a_credential_but_probes_do_not() {
    let env = TestEnv::new().await;
    let mut config = env.api_config();
    config.auth.reads = api::auth::ReadAccess::Authenticated;
    let api = env.spawn_api_with(config).await;
    let (user, key, _) = sign_up(&api).await;
    let url = api.url(&format!("/users/{user}"));
    assert_eq!(anonymous().get(&url).send().await.unwrap().status(), 401);
    assert_ne!(
        anonymous()
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            anonymous()
                .get(api.url(probe))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    api.stop().await;
    env.cleanup().await;
}
