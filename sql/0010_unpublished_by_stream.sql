-- The events of one stream that are not yet in the log. Every publish of an edit asks for them (with
-- their rows locked) and used to find them through the primary key, i.e. by visiting every event the
-- stream ever had, published or not: the cost of an edit grew with its product's history (measured:
-- 1650 → 1080 PATCH/s over three runs reaching ≈ 250 edits per product; 1958 → 1917 with this index;
-- docs/BENCHMARKS.md). This index holds only the unpublished ones, a handful at most, so the lookup
-- costs the same on the thousandth edit as on the first. (Built in the migration's transaction: on a
-- large event store, create it CONCURRENTLY by hand first; `IF NOT EXISTS` then skips it here. A
-- CONCURRENTLY build that failed leaves an invalid index of this name: check `pg_index.indisvalid`.)
CREATE INDEX IF NOT EXISTS event_store_unpublished_by_stream
    ON event_store (aggregate_id, sequence) WHERE published_at IS NULL;
