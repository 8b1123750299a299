-- Jobs planned over the cluster's free devices: each attempt of a job spanning workers keeps
-- the layout its ranks plan on (JSON: the devices string, stages and replicas), and each job
-- the most times it may go back to the queue after a failure (NULL: the built-in default).
ALTER TABLE job_reservations ADD COLUMN layout TEXT;
ALTER TABLE jobs ADD COLUMN max_restarts BIGINT;
