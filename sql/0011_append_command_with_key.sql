-- A command whose caller's API key is checked by the write itself. The API remembers the keys it has
-- seen (digest → key id and user) instead of reading `api_keys` before every command; what keeps the
-- promise that a revoked key is refused from the moment its revocation is answered is this check, made
-- in the same statement that records the command: a key revoked before the statement starts writes
-- nothing (SQLSTATE CA401). Commands that end without writing (a refusal, a replayed answer) look the
-- key up instead, in the API.
--
-- The 13-argument function of 0009 stays as it was, for API processes of the previous release during a
-- rolling upgrade.
CREATE FUNCTION catalog_append_command_with_key(
    p_api_key uuid,
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
BEGIN
    IF p_api_key IS NOT NULL THEN
        PERFORM 1 FROM api_keys WHERE id = p_api_key AND revoked_at IS NULL;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'API key % is revoked', p_api_key USING ERRCODE = 'CA401';
        END IF;
    END IF;
    RETURN catalog_append_command(p_command_id, p_route, p_key, p_request_hash, p_response,
        p_aggregate_id, p_aggregate_type, p_expected, p_state, p_source, p_sequences, p_event_ids,
        p_envelopes);
END
$$;
