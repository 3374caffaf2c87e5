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

/// Writes `product` (insert or replace), the only way rows of `products` change.
pub async fn upsert_product(
    client: &impl tokio_postgres::GenericClient,
    product: &ProductState,
) -> Result<(), tokio_postgres::Error> {
    let version = i64::try_from(product.version).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO products (id, user_id, product_name, product_description, product_price,
                                   product_images, images, compressed_product_images, version,
                                   created_at, updated_at, product_currency, deleted_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
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
            &[
                &product.id,
                &product.user_id,
                &product.product_name,
                &product.product_description,
                &product.product_price,
                &product.product_images,
                &Json(&product.images),
                &Json(&product.compressed_product_images),
                &version,
                &product.created_at,
                &product.updated_at,
                &product.product_currency,
                &product.deleted_at,
            ],
        )
        .await?;
    Ok(())
}

/// Writes `user` (insert or replace), the only way rows of `users` change.
pub async fn upsert_user(
    client: &impl tokio_postgres::GenericClient,
    user: &UserState,
) -> Result<(), tokio_postgres::Error> {
    let version = i64::try_from(user.version).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO users (id, name, email, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET
                name = EXCLUDED.name, email = EXCLUDED.email, version = EXCLUDED.version,
                created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at
             WHERE users.version < EXCLUDED.version",
            &[
                &user.id,
                &user.name,
                &user.email,
                &version,
                &user.created_at,
                &user.updated_at,
            ],
        )
        .await?;
    Ok(())
}
