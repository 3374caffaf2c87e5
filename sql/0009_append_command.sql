-- A command in one round trip. The API used to hold the stream's head locked across five statements
-- (BEGIN, SELECT … FOR UPDATE, INSERT the command, append, COMMIT) while it decided; now it reads the
-- head without a lock, decides, and calls this function, which does the rest as one statement (one
-- implicit transaction): record the command (idempotency), move the head from the version the decision
-- was made on (compare-and-set; 0 creates the stream) and append the events. The order of every
-- stream is still decided in exactly one place — the head row — so nothing about who may write what
-- changes; a writer whose head moved meanwhile is told so and decides again on the new head.
--
-- Returns 'appended', or 'duplicate' when the (route, idempotency key) was already used (nothing is
-- written). A head that is not at p_expected raises SQLSTATE CA409 and nothing is written (the insert
-- of the command is undone with the rest).
CREATE FUNCTION catalog_append_command(
    p_command_id uuid,
    p_route text,
    p_key text,
    p_request_hash bytea,
    p_response jsonb,
    p_aggregate_id uuid,
    p_aggregate_type text,
    p_expected bigint,
    p_state jsonb,
    p_source text,
    p_sequences bigint[],
    p_event_ids uuid[],
    p_envelopes text[]
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    new_version bigint := p_expected + coalesce(array_length(p_sequences, 1), 0);
BEGIN
    INSERT INTO api_commands (id, route, idempotency_key, request_hash, response, aggregate_id)
    VALUES (p_command_id, p_route, p_key, p_request_hash, p_response, p_aggregate_id)
    ON CONFLICT (route, idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'duplicate';
    END IF;
    IF new_version = p_expected THEN
        -- A command that changes nothing is recorded (its answer replays) and appends nothing, if
        -- the head is still the one it was decided on (else its answer would describe an old state).
        PERFORM 1 FROM stream_heads WHERE aggregate_id = p_aggregate_id AND version = p_expected;
        IF NOT FOUND AND p_expected > 0 THEN
            RAISE EXCEPTION 'stream % is not at version %', p_aggregate_id, p_expected
                USING ERRCODE = 'CA409';
        END IF;
        RETURN 'appended';
    END IF;
    IF p_expected = 0 THEN
        INSERT INTO stream_heads (aggregate_id, aggregate_type, version, state)
        VALUES (p_aggregate_id, p_aggregate_type, new_version, p_state)
        ON CONFLICT DO NOTHING;
    ELSE
        UPDATE stream_heads SET version = new_version, state = p_state
         WHERE aggregate_id = p_aggregate_id AND version = p_expected;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'stream % is not at version %', p_aggregate_id, p_expected
            USING ERRCODE = 'CA409';
    END IF;
    INSERT INTO event_store (aggregate_id, sequence, event_id, aggregate_type, envelope, source)
    SELECT p_aggregate_id, s, i, p_aggregate_type, e, p_source
      FROM unnest(p_sequences, p_event_ids, p_envelopes) AS t(s, i, e);
    RETURN 'appended';
END
$$;
