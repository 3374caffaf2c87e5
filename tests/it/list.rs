//! `GET /products?user_id=…`: filters and keyset pagination over a few hundred products.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use events::{Decimal, Envelope, ImagesRequested, ProductCreated, ProductEvent};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{TestApi, TestEnv, eventually};

struct Seeded {
    id: Uuid,
    name: String,
    price: Decimal,
    created_at: DateTime<Utc>,
}

/// Follows `next_cursor` until the last page; returns the ids in order and the number of pages.
async fn all_pages(api: &TestApi, query: &str) -> (Vec<Uuid>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("/products?{query}&cursor={c}"),
            None => format!("/products?{query}"),
        };
        let r = api.get(&url).await;
        assert_eq!(r.status(), 200, "{url}");
        let page: Value = r.json().await.unwrap();
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            ids.push(item["id"].as_str().unwrap().parse().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (ids, pages),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_pages_give_exactly_the_expected_products() {
    const COUNT: usize = 300;
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let projector = env.spawn_projector();
    let user = Uuid::now_v7();
    let other_user = Uuid::now_v7();

    let names = [
        "Walnut desk",
        "Desk LAMP",
        "lamp shade",
        "Chair",
        "Oak table",
        "50% off_lamp",
    ];
    let mut seeded = Vec::new();
    let mut payloads = Vec::new();
    for n in 0..COUNT {
        let id = Uuid::now_v7();
        let name = format!("{} {n}", names[n % names.len()]);
        let price = Decimal::new((n as i64 * 137) % 30_000, 2);
        let created = Envelope::new(
            id,
            1,
            Utc::now(),
            None,
            ProductEvent::Created(ProductCreated {
                user_id: if n % 10 == 9 { other_user } else { user },
                product_name: name.clone(),
                product_description: String::new(),
                product_price: price,
                currency: "EUR".into(),
                product_images: vec![],
            }),
        );
        let requested = Envelope::new(
            id,
            2,
            created.occurred_at,
            None,
            ProductEvent::ImagesRequested(ImagesRequested { images: vec![] }),
        );
        if n % 10 != 9 {
            seeded.push(Seeded {
                id,
                name,
                price,
                created_at: created.occurred_at,
            });
        }
        payloads.push((id.to_string(), created.to_json()));
        payloads.push((id.to_string(), requested.to_json()));
    }
    env.publish_raw(&payloads).await;
    let client = env.pg().await;
    eventually("all products are projected", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM products WHERE version = 2", &[])
            .await
            .unwrap()
            .get(0);
        (n == COUNT as i64).then_some(())
    })
    .await;

    let mut expected: Vec<&Seeded> = seeded.iter().collect();
    expected.sort_by_key(|s| (s.created_at, s.id));
    let ids = |filter: &dyn Fn(&Seeded) -> bool| -> Vec<Uuid> {
        expected
            .iter()
            .filter(|s| filter(s))
            .map(|s| s.id)
            .collect()
    };

    // Everything, default page size: 270 products in 6 pages, no duplicates, no gaps, stable order.
    let (got, pages) = all_pages(&api, &format!("user_id={user}")).await;
    assert_eq!(got, ids(&|_| true));
    assert_eq!(pages, 6);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), got.len());

    // Price range (inclusive, exact decimals), small pages.
    let (low, high) = (Decimal::new(10_000, 2), Decimal::new(19_999, 2));
    let (got, _) = all_pages(
        &api,
        &format!("user_id={user}&min_price=100&max_price=199.99&limit=7"),
    )
    .await;
    assert_eq!(got, ids(&|s| s.price >= low && s.price <= high));
    assert!(!got.is_empty());

    // Name: case-insensitive substring; `%` and `_` are literal.
    let (got, _) = all_pages(&api, &format!("user_id={user}&name=LaMp&limit=250")).await;
    assert_eq!(got, ids(&|s| s.name.to_lowercase().contains("lamp")));
    let (got, _) = all_pages(&api, &format!("user_id={user}&name=50%25%20off_&limit=13")).await;
    assert_eq!(got, ids(&|s| s.name.contains("50% off_")));

    // Everything together.
    let (got, _) = all_pages(
        &api,
        &format!("user_id={user}&name=desk&min_price=50&limit=3"),
    )
    .await;
    let fifty = Decimal::new(50, 0);
    assert_eq!(
        got,
        ids(&|s| s.name.to_lowercase().contains("desk") && s.price >= fifty)
    );

    // Another user's products never show; an unknown user has an empty list.
    let (got, _) = all_pages(&api, &format!("user_id={}", Uuid::now_v7())).await;
    assert!(got.is_empty());

    projector.stop().await;
    api.stop().await;
    env.cleanup().await;
}
