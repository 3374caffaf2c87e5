-- Every applied product event, in stream order: a product's history, served by
-- GET /products/:id/events and folded for GET /products/:id?as_of_version=N. A projection like the
-- others (written by the projector in the batch transaction, rebuilt by replay).
CREATE TABLE product_events (
    aggregate_id uuid        NOT NULL,
    sequence     bigint      NOT NULL,
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    envelope     jsonb       NOT NULL,
    PRIMARY KEY (aggregate_id, sequence)
);
