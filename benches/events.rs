//! Hot paths that run once per event or request: envelope encoding/decoding and request validation.

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use events::{AnyEnvelope, Decimal, Envelope, ProductCreated, ProductEvent};
use uuid::Uuid;

fn envelope() -> Envelope<ProductEvent> {
    Envelope::new(
        Uuid::now_v7(),
        1,
        Utc::now(),
        Some("5d1c8a0e-2f4b-4c6d-9e8f-0a1b2c3d4e5f".into()),
        ProductEvent::Created(ProductCreated {
            user_id: Uuid::now_v7(),
            product_name: "Walnut desk".into(),
            product_description: "Solid walnut, 140 x 70 cm.".into(),
            product_price: Decimal::new(34990, 2),
            currency: "EUR".into(),
            product_images: vec![
                "https://images.example.com/desk-front.jpg".into(),
                "https://images.example.com/desk-side.jpg".into(),
            ],
        }),
    )
}

fn events(c: &mut Criterion) {
    let e = envelope();
    let bytes = e.to_json();
    c.bench_function("envelope encode", |b| b.iter(|| black_box(&e).to_json()));
    c.bench_function("envelope decode", |b| {
        b.iter(|| AnyEnvelope::from_json(black_box(&bytes)).unwrap())
    });
}

fn validation(c: &mut Criterion) {
    let body = br#"{"user_id":"0192f7a3-1b2c-7e4f-8a9b-0c1d2e3f4a5b","product_name":"Walnut desk",
        "product_description":"Solid walnut.","product_price":"349.90",
        "product_images":["https://images.example.com/a.jpg","https://images.example.com/b.jpg"]}"#;
    c.bench_function("parse and validate POST /products body", |b| {
        b.iter(|| {
            let fields: api::domain::RawFields = serde_json::from_slice(black_box(body)).unwrap();
            api::domain::NewProduct::parse(&fields).unwrap()
        })
    });
}

criterion_group!(benches, events, validation);
criterion_main!(benches);
