-- mailgate ledger 0005: one round trip to start a batch's transaction.
-- Takes the batch's advisory locks (sorted by the caller, as ledger_lock_keys) and then
-- claims its event ids, returning those claimed now (the facts new to the ledger).
CREATE FUNCTION ledger_lock_and_claim(keys bigint[], ids text[]) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    k bigint;
BEGIN
    FOREACH k IN ARRAY keys LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
    RETURN QUERY
        WITH claimed AS (
            INSERT INTO event_ids (event_id) SELECT unnest(ids)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id
        )
        SELECT event_id FROM claimed;
END
$$;

-- A message row is updated several times after its insert (sent, delivered, opened...):
-- free room in each page lets those status updates be HOT (no new entry in any of the
-- seven indexes of messages). New monthly partitions of messages get the same fillfactor.
CREATE OR REPLACE FUNCTION ledger_create_month_partition(parent text, month date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    next_day date := (date_trunc('month', month) + interval '1 month')::date;
    lo_ts timestamptz := first_day::timestamp AT TIME ZONE 'UTC';
    hi_ts timestamptz := next_day::timestamp AT TIME ZONE 'UTC';
    part text := parent || '_y' || to_char(first_day, 'YYYY') || 'm' || to_char(first_day, 'MM');
    key text;
    lo text;
    hi text;
    storage text := '';
BEGIN
    IF parent = 'messages' THEN
        key := 'mailgate_id';
        lo := ledger_ulid_prefix(lo_ts);
        hi := ledger_ulid_prefix(hi_ts);
        storage := ' WITH (fillfactor = 70)';
    ELSIF parent = 'events' THEN
        key := 'recorded_at';
        lo := to_char(lo_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
        hi := to_char(hi_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
    ELSE
        RAISE EXCEPTION 'not a partitioned ledger table: %', parent;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
               WHERE c.relname = part AND i.inhparent = parent::regclass) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part, parent) || storage;
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved',
                   parent || '_default', key, lo, key, hi, part);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    RETURN part;
END
$$;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'messages'::regclass LOOP
        EXECUTE format('ALTER TABLE %I SET (fillfactor = 70)', r.relname);
    END LOOP;
END
$$;
