-- kakao-tokend PostgreSQL store, schema version 2: everything a state file and an alert
-- bookkeeping file hold, so that `kakao-tokend store migrate` moves them without loss, and
-- the marker of a migration into this store that has not finished.
--
-- Only nullable or defaulted columns: nodes one version older keep working next to it.

-- AccountState.relogin_cause: why a person must log in again (relogin.ReloginCause values:
-- expired, rotated_lost, revoked, unknown). Set and cleared together with relogin_reason.
ALTER TABLE accounts ADD COLUMN relogin_cause text;

-- Rotation.replaced: the fingerprint of the refresh token this rotation retired (NULL in
-- entries written before it was recorded). It lets an old backup be recognised as old.
ALTER TABLE rotations ADD COLUMN replaced text
    CHECK (replaced IS NULL OR replaced ~ '^sha256:[0-9a-f]{8}$');

-- The fields of an alert record that have no column of their own: the translatable texts a
-- resolution is announced with ("texts"), and whatever later versions add. No secrets.
ALTER TABLE alerts ADD COLUMN extras jsonb NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(extras) = 'object');

-- True while `kakao-tokend store migrate --to postgres` is copying accounts INTO this store:
-- the rows are written but the files named by moved_note are still the live copy, so the
-- store stays refused (moved_to = 'file') until the files are marked moved. A re-run of the
-- migration finishes it.
ALTER TABLE store_meta ADD COLUMN moved_pending boolean NOT NULL DEFAULT false;
ALTER TABLE store_meta ADD CONSTRAINT store_meta_pending_is_moved
    CHECK (NOT moved_pending OR moved_to IS NOT NULL);
