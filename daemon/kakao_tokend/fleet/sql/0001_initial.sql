-- kakao-tokend PostgreSQL store, schema version 1.
--
-- Applied by kakao_tokend.fleet.schema in one transaction under an advisory lock and recorded
-- in schema_migrations (with this file's SHA-256). Never edit a released file: add the next
-- one (0002_what_it_does.sql). Nodes refuse to run on a database whose version is newer than
-- the newest file they ship.
--
-- Secrets never appear in plain text here: the token columns hold AES-256-GCM blobs
-- (kakao_tokend.fleet.crypto) bound to (account name, row id, column name), and fingerprints
-- are short hashes. Times are timestamptz; nodes connect with TimeZone=UTC.

-- What this database is, and whether its accounts have moved elsewhere. Exactly one row.
CREATE TABLE store_meta (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Names this store in rescue files and migration markers: a file made for another store
    -- is never applied to this one.
    store_id    uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Set by `kakao-tokend store migrate --to file`: the accounts now live in files, and a
    -- node finding this refuses to run on the database (two live copies of a refresh token
    -- means the first rotation kills the other copy).
    moved_to    text CHECK (moved_to IN ('file')),
    moved_at    timestamptz,
    moved_by    text,
    moved_note  text,
    CHECK ((moved_to IS NULL) = (moved_at IS NULL))
);
INSERT INTO store_meta (store_id) VALUES (gen_random_uuid());

-- One row per logged-in account: the state of record (what the file store keeps in
-- NAME.state.json), plus the scheduling and failure bookkeeping the nodes share.
CREATE TABLE accounts (
    -- Chosen by the writer (uuid4) before the INSERT, because it is part of the encryption's
    -- associated data; never reused, not even after a restore or a migration round trip.
    id                        uuid PRIMARY KEY,
    -- Same rule as config.ACCOUNT_NAME_RE (the associated data relies on it: no NUL).
    name                      text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,31}$'),
    -- Bumped on every change of the token set; writers compare-and-swap on it.
    generation                bigint NOT NULL CHECK (generation >= 0),
    -- The key that sealed every blob of this row (kakao_tokend.fleet.crypto.key_id_of).
    key_id                    text NOT NULL CHECK (key_id ~ '^[0-9a-f]{16}$'),
    access_token              bytea NOT NULL,
    refresh_token             bytea NOT NULL,
    id_token                  bytea,
    -- Sealed JSON object: fields of Kakao's answer we do not interpret (NULL when none).
    token_extra               bytea,
    token_type                text NOT NULL DEFAULT 'bearer',
    scope                     text,
    access_issued_at          timestamptz NOT NULL,
    access_expires_at         timestamptz NOT NULL,
    refresh_issued_at         timestamptz,
    refresh_expires_at        timestamptz NOT NULL,
    -- True when refresh_expires_at is a guess (imported from a file with durations only).
    refresh_expiry_estimated  boolean NOT NULL DEFAULT false,
    user_id                   bigint,
    -- Set when a person must log in again (then due_at is NULL: nothing to refresh).
    relogin_reason            text,
    -- AccountState.extras: free-form per-feature data (no secrets).
    extras                    jsonb NOT NULL DEFAULT '{}'::jsonb
                              CHECK (jsonb_typeof(extras) = 'object'),
    -- When a node should claim the account next (database clock; NULL: never).
    due_at                    timestamptz,
    refreshed_at              timestamptz,
    refreshed_by              text,
    -- Failure bookkeeping, shared so that status and alerts agree on every node.
    attempts                  integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    failing_since             timestamptz,
    last_attempt_at           timestamptz,
    last_attempt_by           text,
    last_error                text,
    last_error_class          text,
    -- Rotation-window bookkeeping: the last refresh inside the window that did not rotate
    -- (NULL again after a rotation).
    rotation_missed_at        timestamptz,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
-- The claim query: WHERE due_at <= now() ORDER BY due_at ... FOR UPDATE SKIP LOCKED.
CREATE INDEX accounts_due_at ON accounts (due_at) WHERE due_at IS NOT NULL;

-- Every rotation of a refresh token: when, by which node, and the new token's fingerprint.
-- Kept in full (about one row per account and month); a state holds the newest 50.
CREATE TABLE rotations (
    account_id   uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    rotated_at   timestamptz NOT NULL,
    -- tokens.fingerprint(): 'sha256:' and 8 hex digits. The check keeps a token out.
    fingerprint  text NOT NULL CHECK (fingerprint ~ '^sha256:[0-9a-f]{8}$'),
    -- The account's generation and the node that wrote this entry (for history brought in
    -- by an import or a migration: the generation and node of that write).
    generation   bigint,
    node         text,
    PRIMARY KEY (account_id, rotated_at, fingerprint)
);

-- Alert bookkeeping (what NAME.alerts.json holds in file mode): which conditions are active,
-- when they were last sent, so that nothing is sent twice by two nodes or after a restart.
-- Keyed by account name, not row: an account without tokens has alerts too.
CREATE TABLE alerts (
    account       text NOT NULL,
    condition     text NOT NULL,
    severity      text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    -- For the expiry ladder: the threshold crossed, in seconds (0 = expired).
    stage         double precision,
    message       text NOT NULL,
    action        text NOT NULL DEFAULT '',
    since         timestamptz NOT NULL,
    last_sent_at  timestamptz NOT NULL,
    sent          integer NOT NULL DEFAULT 1 CHECK (sent >= 0),
    sent_by       text,
    PRIMARY KEY (account, condition)
);

-- The nodes of the fleet, for status and metrics. A heartbeat updates last_seen_at.
CREATE TABLE nodes (
    name            text PRIMARY KEY,
    started_at      timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    version         text NOT NULL,
    schema_version  integer NOT NULL,
    host            text,
    pid             integer,
    -- Counters for status/metrics (claims, claim conflicts, listener lag ...).
    stats           jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(stats) = 'object')
);
