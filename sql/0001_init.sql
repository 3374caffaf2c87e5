-- The catalog's PostgreSQL schema, version 1.
--
-- Two kinds of table live here:
--   * projections (users, products and their bookkeeping): rebuilt from the Kafka log by replay, written
--     only by the projector;
--   * the API's command log (api_commands): idempotency keys and the outbox of events a command must
--     append; owned by the API, not a projection.
-- Unqualified names: the migrator sets search_path to the configured schema.

-- Users, as projected from UserRegistered.
CREATE TABLE users (
    id          uuid PRIMARY KEY,
    name        text        NOT NULL,
    email       text        NOT NULL,
    version     bigint      NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
-- E-mail uniqueness is checked by the API against this index (best effort, see README).
CREATE INDEX users_email_lower ON users (lower(email));

-- Products, as projected from the product stream. One row holds everything GET /products/:id returns.
CREATE TABLE products (
    id                        uuid PRIMARY KEY,
    user_id                   uuid          NOT NULL,
    product_name              text          NOT NULL,
    product_description       text          NOT NULL,
    product_price             numeric(12,2) NOT NULL CHECK (product_price >= 0),
    product_images            text[]        NOT NULL,
    -- One object per source image: {"position", "url", "status": pending|ready|failed, "reason"}.
    images                    jsonb         NOT NULL DEFAULT '[]',
    -- One object per stored variant (filled by the image pipeline).
    compressed_product_images jsonb         NOT NULL DEFAULT '[]',
    -- Sequence of the last event applied to this row.
    version                   bigint        NOT NULL,
    created_at                timestamptz   NOT NULL,
    updated_at                timestamptz   NOT NULL
);
CREATE INDEX products_by_user ON products (user_id, created_at, id);

-- Per consumer, the next offset to read of every partition it has applied. Written in the same
-- transaction as the rows, so rows and position can never disagree.
CREATE TABLE projection_offsets (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- Events that arrived before the event preceding them in their stream; applied as soon as it arrives.
CREATE TABLE projection_parked_events (
    aggregate_id uuid        NOT NULL,
    sequence     bigint      NOT NULL,
    envelope     jsonb       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_id, sequence)
);

-- Messages the projector could not read or apply, kept for an operator instead of dropped.
CREATE TABLE projection_rejected (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    key         bytea,
    payload     bytea,
    reason      text        NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition, "offset")
);

-- The API's command log: one row per accepted command.
--   * Idempotency: a retry with the same (route, idempotency_key) is answered from `response`.
--   * Outbox: `events` are the exact JSON envelopes the command appends, in order. `published_at` is set
--     once the broker acknowledged all of them; the outbox relay re-sends rows left unpublished (the API
--     died between appends), and consumers ignore what they already applied.
CREATE TABLE api_commands (
    id              uuid        PRIMARY KEY,
    route           text        NOT NULL,
    idempotency_key text,
    request_hash    bytea       NOT NULL,
    events          text[]      NOT NULL,
    response        jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    UNIQUE (route, idempotency_key)
);
CREATE INDEX api_commands_unpublished ON api_commands (created_at) WHERE published_at IS NULL;
CREATE INDEX api_commands_published ON api_commands (published_at) WHERE published_at IS NOT NULL;

-- E-mail addresses claimed by accepted POST /users commands (lower-cased), owned by the API. The unique
-- key makes "one user per e-mail" exact even for concurrent requests, before any event is projected.
CREATE TABLE api_user_emails (
    email_lower text PRIMARY KEY,
    user_id     uuid NOT NULL
);
