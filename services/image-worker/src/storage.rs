//! Where variants are stored: any `object_store` (S3 in production and tests, local files for
//! `just dev`), under content-addressed keys written with `PutMode::Create`, so a re-run writes nothing
//! new and the same source image is stored once however many products use it.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::job::Failure;
use crate::process::VariantSpec;

/// Image store settings. `Debug` leaves the credentials out.
#[derive(Clone, clap::Args)]
pub struct StoreConfig {
    /// `local` (files under IMAGE_LOCAL_DIR) or `s3`.
    #[arg(long = "image-store", env = "IMAGE_STORE", default_value = "local", value_parser = ["local", "s3"])]
    pub kind: String,
    /// Directory of the local store.
    #[arg(
        long = "image-local-dir",
        env = "IMAGE_LOCAL_DIR",
        default_value = ".run/images"
    )]
    pub local_dir: String,
    /// S3 bucket.
    #[arg(long = "s3-bucket", env = "S3_BUCKET", default_value = "images")]
    pub bucket: String,
    /// S3 region.
    #[arg(long = "s3-region", env = "S3_REGION", default_value = "us-east-1")]
    pub region: String,
    /// S3 endpoint for S3-compatible servers (empty: AWS).
    #[arg(long = "s3-endpoint", env = "S3_ENDPOINT", default_value = "")]
    pub endpoint: String,
    /// S3 access key id.
    #[arg(
        long = "s3-access-key-id",
        env = "AWS_ACCESS_KEY_ID",
        default_value = "",
        hide_env_values = true
    )]
    pub access_key_id: String,
    /// S3 secret access key. Never logged.
    #[arg(
        long = "s3-secret-access-key",
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub secret_access_key: String,
    /// Prefix of every key (tests use one each).
    #[arg(
        long = "image-key-prefix",
        env = "IMAGE_KEY_PREFIX",
        default_value = ""
    )]
    pub key_prefix: String,
    /// Base URL clients fetch variants from (default: the endpoint and bucket, or file:// for local).
    #[arg(
        long = "image-public-base-url",
        env = "IMAGE_PUBLIC_BASE_URL",
        default_value = ""
    )]
    pub public_base_url: String,
    /// Longest one store call may take, in milliseconds; then the image goes to the retry ladder.
    #[arg(
        long = "image-store-timeout-ms",
        env = "IMAGE_STORE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub store_timeout_ms: u64,
    /// How long the store is skipped after 3 failed or timed-out calls in a row (circuit open; jobs go
    /// to the retry ladder at once), in milliseconds.
    #[arg(
        long = "image-store-breaker-cool-down-ms",
        env = "IMAGE_STORE_BREAKER_COOL_DOWN_MS",
        default_value_t = 5_000
    )]
    pub store_breaker_cool_down_ms: u64,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("local_dir", &self.local_dir)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("key_prefix", &self.key_prefix)
            .field("public_base_url", &self.public_base_url)
            .field("store_timeout_ms", &self.store_timeout_ms)
            .finish_non_exhaustive()
    }
}

/// The image store.
#[derive(Clone)]
pub struct ImageStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    public_base: String,
    /// Whether objects carry HTTP attributes (S3 does; the local file store cannot).
    attributes: bool,
    timeout: std::time::Duration,
    breaker: Arc<platform::breaker::CircuitBreaker>,
}

impl ImageStore {
    /// Builds the configured store (creating the local directory if needed).
    pub fn new(cfg: &StoreConfig) -> Result<Self, object_store::Error> {
        let (store, default_base): (Arc<dyn ObjectStore>, String) = if cfg.kind == "s3" {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&cfg.bucket)
                .with_region(&cfg.region)
                .with_access_key_id(&cfg.access_key_id)
                .with_secret_access_key(&cfg.secret_access_key);
            let base = if cfg.endpoint.is_empty() {
                format!("https://{}.s3.{}.amazonaws.com", cfg.bucket, cfg.region)
            } else {
                builder = builder
                    .with_endpoint(&cfg.endpoint)
                    .with_allow_http(cfg.endpoint.starts_with("http://"));
                format!("{}/{}", cfg.endpoint.trim_end_matches('/'), cfg.bucket)
            };
            (Arc::new(builder.build()?), base)
        } else {
            std::fs::create_dir_all(&cfg.local_dir).map_err(|e| object_store::Error::Generic {
                store: "local",
                source: Box::new(e),
            })?;
            let dir = std::fs::canonicalize(&cfg.local_dir).map_err(|e| {
                object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                }
            })?;
            (
                Arc::new(LocalFileSystem::new_with_prefix(&dir)?),
                format!("file://{}", dir.display()),
            )
        };
        let public_base = if cfg.public_base_url.is_empty() {
            default_base
        } else {
            cfg.public_base_url.trim_end_matches('/').to_owned()
        };
        Ok(Self {
            store,
            prefix: cfg.key_prefix.clone(),
            public_base,
            attributes: cfg.kind == "s3",
            timeout: std::time::Duration::from_millis(cfg.store_timeout_ms),
            breaker: Arc::new(platform::breaker::CircuitBreaker::new(
                "image store",
                3,
                std::time::Duration::from_millis(cfg.store_breaker_cool_down_ms),
            )),
        })
    }

    /// The key of `spec` of the source whose SHA-256 is `source_hash` (hex).
    pub fn key(&self, source_hash: &str, spec: &VariantSpec) -> String {
        format!(
            "{}images/{}/{}/{}.{}",
            self.prefix,
            &source_hash[..2],
            source_hash,
            spec.settings_id(),
            spec.format.extension()
        )
    }

    /// Public URL of `key`.
    pub fn url(&self, key: &str) -> String {
        format!("{}/{}", self.public_base, key)
    }

    /// Runs one store call bounded by the timeout and guarded by the circuit breaker: while the
    /// store keeps failing, calls fail at once (retryable), so jobs go to the retry ladder instead of
    /// each waiting for its own timeout. `answered` says which outcomes count as the store answering.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, object_store::Error>>,
        answered: impl Fn(&Result<T, object_store::Error>) -> bool,
    ) -> Result<Result<T, object_store::Error>, Failure> {
        let Some(attempt) = self.breaker.attempt() else {
            return Err(Failure::retryable(
                "storage",
                "the image store is unavailable (skipped while its circuit is open)",
            ));
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => {
                attempt.record(answered(&result));
                Ok(result)
            }
            Err(_) => {
                attempt.record(false);
                Err(Failure::retryable(
                    "storage",
                    "the image store did not answer in time",
                ))
            }
        }
    }

    /// Size of the object at `key`, or `None` if there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, Failure> {
        let answered = |r: &Result<_, object_store::Error>| {
            matches!(r, Ok(_) | Err(object_store::Error::NotFound { .. }))
        };
        match self
            .guarded(self.store.head(&Path::from(key)), answered)
            .await?
        {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Failure::retryable("storage", format!("image store: {e}"))),
        }
    }

    /// Writes `bytes` at `key` unless an object is already there (then the existing one, which has the
    /// same content by construction, is kept). Returns whether this call wrote it.
    ///
    /// Objects are served with their `Content-Type` and `Cache-Control: public, max-age=31536000,
    /// immutable`: a key names its content (source hash and encoding settings), so it never changes.
    pub async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<bool, Failure> {
        let mut attributes = object_store::Attributes::new();
        if self.attributes {
            attributes.insert(
                object_store::Attribute::ContentType,
                platform::media::content_type_of(key).into(),
            );
            attributes.insert(
                object_store::Attribute::CacheControl,
                platform::media::IMMUTABLE.into(),
            );
        }
        let options = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..PutOptions::default()
        };
        let answered = |r: &Result<_, object_store::Error>| {
            matches!(r, Ok(_) | Err(object_store::Error::AlreadyExists { .. }))
        };
        let path = Path::from(key);
        let put = self.store.put_opts(&path, PutPayload::from(bytes), options);
        match self.guarded(put, answered).await? {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(Failure::retryable("storage", format!("image store: {e}"))),
        }
    }

    /// Every key under `prefix` (operators and tests).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, object_store::Error> {
        use futures::TryStreamExt;
        let prefix = Path::from(format!("{}{prefix}", self.prefix));
        self.store
            .list(Some(&prefix))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
    }

    /// The bytes at `key`, bounded by the store's timeout and guarded by its circuit breaker like
    /// every call a job makes (a store that hangs sends the job to the retry ladder).
    pub async fn read(&self, key: &str) -> Result<bytes::Bytes, Failure> {
        let answered = |r: &Result<_, object_store::Error>| {
            matches!(r, Ok(_) | Err(object_store::Error::NotFound { .. }))
        };
        let read = async { self.store.get(&Path::from(key)).await?.bytes().await };
        self.guarded(read, answered)
            .await?
            .map_err(|e| Failure::retryable("storage", format!("image store: {e}")))
    }

    /// The HTTP attributes stored with `key` (tests and operators).
    pub async fn attributes(
        &self,
        key: &str,
    ) -> Result<Vec<(String, String)>, object_store::Error> {
        let got = self.store.get(&Path::from(key)).await?;
        Ok(got
            .attributes
            .iter()
            .map(|(k, v)| (format!("{k:?}"), v.as_ref().to_owned()))
            .collect())
    }

    /// The bytes at `key` (tests and operators).
    pub async fn get(&self, key: &str) -> Result<bytes::Bytes, object_store::Error> {
        self.store.get(&Path::from(key)).await?.bytes().await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_secret_key_never_shows_in_debug_output() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            store: super::StoreConfig,
        }
        let cli = Cli::parse_from(["x", "--s3-secret-access-key", "hunter2"]);
        let shown = format!("{:?}", cli.store);
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
