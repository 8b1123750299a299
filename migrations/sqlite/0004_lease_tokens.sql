-- Each claim of a job mints its own lease token: a run's heartbeats, records and end check it,
-- so an earlier claim of the same job (by the same worker id too) is fenced out once the job
-- is claimed again.
ALTER TABLE jobs ADD COLUMN lease_token TEXT;
-- A record a run retried after its commit was lost on the way back is written once: its
-- event carries the run's key for it.
ALTER TABLE events ADD COLUMN record_key TEXT;
CREATE UNIQUE INDEX events_by_record_key ON events (job_id, record_key)
    WHERE record_key IS NOT NULL;
