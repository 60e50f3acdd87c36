-- mailgate ledger: initial schema.
-- Forward-only: never edit a shipped migration; add 0002_*.sql instead.
-- Retention note: events/messages are pruned by age (RETENTION_DAYS) with batched deletes.
-- When volumes call for it, a later migration can turn events into a table partitioned by
-- recorded_at (monthly) so retention becomes DROP PARTITION.

CREATE TABLE accounts (
    id                     text PRIMARY KEY,
    name                   text NOT NULL,
    allowed_sender_domains text[] NOT NULL DEFAULT '{}',
    postal_api_key         text,
    tracking               boolean NOT NULL DEFAULT true,
    api_token_hash         text NOT NULL UNIQUE,
    api_token_prefix       text NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    disabled               boolean NOT NULL DEFAULT false
);

CREATE TABLE credentials (
    username        text PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    name            text NOT NULL DEFAULT '',
    password_hash   text NOT NULL,
    rate_per_second double precision,
    daily_limit     integer,
    allowed_ips     text[] NOT NULL DEFAULT '{}',
    disabled        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credentials_account_id ON credentials (account_id);

CREATE TABLE endpoints (
    id                         text PRIMARY KEY,
    account_id                 text NOT NULL REFERENCES accounts (id),
    url                        text NOT NULL,
    secret                     text NOT NULL,
    events                     text[] NOT NULL DEFAULT '{}',
    batch                      boolean NOT NULL DEFAULT false,
    legacy_complained_spelling boolean NOT NULL DEFAULT false,
    enabled                    boolean NOT NULL DEFAULT true,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, url)
);

CREATE TABLE messages (
    mailgate_id  text PRIMARY KEY,
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
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_external_id ON messages (external_id);
CREATE INDEX messages_campaign_id ON messages (campaign_id);
CREATE INDEX messages_postal_id ON messages (postal_id);
CREATE INDEX messages_recipient ON messages (lower(recipient));
CREATE INDEX messages_accepted_at ON messages (accepted_at);

-- One row per fact consumed from NATS; event_id is the idempotency key.
-- name: what the fact means in the message history ("accepted", "sent", "delivered"...).
-- status_name: the customer event it maps to (NULL when none); status_pending: that customer
-- event is not emitted yet because the message row (its MessageRef) is not known yet.
CREATE TABLE events (
    event_id       text PRIMARY KEY,
    mailgate_id    text,
    postal_id      bigint,
    subject        text NOT NULL,
    name           text NOT NULL,
    status_name    text,
    status_data    jsonb,
    status_pending boolean NOT NULL DEFAULT false,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    data           jsonb NOT NULL
);
CREATE INDEX events_mailgate_id ON events (mailgate_id, occurred_at);
CREATE INDEX events_pending_postal_id ON events (postal_id) WHERE status_pending AND mailgate_id IS NULL;
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE TABLE suppressions (
    account_id text NOT NULL,
    email      text NOT NULL,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, email)
);

-- Transactional outbox: status events written in the same transaction as the fact.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    subject      text NOT NULL,
    msg_id       text NOT NULL UNIQUE,
    payload      bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Takes transaction-scoped advisory locks in the order given (callers sort the keys), so
-- concurrent batches touching the same messages serialize without deadlocking.
CREATE FUNCTION ledger_lock_keys(keys bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k bigint;
BEGIN
    FOREACH k IN ARRAY keys LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
END
$$;
