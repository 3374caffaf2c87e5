//! The `GET /products/:id` handler path in process (router via `tower::ServiceExt::oneshot`, no
//! socket), with the Redis cache and without it, against the real PostgreSQL and Redis of this
//! machine. Needs no broker: the product row is written straight into a bench schema.

use std::hint::black_box;

use axum::body::Body;
use axum::http::Request;
use clap::Parser;
use criterion::{Criterion, criterion_group, criterion_main};
use events::ProductState;
use tower::ServiceExt;
use uuid::Uuid;

fn config(cache: bool) -> api::Config {
    let mut config = api::Config::parse_from([
        "bench",
        "--db-name",
        "catalog_bench",
        "--db-schema",
        "bench_handler",
        "--kafka-create-topics",
        "false",
        "--cache-key-prefix",
        "bench-handler:",
    ]);
    if !cache {
        config.cache.redis_url = String::new();
    }
    config
}

fn handler(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (cached, plain, id) = rt.block_on(async {
        let config = config(true);
        platform::db::ensure_database(&config.db)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432");
        platform::db::migrate(&config.db).await.unwrap();
        let id = Uuid::now_v7();
        let now = chrono::Utc::now();
        let product = ProductState {
            id,
            user_id: Uuid::now_v7(),
            product_name: "Walnut desk".into(),
            product_description: "Solid walnut, 140 x 70 cm, oiled.".into(),
            product_price: rust_decimal::Decimal::new(34990, 2),
            product_currency: "EUR".into(),
            product_images: vec!["https://images.example.com/desk-front.jpg".into()],
            images: vec![],
            compressed_product_images: vec![],
            version: 2,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        };
        let pool = platform::db::pool(&config.db).unwrap();
        platform::read_model::upsert_product(&pool.get().await.unwrap(), &product)
            .await
            .unwrap();
        let cached_state = api::build_state(&config).await.unwrap();
        if let Some(cache) = &cached_state.cache {
            assert!(
                cache
                    .wait_connected(std::time::Duration::from_secs(5))
                    .await,
                "Redis on 127.0.0.1:6379"
            );
        }
        let plain_config = self::config(false);
        let plain_state = api::build_state(&plain_config).await.unwrap();
        (
            api::router(cached_state, &config),
            api::router(plain_state, &plain_config),
            id,
        )
    });
    let path = format!("/products/{id}");
    let request = || Request::get(&path).body(Body::empty()).unwrap();
    // The first read fills the cache; every measured one is a hit.
    rt.block_on(cached.clone().oneshot(request())).unwrap();
    let mut group = c.benchmark_group("GET /products/:id handler");
    group.bench_function("Redis cache", |b| {
        b.to_async(&rt).iter(|| async {
            let response = cached.clone().oneshot(request()).await.unwrap();
            assert_eq!(response.headers()["x-cache"], "hit");
            black_box(response)
        })
    });
    group.bench_function("no cache (PostgreSQL)", |b| {
        b.to_async(&rt).iter(|| async {
            let response = plain.clone().oneshot(request()).await.unwrap();
            assert_eq!(response.status(), 200);
            black_box(response)
        })
    });
    group.finish();
}

criterion_group!(benches, handler);
criterion_main!(benches);
