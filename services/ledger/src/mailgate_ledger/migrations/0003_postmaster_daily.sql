-- mailgate ledger 0003: Mail.ru Postmaster daily statistics (stats.postmaster.daily).
-- One row per domain, msgtype ('' when the statistics are for the whole domain) and day.
-- stats-poller re-polls recent days and a revised day arrives with a new event id, so the
-- ledger upserts: the row keeps the values of the newest poll (occurred_at), never a duplicate.
CREATE TABLE postmaster_daily (
    domain         text NOT NULL,
    msgtype        text NOT NULL DEFAULT '',
    date           date NOT NULL,
    messages_sent  bigint NOT NULL DEFAULT 0,
    delivered      bigint NOT NULL DEFAULT 0,
    read           bigint NOT NULL DEFAULT 0,
    deleted_read   bigint NOT NULL DEFAULT 0,
    deleted_unread bigint NOT NULL DEFAULT 0,
    spam           bigint NOT NULL DEFAULT 0,
    probably_spam  bigint NOT NULL DEFAULT 0,
    complaints     bigint NOT NULL DEFAULT 0,
    reputation     double precision,
    trend          double precision,
    event_id       text NOT NULL,
    occurred_at    timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, msgtype, date)
);
CREATE INDEX postmaster_daily_date ON postmaster_daily (date);
