-- mailgate ledger 0002: messages and events partitioned by month, event ids kept apart for
-- idempotency, dead letters. See docs/adr/0006-ledger-partitioning.md.
--
-- * messages: PARTITION BY RANGE (mailgate_id). A mailgate id is a ULID whose first ten
--   characters encode its creation time, so a month is a range of ids and the primary key
--   (mailgate_id) is also the partition key: uniqueness and ON CONFLICT keep working, and a
--   lookup by id reads one partition. COLLATE "C" makes text order byte order (ULID order).
-- * events: PARTITION BY RANGE (recorded_at), the ledger's own clock. Event ids come from
--   several sources (ULIDs, Postal's webhook uuids), so their uniqueness is enforced by
--   event_ids, a narrow table outside the partitions (primary key = the idempotency key).
-- * Retention drops whole monthly partitions (ledger_drop_partitions); only event_ids, the
--   small dead_letters table and the default partitions are pruned row by row.
-- Existing rows are copied into the new tables, so a 0001 database keeps its history.

-- ULID <-> time, matching mailgate_core.ids (Crockford base32, 48-bit milliseconds).
CREATE FUNCTION ledger_ulid_prefix(ts timestamptz) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    ms bigint := floor(extract(epoch FROM ts) * 1000)::bigint;
    out text := '';
BEGIN
    IF ms < 0 THEN
        ms := 0;
    END IF;
    FOR i IN 1..10 LOOP
        out := substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', (ms % 32)::int + 1, 1) || out;
        ms := ms / 32;
    END LOOP;
    RETURN out;
END
$$;

CREATE FUNCTION ledger_ulid_time(id text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    ms bigint := 0;
    digit int;
BEGIN
    IF length(id) <> 26 THEN
        RETURN NULL;
    END IF;
    FOR i IN 1..10 LOOP
        digit := strpos('0123456789ABCDEFGHJKMNPQRSTVWXYZ', upper(substr(id, i, 1))) - 1;
        IF digit < 0 THEN
            RETURN NULL;
        END IF;
        ms := ms * 32 + digit;
    END LOOP;
    RETURN to_timestamp(ms / 1000.0);
END
$$;

-- The partition of `parent` ('messages' or 'events') for the month of `month` (UTC), created
-- when missing. Rows of that month already in the default partition move into it. Returns
-- the new partition's name, or NULL when it existed. Identifiers and bounds come from the
-- date only and are quoted with format(%I, %L).
CREATE FUNCTION ledger_create_month_partition(parent text, month date) RETURNS text
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
BEGIN
    IF parent = 'messages' THEN
        key := 'mailgate_id';
        lo := ledger_ulid_prefix(lo_ts);
        hi := ledger_ulid_prefix(hi_ts);
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
                   part, parent);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved',
                   parent || '_default', key, lo, key, hi, part);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    RETURN part;
END
$$;

-- Both tables' partitions for every month given; returns the partitions created.
CREATE FUNCTION ledger_ensure_partitions(months date[]) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    m date;
    created text;
BEGIN
    PERFORM pg_advisory_xact_lock(7170747261727469);  -- one partition manager at a time
    FOREACH m IN ARRAY months LOOP
        FOREACH created IN ARRAY ARRAY[ledger_create_month_partition('messages', m),
                                       ledger_create_month_partition('events', m)] LOOP
            IF created IS NOT NULL THEN
                RETURN NEXT created;
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- Detach and drop every monthly partition whose whole month ends at or before `cutoff`.
CREATE FUNCTION ledger_drop_partitions(cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    month date;
BEGIN
    PERFORM pg_advisory_xact_lock(7170747261727469);
    FOR r IN
        SELECT c.relname AS part, p.relname AS parent
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE i.inhparent IN ('messages'::regclass, 'events'::regclass)
          AND c.relname ~ '^(messages|events)_y[0-9]{4}m[0-9]{2}$'
        ORDER BY c.relname
    LOOP
        month := to_date(right(r.part, 7), 'YYYY"m"MM');
        IF ((month + interval '1 month')::timestamp AT TIME ZONE 'UTC') <= cutoff THEN
            EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', r.parent, r.part);
            EXECUTE format('DROP TABLE %I', r.part);
            RETURN NEXT r.part;
        END IF;
    END LOOP;
END
$$;

-- Move the 0001 tables aside (their constraint and index names are reused below).
ALTER TABLE messages RENAME TO messages_0001;
ALTER TABLE messages_0001 RENAME CONSTRAINT messages_pkey TO messages_0001_pkey;
ALTER TABLE events RENAME TO events_0001;
ALTER TABLE events_0001 RENAME CONSTRAINT events_pkey TO events_0001_pkey;
DROP INDEX messages_external_id, messages_campaign_id, messages_postal_id, messages_recipient,
    messages_accepted_at, events_mailgate_id, events_pending_postal_id, events_recorded_at;

CREATE TABLE messages (
    mailgate_id  text COLLATE "C" NOT NULL,
    external_id  text,
    campaign_id  text,
    postal_id    bigint,
    postal_token text,
    account_id   text NOT NULL,
    recipient    text NOT NULL,
    sender       text,
    subject      text,
    size         integer,
    status       text NOT NULL DEFAULT 'accepted',
    status_rank  integer NOT NULL DEFAULT 0,
    accepted_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailgate_id)
) PARTITION BY RANGE (mailgate_id);
-- Ids that are not ULIDs of a month with a partition (none in normal operation).
CREATE TABLE messages_default PARTITION OF messages DEFAULT;
-- Search indexes end with mailgate_id: keyset pages (newest first) read them in order.
CREATE INDEX messages_external_id ON messages (external_id, mailgate_id);
CREATE INDEX messages_recipient ON messages (lower(recipient), mailgate_id);
CREATE INDEX messages_campaign_id ON messages (campaign_id, mailgate_id);
CREATE INDEX messages_account_id ON messages (account_id, mailgate_id);
CREATE INDEX messages_postal_id ON messages (postal_id);
CREATE INDEX messages_postal_token ON messages (postal_token);

-- One row per fact consumed, written once: the idempotency key of the whole ledger.
CREATE TABLE event_ids (
    event_id    text PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_ids_recorded_at ON event_ids USING brin (recorded_at);

-- campaign_id is copied from the message when the fact's customer event is emitted, so
-- campaign statistics read events alone.
CREATE TABLE events (
    event_id       text NOT NULL,
    mailgate_id    text COLLATE "C",
    postal_id      bigint,
    campaign_id    text,
    subject        text NOT NULL,
    name           text NOT NULL,
    status_name    text,
    status_data    jsonb,
    status_pending boolean NOT NULL DEFAULT false,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    data           jsonb NOT NULL,
    PRIMARY KEY (event_id, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE INDEX events_mailgate_id ON events (mailgate_id, occurred_at);
CREATE INDEX events_pending ON events (mailgate_id) WHERE status_pending;
CREATE INDEX events_pending_postal_id ON events (postal_id)
    WHERE status_pending AND mailgate_id IS NULL;
CREATE INDEX events_campaign ON events (campaign_id, status_name) WHERE campaign_id IS NOT NULL;

-- Status events ams-reporter could not deliver to an endpoint (mail.webhook_dead_lettered).
CREATE TABLE dead_letters (
    id              text COLLATE "C" PRIMARY KEY,
    event_id        text NOT NULL UNIQUE,
    status_event_id text NOT NULL,
    status_name     text NOT NULL,
    mailgate_id     text COLLATE "C",
    account_id      text NOT NULL,
    endpoint_id     text NOT NULL,
    url             text NOT NULL DEFAULT '',
    attempts        integer NOT NULL DEFAULT 0,
    reason          text NOT NULL DEFAULT '',
    http_status     integer,
    payload         bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    replay_count    integer NOT NULL DEFAULT 0,
    replayed_at     timestamptz
);
CREATE INDEX dead_letters_account ON dead_letters (account_id, id);
CREATE INDEX dead_letters_endpoint ON dead_letters (endpoint_id, id);
CREATE INDEX dead_letters_mailgate_id ON dead_letters (mailgate_id);
CREATE INDEX dead_letters_created_at ON dead_letters (created_at);

-- Lets a bulk import find the rows it changed when it writes them to the KV bucket.
ALTER TABLE suppressions ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Partitions for every month that has data, and for this month and the next two.
SELECT count(*) FROM ledger_ensure_partitions(ARRAY(
    SELECT DISTINCT date_trunc('month', ledger_ulid_time(mailgate_id) AT TIME ZONE 'UTC')::date
    FROM messages_0001 WHERE ledger_ulid_time(mailgate_id) IS NOT NULL
    UNION
    SELECT DISTINCT date_trunc('month', recorded_at AT TIME ZONE 'UTC')::date FROM events_0001
    UNION
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month')::date
    FROM generate_series(0, 2) AS n
));

INSERT INTO messages (mailgate_id, external_id, campaign_id, postal_id, postal_token, account_id,
                      recipient, sender, subject, size, status, status_rank, accepted_at,
                      updated_at)
SELECT mailgate_id, external_id, campaign_id, postal_id, postal_token, account_id, recipient,
       sender, subject, size, status, status_rank, accepted_at, updated_at
FROM messages_0001;

INSERT INTO event_ids (event_id, recorded_at) SELECT event_id, recorded_at FROM events_0001;

INSERT INTO events (event_id, mailgate_id, postal_id, campaign_id, subject, name, status_name,
                    status_data, status_pending, occurred_at, recorded_at, data)
SELECT e.event_id, e.mailgate_id, e.postal_id,
       CASE WHEN e.status_name IS NOT NULL AND NOT e.status_pending THEN m.campaign_id END,
       e.subject, e.name, e.status_name, e.status_data, e.status_pending, e.occurred_at,
       e.recorded_at, e.data
FROM events_0001 e LEFT JOIN messages_0001 m ON m.mailgate_id = e.mailgate_id;

DROP TABLE messages_0001;
DROP TABLE events_0001;
