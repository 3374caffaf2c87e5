-- Every image the worker parked on the dead-letter topic, indexed for `catalogctl dlq list|redrive`, so
-- they query by product or error class instead of reading the whole topic (which keeps every entry
-- forever and only grows). Written by the worker once the dead letter is acknowledged; entries parked
-- before this table existed are added by `catalogctl dlq reindex`.
CREATE TABLE pipeline_dead_letters (
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    product_id  uuid        NOT NULL,
    error_class text        NOT NULL,
    letter      jsonb       NOT NULL,
    headers     jsonb       NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, "offset")
);
CREATE INDEX pipeline_dead_letters_product ON pipeline_dead_letters (product_id);
CREATE INDEX pipeline_dead_letters_class ON pipeline_dead_letters (error_class, dead_at);
