-- The queue: queued jobs in claim order. Queue positions and the claim query walk this index
-- from its start and stop after a bounded number of entries, however many jobs the table holds.
CREATE INDEX jobs_queue ON jobs (id) WHERE state = 'queued';
