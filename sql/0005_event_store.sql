-- The write side gets one authority over each stream's sequence (issue: products change).
--
-- Every writer (API commands, image results, re-drives) appends here, in one transaction with the
-- stream's head row locked (`stream_heads`, FOR UPDATE) and the version it expects checked, so two
-- writers can never pick the same sequence: the primary key refuses what the lock did not prevent.
-- Events reach Kafka from here in sequence order per stream (see platform::event_store); Kafka stays
-- the log every consumer, replay and downstream service reads.
CREATE TABLE event_store (
    aggregate_id   uuid        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence >= 1),
    event_id       uuid        NOT NULL UNIQUE,
    aggregate_type text        NOT NULL,
    -- The exact JSON envelope produced to Kafka.
    envelope       text        NOT NULL,
    -- `ce_source` of the writer.
    source         text        NOT NULL,
    -- The event this one answers (ImagesProcessed → its ImagesRequested): answered at most once.
    causation_id   uuid,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    PRIMARY KEY (aggregate_id, sequence)
);
CREATE UNIQUE INDEX event_store_answers ON event_store (causation_id) WHERE causation_id IS NOT NULL;
CREATE INDEX event_store_unpublished ON event_store (recorded_at) WHERE published_at IS NULL;

-- The current version and state (the reference fold's JSON) of every stream: what writers validate
-- against and lock. Never behind the store (updated in the same transaction).
CREATE TABLE stream_heads (
    aggregate_id   uuid   PRIMARY KEY,
    aggregate_type text   NOT NULL,
    version        bigint NOT NULL,
    state          jsonb  NOT NULL
);

-- Commands now keep only idempotency and the response; their events live in event_store.
ALTER TABLE api_commands ALTER COLUMN events SET DEFAULT '{}';
ALTER TABLE api_commands ADD COLUMN aggregate_id uuid;
UPDATE api_commands SET aggregate_id = id;

-- Deleted products stay in the projection (GET answers 410 with the time), out of every list.
ALTER TABLE products ADD COLUMN deleted_at timestamptz;

-- Backfill from what existed before: the events of commands still in the command log, and the heads
-- of projected streams (run with the projector caught up: a stream accepted but not yet projected has
-- its events here but no head, and cannot be edited).
INSERT INTO event_store (aggregate_id, sequence, event_id, aggregate_type, envelope, source,
                         recorded_at, published_at)
SELECT (e::jsonb->>'aggregate_id')::uuid, (e::jsonb->>'sequence')::bigint,
       (e::jsonb->>'event_id')::uuid, e::jsonb->>'aggregate_type', e, '/catalog/api',
       c.created_at, c.published_at
  FROM api_commands c, unnest(c.events) AS e
ON CONFLICT DO NOTHING;

INSERT INTO stream_heads (aggregate_id, aggregate_type, version, state)
SELECT id, 'product', version, jsonb_build_object(
           'id', id, 'user_id', user_id, 'product_name', product_name,
           'product_description', product_description, 'product_price', product_price::text,
           'product_currency', product_currency, 'product_images', to_jsonb(product_images),
           'images', images, 'compressed_product_images', compressed_product_images,
           'version', version, 'created_at', created_at, 'updated_at', updated_at)
  FROM products
ON CONFLICT DO NOTHING;

INSERT INTO stream_heads (aggregate_id, aggregate_type, version, state)
SELECT id, 'user', version, jsonb_build_object(
           'id', id, 'name', name, 'email', email, 'version', version,
           'created_at', created_at, 'updated_at', updated_at)
  FROM users
ON CONFLICT DO NOTHING;
