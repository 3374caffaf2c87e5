-- Credentials of users (issue: who may change what). Only a SHA-256 digest of each key is kept; the key
-- itself is shown once, when it is issued. A revoked key stays (revoked_at set) so its id keeps meaning.
CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    digest     bytea       NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_by_user ON api_keys (user_id);
