//! Row mapping of the projection tables (`users`, `products`), shared by their one writer (the
//! projector) and their readers (the API), so both agree on every column.

use events::{ImageStatus, ProductState, UserState};
use tokio_postgres::Row;
use tokio_postgres::types::Json;

/// Columns of `products`, in the order [`product_from_row`] reads them.
pub const PRODUCT_COLUMNS: &str = "id, user_id, product_name, product_description, product_price, \
     product_images, images, compressed_product_images, version, created_at, updated_at, \
     product_currency, deleted_at";

/// Columns of `users`, in the order [`user_from_row`] reads them.
pub const USER_COLUMNS: &str = "id, name, email, version, created_at, updated_at";

/// Reads a `products` row selected with [`PRODUCT_COLUMNS`].
pub fn product_from_row(row: &Row) -> ProductState {
    let Json(images): Json<Vec<ImageStatus>> = row.get(6);
    let Json(compressed): Json<Vec<events::ImageVariant>> = row.get(7);
    ProductState {
        id: row.get(0),
        user_id: row.get(1),
        product_name: row.get(2),
        product_description: row.get(3),
        product_price: row.get(4),
        product_images: row.get(5),
        images,
        compressed_product_images: compressed,
        version: u64::try_from(row.get::<_, i64>(8)).unwrap_or_default(),
        created_at: row.get(9),
        updated_at: row.get(10),
        product_currency: row.get(11),
        deleted_at: row.get(12),
    }
}

/// Reads a `users` row selected with [`USER_COLUMNS`].
pub fn user_from_row(row: &Row) -> UserState {
    UserState {
        id: row.get(0),
        name: row.get(1),
        email: row.get(2),
        version: u64::try_from(row.get::<_, i64>(3)).unwrap_or_default(),
        created_at: row.get(4),
        updated_at: row.get(5),
    }
}

/// Writes `product` (insert or replace); see [`upsert_products`].
pub async fn upsert_product(
    client: &impl deadpool_postgres::GenericClient,
    product: &ProductState,
) -> Result<(), tokio_postgres::Error> {
    upsert_products(client, &[product]).await
}

/// Writes every product of `products` (insert or replace) in one prepared statement, the only way rows
/// of `products` change. A row already at a newer version is left alone. Ids must be distinct.
pub async fn upsert_products(
    client: &impl deadpool_postgres::GenericClient,
    products: &[&ProductState],
) -> Result<(), tokio_postgres::Error> {
    if products.is_empty() {
        return Ok(());
    }
    let statement = client
        .prepare_cached(
            "INSERT INTO products (id, user_id, product_name, product_description, product_price,
                                   product_images, images, compressed_product_images, version,
                                   created_at, updated_at, product_currency, deleted_at)
             SELECT u.id, u.user_id, u.product_name, u.product_description, u.product_price,
                    ARRAY(SELECT jsonb_array_elements_text(u.product_images)), u.images,
                    u.compressed, u.version, u.created_at, u.updated_at, u.currency, u.deleted_at
               FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::numeric[],
                           $6::jsonb[], $7::jsonb[], $8::jsonb[], $9::int8[], $10::timestamptz[],
                           $11::timestamptz[], $12::text[], $13::timestamptz[])
                    AS u(id, user_id, product_name, product_description, product_price,
                         product_images, images, compressed, version, created_at, updated_at,
                         currency, deleted_at)
             ON CONFLICT (id) DO UPDATE SET
                user_id = EXCLUDED.user_id,
                product_name = EXCLUDED.product_name,
                product_description = EXCLUDED.product_description,
                product_price = EXCLUDED.product_price,
                product_images = EXCLUDED.product_images,
                images = EXCLUDED.images,
                compressed_product_images = EXCLUDED.compressed_product_images,
                version = EXCLUDED.version,
                created_at = EXCLUDED.created_at,
                updated_at = EXCLUDED.updated_at,
                product_currency = EXCLUDED.product_currency,
                deleted_at = EXCLUDED.deleted_at
             WHERE products.version < EXCLUDED.version",
        )
        .await?;
    let ids: Vec<uuid::Uuid> = products.iter().map(|p| p.id).collect();
    let users: Vec<uuid::Uuid> = products.iter().map(|p| p.user_id).collect();
    let names: Vec<&str> = products.iter().map(|p| p.product_name.as_str()).collect();
    let descriptions: Vec<&str> = products
        .iter()
        .map(|p| p.product_description.as_str())
        .collect();
    let prices: Vec<rust_decimal::Decimal> = products.iter().map(|p| p.product_price).collect();
    let sources: Vec<Json<&Vec<String>>> =
        products.iter().map(|p| Json(&p.product_images)).collect();
    let images: Vec<Json<&Vec<ImageStatus>>> = products.iter().map(|p| Json(&p.images)).collect();
    let compressed: Vec<Json<&Vec<events::ImageVariant>>> = products
        .iter()
        .map(|p| Json(&p.compressed_product_images))
        .collect();
    let versions: Vec<i64> = products
        .iter()
        .map(|p| i64::try_from(p.version).unwrap_or(i64::MAX))
        .collect();
    let created: Vec<chrono::DateTime<chrono::Utc>> =
        products.iter().map(|p| p.created_at).collect();
    let updated: Vec<chrono::DateTime<chrono::Utc>> =
        products.iter().map(|p| p.updated_at).collect();
    let currencies: Vec<&str> = products
        .iter()
        .map(|p| p.product_currency.as_str())
        .collect();
    let deleted: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        products.iter().map(|p| p.deleted_at).collect();
    client
        .execute(
            &statement,
            &[
                &ids,
                &users,
                &names,
                &descriptions,
                &prices,
                &sources,
                &images,
                &compressed,
                &versions,
                &created,
                &updated,
                &currencies,
                &deleted,
            ],
        )
        .await?;
    Ok(())
}

/// Writes every user of `users` (insert or replace) in one prepared statement, the only way rows of
/// `users` change. A row already at a newer version is left alone. Ids must be distinct.
pub async fn upsert_users(
    client: &impl deadpool_postgres::GenericClient,
    users: &[&UserState],
) -> Result<(), tokio_postgres::Error> {
    if users.is_empty() {
        return Ok(());
    }
    let statement = client
        .prepare_cached(
            "INSERT INTO users (id, name, email, version, created_at, updated_at)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[],
                                  $5::timestamptz[], $6::timestamptz[])
             ON CONFLICT (id) DO UPDATE SET
                name = EXCLUDED.name, email = EXCLUDED.email, version = EXCLUDED.version,
                created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at
             WHERE users.version < EXCLUDED.version",
        )
        .await?;
    let ids: Vec<uuid::Uuid> = users.iter().map(|u| u.id).collect();
    let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    let emails: Vec<&str> = users.iter().map(|u| u.email.as_str()).collect();
    let versions: Vec<i64> = users
        .iter()
        .map(|u| i64::try_from(u.version).unwrap_or(i64::MAX))
        .collect();
    let created: Vec<chrono::DateTime<chrono::Utc>> = users.iter().map(|u| u.created_at).collect();
    let updated: Vec<chrono::DateTime<chrono::Utc>> = users.iter().map(|u| u.updated_at).collect();
    client
        .execute(
            &statement,
            &[&ids, &names, &emails, &versions, &created, &updated],
        )
        .await?;
    Ok(())
}

/// The next offset of every (topic, partition) `consumer` has applied, as stored in `projection_offsets`
/// of `schema` (the connection's search path when `None`). The projector starts and skips by it, replay
/// compares by it, and lag reports it.
pub async fn stored_positions(
    client: &impl deadpool_postgres::GenericClient,
    schema: Option<&str>,
    consumer: &str,
) -> Result<std::collections::HashMap<(String, i32), i64>, tokio_postgres::Error> {
    let table = match schema {
        Some(schema) => format!("{schema}.projection_offsets"),
        None => "projection_offsets".to_owned(),
    };
    let statement = client
        .prepare_cached(&format!(
            "SELECT topic, partition, next_offset FROM {table} WHERE consumer = $1"
        ))
        .await?;
    Ok(client
        .query(&statement, &[&consumer])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}
