-- The cluster in the store: every worker's devices, which job holds each, gang reservations of
-- jobs spanning workers, their ranks and the rows ranks meet through. Times are milliseconds
-- since the Unix epoch by the database's clock where a lease is judged.

-- A worker is live while its lease has not run out; it renews it by heartbeat.
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    -- 1 when the worker can run one rank of a job spanning workers.
    runs_ranks BIGINT NOT NULL DEFAULT 0,
    registered_at BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);

-- Each worker's devices and the job holding each (NULL: free). attempt and rank are set when
-- the holder is a gang reservation, NULL for a job claimed by one worker.
CREATE TABLE worker_devices (
    worker_id TEXT NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    position BIGINT NOT NULL,
    kind TEXT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    job_id TEXT,
    attempt BIGINT,
    rank BIGINT,
    PRIMARY KEY (worker_id, device_id)
);
CREATE INDEX worker_devices_by_job ON worker_devices (job_id) WHERE job_id IS NOT NULL;

-- One reservation per attempt of a job spanning workers: 'reserved' until every rank has
-- started, then 'running', 'released' once over.
CREATE TABLE job_reservations (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    attempt BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    start_deadline BIGINT NOT NULL,
    released_at BIGINT,
    reason TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX job_reservations_active ON job_reservations (state) WHERE state <> 'released';

-- Which worker runs each rank of an attempt, on which of its devices, and the rank's lease.
CREATE TABLE job_ranks (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    rank BIGINT NOT NULL,
    worker_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    lease_expires_at BIGINT,
    PRIMARY KEY (job_id, attempt, rank),
    FOREIGN KEY (job_id, attempt) REFERENCES job_reservations (job_id, attempt)
);
CREATE INDEX job_ranks_by_worker ON job_ranks (worker_id, state);

-- What ranks of one attempt tell each other (rank 0's NCCL unique id, a rank's host:port).
CREATE TABLE rendezvous (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    rank BIGINT NOT NULL,
    key TEXT NOT NULL,
    value BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt, rank, key)
);
