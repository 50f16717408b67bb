-- kakao-tokend PostgreSQL store, schema version 4: the generation an account had when its row
-- was deleted (a logout, an operator's DELETE or TRUNCATE, a rename), so that its next row
-- (a login, an import) continues above it instead of starting at 1 again. Consumers, hooks
-- and templates take a generation that is not above the last one for tokens they had. This
-- is what NAME.logged-out.json does for the file store (docs/consumers.md).
--
-- Nodes one version older keep working next to it: the table and the trigger are new, no
-- column of theirs changes, and their deletions are recorded too (the trigger stamps every
-- deleter). What they do not do is read the record: a `login` or `import` run by a
-- kakao-tokend of the previous version starts at 1 again, as before; upgrade the hosts the
-- commands run on. A new row does not remove the record: the highest generation stays.

-- One row per account name that ever lost its row: the highest generation such a row had.
-- No token, no fingerprint. Keyed by name, not row id: the next row of that name has a new id.
CREATE TABLE deleted_accounts (
    name        text PRIMARY KEY,
    generation  bigint NOT NULL CHECK (generation >= 0),
    -- When that generation was recorded (the deleting transaction's start).
    deleted_at  timestamptz NOT NULL DEFAULT now()
);

-- Keeps the highest: a deletion at a lower generation (a row that a previous version's login
-- started at 1 again) leaves the record as it is.
CREATE FUNCTION accounts_record_deleted_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- A statement trigger sees no OLD row; BEFORE the truncate the rows are still here.
        INSERT INTO deleted_accounts AS d (name, generation)
            SELECT name, generation FROM accounts
        ON CONFLICT (name) DO UPDATE SET generation = EXCLUDED.generation,
                                         deleted_at = EXCLUDED.deleted_at
            WHERE d.generation < EXCLUDED.generation;
        RETURN NULL;
    END IF;
    -- An UPDATE counts only when it renamed the row: the old name's tokens are gone.
    IF TG_OP = 'UPDATE' THEN
        IF OLD.name IS NOT DISTINCT FROM NEW.name THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO deleted_accounts AS d (name, generation) VALUES (OLD.name, OLD.generation)
    ON CONFLICT (name) DO UPDATE SET generation = EXCLUDED.generation,
                                     deleted_at = EXCLUDED.deleted_at
        WHERE d.generation < EXCLUDED.generation;
    RETURN NULL;
END
$$;
-- A trigger, not each statement: every deleter is covered — `logout` of this version and the
-- previous one, `store migrate --to postgres` removing a row the files logged out since, an
-- operator's DELETE by hand. (`store migrate --to file` deletes no row: it marks the store
-- moved and writes this record into the files, NAME.logged-out.json.) Every UPDATE, not
-- UPDATE OF name, for the reason 0003 gives.
CREATE TRIGGER accounts_record_deleted_generation AFTER DELETE OR UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_record_deleted_generation();
CREATE TRIGGER accounts_record_truncated_generations BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION accounts_record_deleted_generation();
