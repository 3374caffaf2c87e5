//! PostgreSQL: the connection pool and the embedded migrations from `sql/`.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DbConfig;

/// A migration embedded from `sql/`.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Applied ones are recorded in `schema_migrations`; never edit one that
/// has shipped, add the next file instead.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init.sql",
        sql: include_str!("../../../sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_product_search.sql",
        sql: include_str!("../../../sql/0002_product_search.sql"),
    },
    Migration {
        version: 3,
        name: "0003_product_events.sql",
        sql: include_str!("../../../sql/0003_product_events.sql"),
    },
    Migration {
        version: 4,
        name: "0004_product_currency.sql",
        sql: include_str!("../../../sql/0004_product_currency.sql"),
    },
    Migration {
        version: 5,
        name: "0005_event_store.sql",
        sql: include_str!("../../../sql/0005_event_store.sql"),
    },
    Migration {
        version: 6,
        name: "0006_api_keys.sql",
        sql: include_str!("../../../sql/0006_api_keys.sql"),
    },
    Migration {
        version: 7,
        name: "0007_pipeline_rejected.sql",
        sql: include_str!("../../../sql/0007_pipeline_rejected.sql"),
    },
    Migration {
        version: 8,
        name: "0008_pipeline_dead_letters.sql",
        sql: include_str!("../../../sql/0008_pipeline_dead_letters.sql"),
    },
    Migration {
        version: 9,
        name: "0009_append_command.sql",
        sql: include_str!("../../../sql/0009_append_command.sql"),
    },
    Migration {
        version: 10,
        name: "0010_unpublished_by_stream.sql",
        sql: include_str!("../../../sql/0010_unpublished_by_stream.sql"),
    },
    Migration {
        version: 11,
        name: "0011_append_command_with_key.sql",
        sql: include_str!("../../../sql/0011_append_command_with_key.sql"),
    },
];

/// Advisory lock key serialising database-wide setup (extensions) across all schemas.
const DATABASE_SETUP_LOCK: i64 = 0x0063_6174_616c_6f67; // "catalog" in ASCII

/// What can go wrong talking to PostgreSQL at start-up or in the migrator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL answered with an error, or the connection failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The pool could not be built.
    #[error("connection pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    /// No connection could be checked out of the pool in time.
    #[error("connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The server did not answer within the configured timeout.
    #[error("postgres at {0} did not answer in time")]
    Timeout(String),
}

fn pg_config(cfg: &DbConfig, dbname: &str) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(dbname)
        .application_name("catalog")
        .connect_timeout(cfg.timeout())
        // Unqualified names resolve to the configured schema; `public` stays visible for extensions.
        .options(format!("-c search_path={},public", cfg.schema));
    if !cfg.password.is_empty() {
        pg.password(&cfg.password);
    }
    pg
}

async fn connect(cfg: &DbConfig, dbname: &str) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) =
        tokio::time::timeout(cfg.timeout(), pg_config(cfg, dbname).connect(NoTls))
            .await
            .map_err(|_| DbError::Timeout(format!("{}:{}", cfg.host, cfg.port)))??;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres connection closed with an error");
        }
    });
    Ok(client)
}

/// A pool of connections to the configured database and schema.
///
/// Connections are opened lazily; call [`ping`] to fail fast when the server is unreachable.
pub fn pool(cfg: &DbConfig) -> Result<Pool, DbError> {
    pool_sized(cfg, cfg.pool_size, cfg.timeout())
}

/// A pool of `size` connections whose checkout waits at most `wait` (then the caller answers 503
/// rather than queueing without bound).
pub fn pool_sized(cfg: &DbConfig, size: usize, wait: std::time::Duration) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        pg_config(cfg, &cfg.name),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(cfg.timeout()))
        .recycle_timeout(Some(cfg.timeout()))
        .build()?)
}

/// Checks that a connection can be had and answers a query.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// Creates the configured database if it does not exist (connecting to the `postgres` database).
pub async fn ensure_database(cfg: &DbConfig) -> Result<(), DbError> {
    let admin = connect(cfg, "postgres").await?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&cfg.name])
        .await?
        .is_some();
    if !exists {
        let quoted = cfg.name.replace('"', "\"\"");
        match admin
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            Ok(()) => tracing::info!(db.name = %cfg.name, "created database"),
            // Someone else created it between our check and our CREATE: that is what we wanted.
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Applies every migration not yet applied to the configured schema, creating the schema first.
///
/// Safe to run from several processes at once: they serialise on an advisory lock per schema.
/// Returns the names of the migrations this call applied.
pub async fn migrate(cfg: &DbConfig) -> Result<Vec<&'static str>, DbError> {
    let mut client = connect(cfg, &cfg.name).await?;
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", cfg.schema))
        .await
        .or_else(|e| {
            // Concurrent CREATE SCHEMA IF NOT EXISTS can still race on the catalog's unique index.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    // Extensions belong to the database, not the schema: create them once, under a global lock, since
    // concurrent CREATE EXTENSION IF NOT EXISTS can still collide.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&DATABASE_SETUP_LOCK])
        .await?;
    let extension = client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public")
        .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&DATABASE_SETUP_LOCK])
        .await?;
    extension?;
    client
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&cfg.schema])
        .await?;
    let result = apply_pending(&mut client).await;
    client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&cfg.schema])
        .await?;
    let applied = result?;
    for name in &applied {
        tracing::info!(db.schema = %cfg.schema, migration = name, "applied migration");
    }
    Ok(applied)
}

/// Drops the configured schema with everything in it (projections and the API's command log).
/// Development only: `just dev` calls it when it starts a new, empty broker.
pub async fn drop_schema(cfg: &DbConfig) -> Result<(), DbError> {
    let client = connect(cfg, &cfg.name).await?;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", cfg.schema))
        .await?;
    tracing::warn!(db.schema = %cfg.schema, "dropped schema");
    Ok(())
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<Vec<&'static str>, DbError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        let tx = client.transaction().await?;
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        tx.commit().await?;
        applied.push(m.name);
    }
    Ok(applied)
}

/// The `LISTEN`/`NOTIFY` channel on which the projector announces each committed batch (one per
/// schema, so deployments and tests sharing a database do not wake each other).
pub fn projection_channel(cfg: &DbConfig) -> String {
    let mut channel = format!("catalog_projected_{}", cfg.schema);
    channel.truncate(63);
    channel
}

/// A counter that moves every time the projector commits a batch in `cfg`'s schema, kept by one
/// dedicated `LISTEN` connection (not a pooled one), reconnected after any failure. While it is not
/// connected the counter still moves every `fallback`, so a waiter looks again at least that often.
pub fn projection_commits(
    cfg: &DbConfig,
    fallback: std::time::Duration,
) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let channel = projection_channel(&cfg);
        let bump =
            |tx: &tokio::sync::watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
        loop {
            if tx.is_closed() {
                return;
            }
            match listen(&cfg, &channel, &tx).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "projection notifications unavailable; read-your-writes polls instead");
                }
            }
            // Not listening: wake waiters on a timer until the connection is back.
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(fallback).await;
                bump(&tx);
            }
        }
    });
    rx
}

async fn listen(
    cfg: &DbConfig,
    channel: &str,
    tx: &tokio::sync::watch::Sender<u64>,
) -> Result<(), DbError> {
    use futures::StreamExt;
    let (client, mut connection) =
        tokio::time::timeout(cfg.timeout(), pg_config(cfg, &cfg.name).connect(NoTls))
            .await
            .map_err(|_| DbError::Timeout(format!("{}:{}", cfg.host, cfg.port)))??;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let sql = format!("LISTEN \"{channel}\"");
    let listening = client.batch_execute(&sql);
    tokio::pin!(listening);
    // The connection must be driven while LISTEN runs.
    loop {
        tokio::select! {
            done = &mut listening => { done?; break; }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
        }
    }
    // Anything committed before LISTEN took effect is not announced: wake waiters once.
    tx.send_modify(|n| *n = n.wrapping_add(1));
    while let Some(message) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notification(_) = message? {
            tx.send_modify(|n| *n = n.wrapping_add(1));
            if tx.is_closed() {
                return Ok(());
            }
        }
    }
    Err(DbError::Timeout("the LISTEN connection closed".into()))
}
