-- mailgate ledger 0004: operator console (accounts of people who sign in to /console/).
-- role 'admin' sees and changes everything; role 'viewer' is bound to one customer account
-- and only reads that account's data (the console's queries filter by it).
CREATE TABLE operators (
    id            text PRIMARY KEY,
    username      text NOT NULL,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'viewer')),
    account_id    text REFERENCES accounts (id),
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz,
    CHECK ((role = 'viewer') = (account_id IS NOT NULL))
);
CREATE UNIQUE INDEX operators_username ON operators (lower(username));

-- Server-side sessions: the cookie holds a random token, the table its SHA-256 (a leaked
-- table does not sign anyone in). Signing out or disabling an operator deletes the rows.
CREATE TABLE operator_sessions (
    token_hash   text PRIMARY KEY,
    operator_id  text NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    user_agent   text NOT NULL DEFAULT '',
    ip           text NOT NULL DEFAULT ''
);
CREATE INDEX operator_sessions_operator ON operator_sessions (operator_id);
CREATE INDEX operator_sessions_expires_at ON operator_sessions (expires_at);

-- The console's overview counts today's customer events: recorded_at follows insertion order,
-- so a BRIN index finds a day's rows in a monthly partition for almost no upkeep.
CREATE INDEX events_recorded_at_brin ON events USING brin (recorded_at);
