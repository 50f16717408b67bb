-- kakao-tokend PostgreSQL store, schema version 3: what lets the heartbeat poll read only the
-- rows that changed since the last poll instead of every row (docs/fleet.md §8).
--
-- Nodes one version older keep working next to it: the column has a default, the trigger
-- stamps their writes too, and their poll still reads every row.

-- The 64-bit id of the transaction that last inserted or updated the row. A poll remembers
-- the xmin of its snapshot (every transaction below it had ended) and next reads the rows
-- whose writer_xid is at least that. Neither updated_at (the writer's transaction start) nor
-- a sequence drawn at UPDATE time can do this: both are taken before the commit, so a writer
-- that commits after a poll can carry a value older than that poll's.
-- The default stamps the rows already here with this migration's transaction; a node reads
-- every row at start anyway.
ALTER TABLE accounts ADD COLUMN writer_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

-- Stamped by a trigger, not by each statement: every writer is covered, nodes of the previous
-- version, `store rotate-key`, an operator's UPDATE by hand, alike. pg_current_xact_id() is
-- the top-level transaction's id, also inside a savepoint.
CREATE FUNCTION accounts_stamp_writer_xid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.writer_xid := pg_current_xact_id();
    RETURN NEW;
END
$$;
CREATE TRIGGER accounts_stamp_writer_xid BEFORE INSERT OR UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_stamp_writer_xid();

-- The poll: WHERE writer_xid >= the previous poll's snapshot xmin.
CREATE INDEX accounts_writer_xid ON accounts (writer_xid);

-- Deletions leave no row to find by writer_xid. Every deleted (or renamed) row counts here,
-- in the deleting transaction; a poll that finds the count changed lists the names once.
-- Comparing count(*) with the size of a node's cache would not do: a stale row there and a
-- row the node has just dropped on a notification newer than the poll cancel out.
CREATE TABLE account_deletions (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    deletions  bigint NOT NULL DEFAULT 0
);
INSERT INTO account_deletions DEFAULT VALUES;

CREATE FUNCTION accounts_count_deletion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An UPDATE counts only when it renamed the row (OLD is not set for a TRUNCATE).
    IF TG_OP = 'UPDATE' THEN
        IF OLD.name IS NOT DISTINCT FROM NEW.name THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE account_deletions SET deletions = deletions + 1;
    RETURN NULL;
END
$$;
-- Every UPDATE, not UPDATE OF name: a trigger on a column would keep an operator from
-- altering that column's type or collation.
CREATE TRIGGER accounts_count_deletion AFTER DELETE OR UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_count_deletion();
CREATE TRIGGER accounts_count_truncate AFTER TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION accounts_count_deletion();
