//! PostgreSQL failing under the write path, on a private cluster (the rest of the suite never sees it).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestEnv, brokers, header};
use crate::procs::{PrivatePostgres, signal};

/// The process id of the cluster's process of `backend_type` (e.g. `walwriter`).
async fn pid_of(env: &TestEnv, backend_type: &str) -> u32 {
    let row = env
        .pg()
        .await
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = $1",
            &[&backend_type],
        )
        .await
        .unwrap();
    u32::try_from(row.get::<_, i32>(0)).unwrap()
}

/// A connection to the environment's database once the server has recovered from the crash of its
/// process `crashed` (a new one of `backend_type` runs).
async fn connect_when_back(
    env: &TestEnv,
    backend_type: &str,
    crashed: u32,
) -> deadpool_postgres::Object {
    let started = Instant::now();
    loop {
        let pool = platform::db::pool(&env.db()).unwrap();
        if let Ok(client) = pool.get().await {
            let running = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = $1",
                    &[&backend_type],
                )
                .await;
            if let Ok(Some(row)) = running {
                if u32::try_from(row.get::<_, i32>(0)).ok() != Some(crashed) {
                    return client;
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "PostgreSQL did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The published marks of a write commit without waiting for their WAL flush (they record only what
/// the broker acknowledged). When one PostgreSQL process crashes, the server recovers without
/// restarting its postmaster (`restart_after_crash`) and unflushed WAL is lost: the marks are gone,
/// the events pending again, though the broker has them. The next write to the stream, moments later,
/// must not send them a second time: they were recorded before the server came back, so they are
/// looked for in the log first. (`pg_postmaster_start_time()` does not move in such a recovery: the
/// rule that relied on it alone sent them twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_lost_when_a_database_process_crashes_send_no_event_twice() {
    // The WAL writer is stopped during the write, so nothing flushes the marks before the crash
    // (nor may autovacuum, the background writer or a checkpoint, which flush WAL before they write).
    let pg = PrivatePostgres::start_with(
        "-c autovacuum=off -c wal_writer_delay=10000 -c bgwriter_lru_maxpages=0 -c checkpoint_timeout=3600",
    );
    let env = TestEnv::on_database(brokers(), pg.port).await;
    let mut config = env.api_config();
    // No relay: the next writer of the stream is the one that finds the events pending.
    config.outbox_interval_ms = 3_600_000;
    let api = env.spawn_api_with(config).await;
    let user = api.create_user().await;

    let walwriter = pid_of(&env, "walwriter").await;
    signal(walwriter, "STOP");
    let written = Instant::now();
    let created = api
        .http
        .post(api.url("/products"))
        .json(&json!({"user_id": user, "product_name": "Desk", "product_price": "10.00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id: Uuid = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let unmarked =
        "SELECT count(*) FROM event_store WHERE aggregate_id = $1 AND published_at IS NULL";
    let before: i64 = env
        .pg()
        .await
        .query_one(unmarked, &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, 0, "the write marked its events published");

    // A crash of one server process: the postmaster terminates the others and recovers.
    signal(walwriter, "KILL");
    let client = connect_when_back(&env, "walwriter", walwriter).await;
    let after: i64 = client.query_one(unmarked, &[&id]).await.unwrap().get(0);
    assert_eq!(after, 2, "the crash lost both unflushed marks");
    let (postmaster_restarted, statistics_reset): (bool, bool) = client
        .query_one(
            "SELECT pg_postmaster_start_time() > min(recorded_at),
                    pg_stat_get_bgwriter_stat_reset_time() > max(recorded_at)
               FROM event_store WHERE aggregate_id = $1",
            &[&id],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(
        !postmaster_restarted,
        "the postmaster kept running: its start time is older than the events"
    );
    assert!(
        statistics_reset,
        "the recovery reset the shared statistics after the events were recorded"
    );

    // The next write of the stream, while the lost marks' events are under 2 s old.
    let url = api.url(&format!("/products/{id}"));
    let mut status = 0;
    // One idempotency key: an attempt that recorded the edit and then met a dead connection is
    // answered (and its events published) by the next.
    let edit_key = Uuid::new_v4().to_string();
    for _ in 0..20 {
        status = api
            .http
            .patch(&url)
            .header("idempotency-key", &edit_key)
            .json(&json!({"product_name": "Oak desk"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            break;
        }
        // The API's pooled connections died with the crash; a request may meet one.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "the edit after the crash");
    assert!(
        written.elapsed() < Duration::from_millis(1800),
        "the edit came {:?} after the write: too late to tell the crash rule from the 2 s one",
        written.elapsed()
    );

    let in_log: Vec<String> = env
        .stream_in_log(&id.to_string(), 3)
        .await
        .iter()
        .map(|m| header(m, "ce_id").unwrap_or_default())
        .collect();
    let mut unique = in_log.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        (in_log.len(), unique.len()),
        (3, 3),
        "created, images requested, updated: each once in the log ({in_log:?})"
    );
    let marked: i64 = client.query_one(unmarked, &[&id]).await.unwrap().get(0);
    assert_eq!(marked, 0, "the found events are marked published");

    api.stop().await;
    drop(client);
    env.cleanup().await;
    drop(pg);
}
