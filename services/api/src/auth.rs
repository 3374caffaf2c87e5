//! Who is calling, and how often: API keys, JWTs from an identity provider, admin keys, rate limits.
//!
//! - **API keys** (`cat_` + 64 hex digits, 256 random bits) are issued to users; PostgreSQL keeps only
//!   their SHA-256 digest (`api_keys`). A revoked key is refused by every API process from the moment
//!   its revocation is answered: reads and the other routes look the key up on every request; product
//!   commands ([`authenticate_writer`]) take a key this process has seen valid from memory and leave
//!   the check to the statement that records the command (`catalog_append_command_with_key`), which
//!   writes nothing for a revoked key, and look the key up before any answer that statement did not
//!   decide (a refusal, a replayed answer) — one round trip less for every write.
//! - **JWTs** (RS256, ES256, EdDSA) are checked against a JWKS document (`AUTH_JWKS_URL`: a URL or a
//!   file path; cached, fetched again when a token names an unknown `kid`), with `iss`, `aud`, `exp`
//!   and `nbf` checked; `sub` is the user id.
//! - **Admin keys** are configured as digests (`AUTH_ADMIN_KEY_DIGESTS`), compared in constant time;
//!   an admin may act on any product.
//! - **Rate limits**: a token bucket per credential, and per client address for calls without a valid
//!   credential; over the limit is `429` with `Retry-After`.
//!
//! Keys and tokens never reach a log line, an event, an error body or a `Debug` output: only key ids,
//! digests' prefixes and user ids do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use jsonwebtoken::jwk::JwkSet;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// Prefix of every API key this service issues.
pub const KEY_PREFIX: &str = "cat_";

/// Who may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadAccess {
    /// Anyone who can reach the API.
    Public,
    /// Callers with a valid credential.
    Authenticated,
}

/// Authentication and rate-limit settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// Who may read (`public` or `authenticated`); writes always need a credential.
    #[arg(
        long = "auth-reads",
        env = "AUTH_READS",
        value_enum,
        default_value = "public"
    )]
    pub reads: ReadAccess,
    /// JWKS document of an identity provider: an http(s) URL or a file path (empty: JWTs are refused).
    #[arg(long = "auth-jwks-url", env = "AUTH_JWKS_URL", default_value = "")]
    pub jwks_url: String,
    /// Required `iss` of JWTs (required when `AUTH_JWKS_URL` is set).
    #[arg(long = "auth-jwt-issuer", env = "AUTH_JWT_ISSUER", default_value = "")]
    pub jwt_issuer: String,
    /// Required `aud` of JWTs (required when `AUTH_JWKS_URL` is set).
    #[arg(
        long = "auth-jwt-audience",
        env = "AUTH_JWT_AUDIENCE",
        default_value = ""
    )]
    pub jwt_audience: String,
    /// SHA-256 digests (hex) of admin keys, comma separated; an admin may act on any product.
    #[arg(
        long = "auth-admin-key-digests",
        env = "AUTH_ADMIN_KEY_DIGESTS",
        default_value = "",
        value_delimiter = ','
    )]
    pub admin_key_digests: Vec<String>,
    /// Requests per second allowed per credential (sustained).
    #[arg(
        long = "auth-rate-per-sec",
        env = "AUTH_RATE_PER_SEC",
        default_value_t = 10_000.0
    )]
    pub rate_per_sec: f64,
    /// Requests a credential may make in a burst above the sustained rate.
    #[arg(
        long = "auth-rate-burst",
        env = "AUTH_RATE_BURST",
        default_value_t = 20_000.0
    )]
    pub rate_burst: f64,
    /// Requests per second allowed per client address without a valid credential.
    #[arg(
        long = "auth-anonymous-rate-per-sec",
        env = "AUTH_ANONYMOUS_RATE_PER_SEC",
        default_value_t = 100.0
    )]
    pub anonymous_rate_per_sec: f64,
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A user, by an API key (its id) or a JWT (`sub`).
    User {
        /// The user.
        user_id: Uuid,
        /// Which credential (for rate limits): `key:<id>` or `jwt:<sub>`.
        credential: String,
    },
    /// An operator with an admin key.
    Admin {
        /// First 12 hex digits of the key's digest.
        key_id: String,
    },
}

impl Caller {
    /// The `actor` recorded on the events this caller causes.
    pub fn actor(&self) -> String {
        match self {
            Caller::User { user_id, .. } => user_id.to_string(),
            Caller::Admin { key_id } => format!("admin:{key_id}"),
        }
    }

    /// Whether this caller may act on what `owner` owns.
    pub fn may_act_for(&self, owner: Uuid) -> bool {
        match self {
            Caller::User { user_id, .. } => *user_id == owner,
            Caller::Admin { .. } => true,
        }
    }

    /// The user, if the caller is one.
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Caller::User { user_id, .. } => Some(*user_id),
            Caller::Admin { .. } => None,
        }
    }

    fn credential(&self) -> String {
        match self {
            Caller::User { credential, .. } => credential.clone(),
            Caller::Admin { key_id } => format!("admin:{key_id}"),
        }
    }
}

/// A freshly issued API key: shown once, stored as its digest.
pub struct IssuedKey {
    /// The key's id.
    pub id: Uuid,
    /// The key itself (`cat_…`).
    pub secret: String,
    /// Its SHA-256 digest.
    pub digest: Vec<u8>,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Issues a new key: 256 random bits from the operating system.
pub fn issue_key() -> Result<IssuedKey, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::Internal(format!("no randomness for a key: {e}")))?;
    let secret = format!("{KEY_PREFIX}{}", hex(&bytes));
    Ok(IssuedKey {
        id: Uuid::now_v7(),
        digest: Sha256::digest(secret.as_bytes()).to_vec(),
        secret,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time equality of two digests.
fn same_digest(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authenticator every request that needs a caller goes through.
pub struct Authenticator {
    config: AuthConfig,
    admin_digests: Vec<Vec<u8>>,
    jwks: Mutex<Option<(JwkSet, Instant)>>,
    http: reqwest::Client,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// API keys seen valid, by digest: key id, user id, when last confirmed in the database.
    keys: Mutex<HashMap<[u8; 32], (Uuid, Uuid, Instant)>>,
}

/// How many API keys a process remembers (more: the oldest half is forgotten).
const REMEMBERED_KEYS: usize = 50_000;
/// How long a remembered key is taken without a lookup. Correctness does not depend on it (the write
/// checks the key by id); it bounds how long a key row whose user was changed by hand would still be
/// taken with its old user.
const KEY_MEMORY: Duration = Duration::from_secs(600);

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("reads", &self.config.reads)
            .field("admin_keys", &self.admin_digests.len())
            .finish_non_exhaustive()
    }
}

/// The least time between two fetches of the JWKS document (an unknown `kid` triggers one).
const JWKS_REFETCH: Duration = Duration::from_secs(10);

impl Authenticator {
    /// An authenticator for `config`; fails naming the variable that is wrong.
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let admin_digests = config
            .admin_key_digests
            .iter()
            .filter(|d| !d.trim().is_empty())
            .map(|d| parse_hex(d.trim()).filter(|b| b.len() == 32))
            .collect::<Option<Vec<_>>>()
            .ok_or(
                "AUTH_ADMIN_KEY_DIGESTS: each entry must be a SHA-256 digest in hex (64 digits)",
            )?;
        if !config.jwks_url.is_empty()
            && (config.jwt_issuer.is_empty() || config.jwt_audience.is_empty())
        {
            return Err(
                "AUTH_JWT_ISSUER and AUTH_JWT_AUDIENCE must be set when AUTH_JWKS_URL is".into(),
            );
        }
        if config.rate_per_sec <= 0.0
            || config.rate_burst < 1.0
            || config.anonymous_rate_per_sec <= 0.0
        {
            return Err("AUTH_RATE_PER_SEC, AUTH_RATE_BURST and AUTH_ANONYMOUS_RATE_PER_SEC must be positive".into());
        }
        Ok(Self {
            config: config.clone(),
            admin_digests,
            jwks: Mutex::new(None),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| format!("AUTH_JWKS_URL client: {e}"))?,
            buckets: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        })
    }

    fn remembered(&self, digest: &[u8; 32]) -> Option<(Uuid, Uuid)> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(digest)
            .filter(|(_, _, at)| at.elapsed() < KEY_MEMORY)
            .map(|(key_id, user_id, _)| (*key_id, *user_id))
    }

    fn remember(&self, digest: [u8; 32], key_id: Uuid, user_id: Uuid) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= REMEMBERED_KEYS {
            let mut ages: Vec<Instant> = keys.values().map(|(_, _, at)| *at).collect();
            let (_, median, _) = ages.select_nth_unstable(REMEMBERED_KEYS / 2);
            let median = *median;
            keys.retain(|_, (_, _, at)| *at > median);
        }
        keys.insert(digest, (key_id, user_id, Instant::now()));
    }

    /// Forgets a key found revoked.
    fn forget(&self, digest: &[u8; 32]) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
    }

    /// Whether reads need a credential.
    pub fn reads_need_credentials(&self) -> bool {
        self.config.reads == ReadAccess::Authenticated
    }

    /// Takes one token from `key`'s bucket; `Err(seconds until one is there)` when it is empty.
    fn take(&self, key: &str, per_sec: f64, burst: f64) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            // Bounded memory: forget idle buckets (full ones are as good as new).
            buckets.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
        }
        let now = Instant::now();
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / per_sec).ceil().max(1.0) as u64)
        }
    }

    fn limit_anonymous(&self, client: Option<IpAddr>) -> Result<(), ApiError> {
        let key = format!(
            "addr:{}",
            client.map_or("unknown".into(), |a| a.to_string())
        );
        let per_sec = self.config.anonymous_rate_per_sec;
        self.take(&key, per_sec, per_sec.max(1.0))
            .map_err(|retry_after| ApiError::RateLimited { retry_after })
    }
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Identifies the caller of a request (401 without a valid credential) and counts it against its rate
/// limit (429).
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let auth = &state.auth;
    let Some(token) = bearer(headers) else {
        auth.limit_anonymous(client)?;
        return Err(ApiError::Unauthenticated);
    };
    let caller = match identify(state, token).await? {
        Some(caller) => caller,
        None => {
            auth.limit_anonymous(client)?;
            return Err(ApiError::Unauthenticated);
        }
    };
    auth.take(
        &caller.credential(),
        auth.config.rate_per_sec,
        auth.config.rate_burst,
    )
    .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
    Ok(caller)
}

/// The caller of a product command. Its API key may have been taken from this process's memory:
/// then the command's statement checks it (see [`KeyCheck`]), or [`Writer::settle`] looks it up.
pub struct Writer {
    caller: Caller,
    check: Option<Arc<KeyCheck>>,
}

/// An API key taken from memory, still to be confirmed not revoked: by the statement that records the
/// command ([`KeyCheck::confirmed`] is then called) or by a lookup.
pub struct KeyCheck {
    key_id: Uuid,
    digest: [u8; 32],
    confirmed: AtomicBool,
}

impl std::fmt::Debug for KeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCheck")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KeyCheck {
    /// The key's id, for the statement to check.
    pub fn key_id(&self) -> Uuid {
        self.key_id
    }

    /// The database confirmed the key while recording the command.
    pub fn confirmed(&self) {
        self.confirmed.store(true, Ordering::Release);
    }

    /// The database found the key revoked: forget it, so the next request looks it up.
    pub fn revoked(&self, state: &AppState) {
        state.auth.forget(&self.digest);
    }
}

impl Writer {
    /// Who is calling.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The key the command's statement must check, if it came from memory.
    pub fn key_check(&self) -> Option<Arc<KeyCheck>> {
        self.check.clone()
    }

    /// The command's answer, unless its key came from memory, no statement confirmed it, and it is
    /// revoked: then `401` (the key is looked up; a refusal or a replayed answer must not reach a
    /// revoked key either).
    pub async fn settle<T>(
        &self,
        state: &AppState,
        answer: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let Some(check) = &self.check else {
            return answer;
        };
        if check.confirmed.load(Ordering::Acquire)
            || matches!(answer, Err(ApiError::Unauthenticated))
        {
            return answer;
        }
        match look_up_key(state, &check.digest).await? {
            Some(_) => answer,
            None => {
                check.revoked(state);
                Err(ApiError::Unauthenticated)
            }
        }
    }
}

/// [`authenticate`] for a product command: an API key this process has seen valid is taken from memory
/// (its check is left to the command; see [`Writer`]).
pub async fn authenticate_writer(
    state: &AppState,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Writer, ApiError> {
    let auth = &state.auth;
    if let Some(token) = bearer(headers).filter(|t| t.starts_with(KEY_PREFIX)) {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((key_id, user_id)) = auth.remembered(&digest) {
            let caller = Caller::User {
                user_id,
                credential: format!("key:{key_id}"),
            };
            if let Err(retry_after) = auth.take(
                &caller.credential(),
                auth.config.rate_per_sec,
                auth.config.rate_burst,
            ) {
                // Over its rate: a revoked key is told 401 (as an anonymous caller), not 429.
                if look_up_key(state, &digest).await?.is_none() {
                    auth.forget(&digest);
                    auth.limit_anonymous(client)?;
                    return Err(ApiError::Unauthenticated);
                }
                return Err(ApiError::RateLimited { retry_after });
            }
            return Ok(Writer {
                caller,
                check: Some(Arc::new(KeyCheck {
                    key_id,
                    digest,
                    confirmed: AtomicBool::new(false),
                })),
            });
        }
    }
    Ok(Writer {
        caller: authenticate(state, headers, client).await?,
        check: None,
    })
}

/// The key with this digest, if it is not revoked (its id and user), remembered for commands.
async fn look_up_key(
    state: &AppState,
    digest: &[u8; 32],
) -> Result<Option<(Uuid, Uuid)>, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT id, user_id FROM api_keys WHERE digest = $1 AND revoked_at IS NULL",
                )
                .await?,
            &[&digest.as_slice()],
        )
        .await?;
    let found = row.map(|r| (r.get::<_, Uuid>(0), r.get::<_, Uuid>(1)));
    if let Some((key_id, user_id)) = found {
        state.auth.remember(*digest, key_id, user_id);
    }
    metrics::counter!(
        "api_key_lookups_total",
        "result" => if found.is_some() { "valid" } else { "refused" }
    )
    .increment(1);
    Ok(found)
}

async fn identify(state: &AppState, token: &str) -> Result<Option<Caller>, ApiError> {
    let auth = &state.auth;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if let Some(admin) = auth.admin_digests.iter().find(|d| same_digest(d, &digest)) {
        return Ok(Some(Caller::Admin {
            key_id: hex(&admin[..6]),
        }));
    }
    if token.starts_with(KEY_PREFIX) {
        return Ok(look_up_key(state, &digest)
            .await?
            .map(|(key_id, user_id)| Caller::User {
                user_id,
                credential: format!("key:{key_id}"),
            }));
    }
    if auth.config.jwks_url.is_empty() || token.split('.').count() != 3 {
        return Ok(None);
    }
    Ok(verify_jwt(auth, token).await)
}

/// The claims the API reads from a JWT.
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

async fn verify_jwt(auth: &Authenticator, token: &str) -> Option<Caller> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let header = jsonwebtoken::decode_header(token).ok()?;
    if !matches!(
        header.alg,
        Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
    ) {
        return None;
    }
    let kid = header.kid?;
    let jwk = match auth.key(&kid, false).await {
        Some(jwk) => jwk,
        None => auth.key(&kid, true).await?,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&auth.config.jwt_issuer]);
    validation.set_audience(&[&auth.config.jwt_audience]);
    validation.validate_nbf = true;
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .inspect_err(|e| tracing::info!(error = %e, "JWT refused"))
        .ok()?;
    let user_id = Uuid::parse_str(&data.claims.sub).ok()?;
    Some(Caller::User {
        user_id,
        credential: format!("jwt:{user_id}"),
    })
}

impl Authenticator {
    /// The key `kid` of the JWKS document, fetching the document when there is none yet or, with
    /// `refresh`, when the last fetch is older than [`JWKS_REFETCH`].
    async fn key(&self, kid: &str, refresh: bool) -> Option<jsonwebtoken::jwk::Jwk> {
        let cached = {
            let guard = self.jwks.lock().unwrap_or_else(|e| e.into_inner());
            guard.clone()
        };
        let stale = match &cached {
            None => true,
            Some((_, at)) => refresh && at.elapsed() >= JWKS_REFETCH,
        };
        let set = if stale {
            match self.fetch_jwks().await {
                Ok(set) => {
                    *self.jwks.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((set.clone(), Instant::now()));
                    set
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the JWKS document");
                    cached?.0
                }
            }
        } else {
            cached?.0
        };
        set.find(kid).cloned()
    }

    async fn fetch_jwks(&self) -> Result<JwkSet, String> {
        let source = &self.config.jwks_url;
        let text = if source.starts_with("http://") || source.starts_with("https://") {
            self.http
                .get(source)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?
        } else {
            tokio::fs::read_to_string(source)
                .await
                .map_err(|e| e.to_string())?
        };
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The SHA-256 digest (hex) of a key, for `AUTH_ADMIN_KEY_DIGESTS`.
pub fn digest_hex(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authenticator with the default settings.
    fn default_authenticator() -> Authenticator {
        let config = <AuthConfig as clap::FromArgMatches>::from_arg_matches(
            &<AuthConfig as clap::Args>::augment_args(clap::Command::new("x"))
                .get_matches_from(["x"]),
        )
        .unwrap();
        Authenticator::new(&config).unwrap()
    }

    #[test]
    fn keys_are_prefixed_256_bit_and_never_shown_by_debug() {
        let key = issue_key().unwrap();
        assert!(key.secret.starts_with(KEY_PREFIX));
        assert_eq!(key.secret.len(), KEY_PREFIX.len() + 64);
        assert!(!format!("{key:?}").contains(&key.secret));
        assert_ne!(issue_key().unwrap().secret, key.secret);
        assert_eq!(digest_hex(&key.secret), hex(&key.digest));
    }

    #[test]
    fn digests_compare_whole() {
        assert!(same_digest(&[1, 2, 3], &[1, 2, 3]));
        assert!(!same_digest(&[1, 2, 3], &[1, 2, 4]));
        assert!(!same_digest(&[1, 2], &[1, 2, 3]));
        assert_eq!(parse_hex("0aff"), Some(vec![10, 255]));
        assert_eq!(parse_hex("0g"), None);
    }

    #[test]
    fn remembered_keys_are_forgotten_when_revoked_and_bounded_in_number() {
        let auth = default_authenticator();
        let (key, user) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(auth.remembered(&[1; 32]), None);
        auth.remember([1; 32], key, user);
        assert_eq!(auth.remembered(&[1; 32]), Some((key, user)));
        auth.forget(&[1; 32]);
        assert_eq!(auth.remembered(&[1; 32]), None);
        for i in 0..=REMEMBERED_KEYS as u32 {
            let mut digest = [0; 32];
            digest[..4].copy_from_slice(&i.to_be_bytes());
            auth.remember(digest, key, user);
        }
        let kept = auth.keys.lock().unwrap().len();
        assert!(kept <= REMEMBERED_KEYS, "{kept}");
        let mut newest = [0; 32];
        newest[..4].copy_from_slice(&(REMEMBERED_KEYS as u32).to_be_bytes());
        assert_eq!(
            auth.remembered(&newest),
            Some((key, user)),
            "the newest stays"
        );
    }

    #[test]
    fn buckets_refill_at_the_configured_rate() {
        let auth = default_authenticator();
        assert!(auth.take("k", 1.0, 2.0).is_ok());
        assert!(auth.take("k", 1.0, 2.0).is_ok());
        assert_eq!(auth.take("k", 1.0, 2.0), Err(1));
        assert!(auth.take("other", 1.0, 2.0).is_ok(), "buckets are per key");
    }
}

/// The client's address (from the connection), for the per-address rate limit of anonymous calls.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}
