-- Messages the image worker cannot read (a product event that claims to be ImagesRequested but is not
-- readable, a newer schema version, a garbled retry message): kept with the reason instead of being
-- dropped, then committed so the partition goes on. Operators inspect them and fix or re-publish.
CREATE TABLE pipeline_rejected (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    key         bytea,
    payload     bytea,
    reason      text        NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
