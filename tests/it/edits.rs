//! Products change: PATCH and DELETE with optimistic concurrency, over one sequencer per stream.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApi, TestEnv, eventually};
use crate::pipeline::{ImageServer, create_product, settled};

/// PATCHes `id` with `body`, optionally with `If-Match`; returns status and body.
async fn patch(api: &TestApi, id: &str, body: &Value, if_match: Option<u64>) -> (u16, Value) {
    let mut request = api
        .http
        .patch(api.url(&format!("/products/{id}")))
        .header("content-type", "application/merge-patch+json")
        .body(body.to_string());
    if let Some(v) = if_match {
        request = request.header("if-match", format!("\"{v}\""));
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The sequences of a product's stream in the event store, in order.
async fn stored_sequences(env: &TestEnv, id: &str) -> Vec<i64> {
    env.pg()
        .await
        .query(
            "SELECT sequence FROM event_store WHERE aggregate_id = $1::text::uuid ORDER BY sequence",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The product's history as the API serves it: (sequence, event id) of every event.
async fn history(api: &TestApi, id: &str) -> Vec<(u64, String)> {
    let body: Value = api
        .get(&format!("/products/{id}/events?limit=250"))
        .await
        .json()
        .await
        .unwrap();
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["sequence"].as_u64().unwrap(),
                e["event_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn twenty_patches_with_the_same_if_match_let_exactly_one_through() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = api.create_user().await;
    let id = create_product(&api, &user, &[]).await;

    let patches = (0..20).map(|i| {
        let api = &api;
        let id = &id;
        async move {
            patch(
                api,
                id,
                &json!({"product_name": format!("Desk {i}")}),
                Some(2),
            )
            .await
        }
    });
    let results = futures::future::join_all(patches).await;
    let ok: Vec<&(u16, Value)> = results.iter().filter(|(s, _)| *s == 200).collect();
    let stale: Vec<&(u16, Value)> = results.iter().filter(|(s, _)| *s == 412).collect();
    assert_eq!((ok.len(), stale.len()), (1, 19), "{results:?}");
    assert_eq!(stale[0].1["code"], "version_mismatch");
    assert_eq!(stale[0].1["current_version"], 3);
    assert_eq!(
        stored_sequences(&env, &id).await,
        [1, 2, 3],
        "one event appended"
    );

    // Read-your-writes: the change is visible at once.
    let read: Value = api
        .get(&format!("/products/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["product_name"], ok[0].1["product_name"]);
    assert_eq!(read["version"], 3);
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

/// A command that loses every optimistic race (each attempt decides on a head another writer has
/// just moved) decides once more with the head locked: it is applied once, at the next sequence, on
/// the real state — never refused, never doubled.
#[tokio::test]
async fn a_command_that_keeps_losing_the_race_is_decided_on_the_locked_head() {
    let env = TestEnv::new().await;
    let healthy = env.spawn_api().await;
    let mut unlucky = env.api_config();
    unlucky.fault = Some(api::Fault::LoseEveryRace);
    let unlucky = env.spawn_api_with(unlucky).await;
    let user = healthy.create_user().await;
    let id = create_product(&healthy, &user, &[]).await;

    let (status, body) = patch(&unlucky, &id, &json!({"product_price": "12.50"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3);
    assert_eq!(body["product_price"], "12.50");
    assert_eq!(body["product_name"], "Lamp", "applied to the real state");
    let (status, body) = patch(&unlucky, &id, &json!({"product_name": "Desk lamp"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 4);
    assert_eq!(
        (&body["product_name"], &body["product_price"]),
        (&json!("Desk lamp"), &json!("12.50"))
    );
    assert_eq!(stored_sequences(&env, &id).await, [1, 2, 3, 4]);
    unlucky.stop().await;
    healthy.stop().await;
    env.cleanup().await;
}

/// Two API processes edit one product behind each other's backs, each deciding on the head it reads
/// without a lock: nothing may be decided on an old head — a current `If-Match` passes, a change is
/// applied to the latest state, "nothing to change" is judged on the real head, and a product deleted
/// elsewhere is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_through_two_apis_are_decided_on_the_real_head_not_a_stale_one() {
    let env = TestEnv::new().await;
    let a = env.spawn_api().await;
    let b = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = a.create_user().await;
    let id = create_product(&a, &user, &[]).await;
    // A knows the head at version 3.
    let (s, _) = patch(&a, &id, &json!({"product_name": "Oak desk"}), Some(2)).await;
    assert_eq!(s, 200);
    // B moves it to 4 behind A's back.
    let (s, _) = patch(&b, &id, &json!({"product_description": "Oiled."}), Some(3)).await;
    assert_eq!(s, 200);

    // The current version passes on A (its memory says 3).
    let (s, body) = patch(&a, &id, &json!({"product_price": "5.00"}), Some(4)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["version"], 5);
    assert_eq!(
        body["product_description"], "Oiled.",
        "applied to the latest state, B's change kept"
    );
    // A stale one still fails, naming the real version.
    let (s, body) = patch(&a, &id, &json!({"product_price": "6.00"}), Some(4)).await;
    assert_eq!((s, &body["current_version"]), (412, &json!(5)), "{body}");

    // B renames; A, whose memory has the old name, is asked to set the old name back: a change.
    let (s, _) = patch(&b, &id, &json!({"product_name": "Pine desk"}), None).await;
    assert_eq!(s, 200);
    let (s, body) = patch(&a, &id, &json!({"product_name": "Oak desk"}), None).await;
    assert_eq!(s, 200);
    assert_eq!(
        (&body["product_name"], &body["version"]),
        (&json!("Oak desk"), &json!(7))
    );
    assert_eq!(stored_sequences(&env, &id).await, [1, 2, 3, 4, 5, 6, 7]);

    // Deleted through B: gone through A as well.
    let r = b
        .http
        .delete(b.url(&format!("/products/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, body) = patch(&a, &id, &json!({"product_name": "Elm desk"}), None).await;
    assert_eq!(s, 410, "{body}");
    assert_eq!(stored_sequences(&env, &id).await, [1, 2, 3, 4, 5, 6, 7, 8]);

    projector.stop().await;
    b.stop().await;
    a.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn patch_and_delete_answer_every_error_by_name_and_retry_idempotently() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = api.create_user().await;
    let id = create_product(&api, &user, &[]).await;

    let unknown = Uuid::new_v4().to_string();
    assert_eq!(
        patch(&api, &unknown, &json!({"product_name": "X"}), None)
            .await
            .0,
        404
    );
    let (status, body) = patch(
        &api,
        &id,
        &json!({"product_name": " ", "product_price": "-1", "user_id": user, "colour": "red",
                "product_images": ["ftp://x"]}),
        None,
    )
    .await;
    assert_eq!(status, 422);
    let fields: HashSet<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        HashSet::from([
            "product_name",
            "product_price",
            "user_id",
            "colour",
            "product_images[0]"
        ])
    );
    assert_eq!(
        patch(&api, &id, &json!({"product_name": null}), None)
            .await
            .0,
        422
    );
    let text = api
        .http
        .patch(api.url(&format!("/products/{id}")))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), 415);
    assert_eq!(
        patch(&api, &id, &json!({"product_name": "X"}), Some(1))
            .await
            .0,
        412
    );

    // A patch that changes nothing (Lamp is the created name) answers 200 and appends nothing.
    let (status, same) = patch(&api, &id, &json!({"product_name": "Lamp"}), None).await;
    assert_eq!((status, same["version"].clone()), (200, json!(2)));
    assert_eq!(stored_sequences(&env, &id).await, [1, 2]);

    // Idempotent retry: same key and body, one event.
    let send = || {
        api.http
            .patch(api.url(&format!("/products/{id}")))
            .header("content-type", "application/json")
            .header("idempotency-key", "rename-1")
            .body(json!({"product_price": "9.50"}).to_string())
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["etag"], "\"3\"");
    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(stored_sequences(&env, &id).await, [1, 2, 3]);

    // DELETE: stale If-Match 412, then 204; afterwards 410 everywhere, out of lists, history kept.
    let delete = |if_match: Option<&str>| {
        let mut r = api.http.delete(api.url(&format!("/products/{id}")));
        if let Some(v) = if_match {
            r = r.header("if-match", v);
        }
        r.send()
    };
    assert_eq!(delete(Some("\"2\"")).await.unwrap().status(), 412);
    assert_eq!(delete(Some("\"3\"")).await.unwrap().status(), 204);
    let gone = api.get(&format!("/products/{id}")).await;
    assert_eq!(gone.status(), 410);
    let gone: Value = gone.json().await.unwrap();
    assert_eq!(gone["code"], "gone");
    assert!(gone["deleted_at"].is_string());
    assert_eq!(
        patch(&api, &id, &json!({"product_name": "Y"}), None)
            .await
            .0,
        410
    );
    assert_eq!(delete(None).await.unwrap().status(), 410);
    let list: Value = api
        .get(&format!("/products?user_id={user}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
    let events: Vec<u64> = history(&api, &id).await.iter().map(|(s, _)| *s).collect();
    assert_eq!(events, [1, 2, 3, 4]);
    assert_eq!(
        delete(None).await.unwrap().status(),
        410,
        "deleting twice is 410, not a second event"
    );
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_move_processed_images_and_drop_removed_ones_without_reprocessing() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let worker = env.spawn_worker_with(env.worker_config());
    let user = api.create_user().await;
    let (a, b, c) = (
        server.url("/photo/a.jpg"),
        server.url("/photo/b.jpg"),
        server.url("/photo/c.jpg"),
    );
    let id = create_product(&api, &user, &[a.clone(), b.clone()]).await;
    let before = settled(&api, &id, 3).await;
    let a_variants: Vec<Value> = before["compressed_product_images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["position"] == 0)
        .cloned()
        .collect();

    // c is added in front, a moves to position 1, b is removed.
    let (status, edited) = patch(&api, &id, &json!({"product_images": [c, a]}), None).await;
    assert_eq!(status, 200);
    assert_eq!(edited["images"][0]["status"], "pending");
    assert_eq!(edited["images"][1]["status"], "ready");
    let after = settled(&api, &id, 6).await;
    assert_eq!(after["images"][0]["status"], "ready");
    let moved: Vec<Value> = after["compressed_product_images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["position"] == 1)
        .cloned()
        .collect();
    assert_eq!(moved.len(), a_variants.len());
    for (old, new) in a_variants.iter().zip(&moved) {
        assert_eq!(old["key"], new["key"], "a keeps its stored variants");
    }
    assert!(
        after["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["url"] != b),
        "b is gone"
    );
    // The edit asked only for c.
    let requests: Vec<Value> = {
        let body: Value = api
            .get(&format!("/products/{id}/events"))
            .await
            .json()
            .await
            .unwrap();
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event_type"] == "ImagesRequested")
            .cloned()
            .collect()
    };
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1]["data"]["images"],
        json!([{"position": 0, "url": c}])
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_workers_and_redrives_leave_one_contiguous_history() {
    let env = TestEnv::new().await;
    let server = ImageServer::start(0).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker_with(env.worker_config());
    let user = api.create_user().await;
    // The first image fails for good and is dead-lettered (versions 1–3).
    let id = create_product(&api, &user, &[server.url("/fixable")]).await;
    eventually("the worker answered the first request", || async {
        let sequences = stored_sequences(&env, &id).await;
        (sequences.len() >= 3).then_some(())
    })
    .await;
    let letters = eventually("the failed image is dead-lettered", || async {
        let letters: Vec<_> = image_worker::dlq::read_all(&env.kafka(), 2, Duration::from_secs(2))
            .await
            .ok()?
            .into_iter()
            .filter(|r| r.letter.product_id.to_string() == id)
            .collect();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    // An edit adds an image whose server fails twice first: its job climbs the retry ladder (4–5).
    let fixable = server.url("/fixable");
    let flaky = server.url("/flaky/race.jpg");
    let (status, _) = patch(
        &api,
        &id,
        &json!({"product_images": [fixable, flaky]}),
        None,
    )
    .await;
    assert_eq!(status, 200);
    server.fixed.store(true, Ordering::SeqCst);
    // No projector runs: re-drives cannot lean on the projection. Two re-drives and ten edits without
    // If-Match race the worker's retrying job.
    let pool = platform::db::pool(&env.db()).unwrap();
    let redrives = (0..2).map(|_| {
        let (kafka, pool, letters) = (env.kafka(), pool.clone(), letters.clone());
        tokio::spawn(async move { image_worker::dlq::redrive(&kafka, &pool, &letters).await })
    });
    let edits = (0..10).map(|i| {
        let http = api.http.clone();
        let url = api.url(&format!("/products/{id}"));
        tokio::spawn(async move {
            http.patch(url)
                .header("content-type", "application/json")
                .body(json!({"product_description": format!("edit {i}")}).to_string())
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
    });
    let mut redriven = 0;
    for r in futures::future::join_all(redrives).await {
        redriven += r.unwrap().unwrap().images;
    }
    assert_eq!(redriven, 1, "two re-drives, one ImagesRequested");
    for e in futures::future::join_all(edits).await {
        assert_eq!(e.unwrap(), 200);
    }
    let projector = env.spawn_projector();
    // 5 so far + one re-drive + ten edits + two answers (the re-driven image, the flaky one) = 18.
    let product = settled(&api, &id, 18).await;
    assert!(
        product["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "ready"),
        "{product}"
    );
    let sequences = stored_sequences(&env, &id).await;
    let n = sequences.len() as i64;
    assert_eq!(
        sequences,
        (1..=n).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let served = eventually("the read model reaches the last event", || async {
        let h = history(&api, &id).await;
        (h.len() as i64 == n).then_some(h)
    })
    .await;
    let ids: HashSet<&String> = served.iter().map(|(_, e)| e).collect();
    // Every event says who caused it: the operator (the test client), the worker, the re-drive.
    let events: Value = api
        .get(&format!("/products/{id}/events?limit=250"))
        .await
        .json()
        .await
        .unwrap();
    for event in events["items"].as_array().unwrap() {
        let expected = match event["event_type"].as_str().unwrap() {
            "ImagesProcessed" => "system:image-worker",
            "ImagesRequested"
                if event["correlation_id"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("redrive-")) =>
            {
                "system:redrive"
            }
            _ => "admin:",
        };
        assert!(
            event["actor"].as_str().unwrap().starts_with(expected),
            "{event}"
        );
    }
    assert_eq!(ids.len() as i64, n, "no duplicate event id");
    let read: Value = api
        .get(&format!("/products/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["version"].as_i64(), Some(n));
    assert!(
        read["product_description"]
            .as_str()
            .unwrap()
            .starts_with("edit ")
    );
    worker.stop().await;
    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}
