-- The training service's tables. Times are milliseconds since the Unix epoch; JSON is TEXT.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    -- sha256 of the key, hex; the key itself is never stored.
    key_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE files (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX files_by_tenant ON files (tenant_id, id);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    plan TEXT,
    plan_svg TEXT,
    plan_summary TEXT,
    devices_needed BIGINT NOT NULL DEFAULT 0,
    total_steps BIGINT NOT NULL,
    step BIGINT NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    latest_metrics TEXT,
    restart_count BIGINT NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at BIGINT,
    devices TEXT,
    error TEXT,
    idempotency_key TEXT,
    request_hash TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, id);
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Which files a job uses, so a file cannot be deleted under an unfinished job.
CREATE TABLE job_files (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    file_id TEXT NOT NULL,
    PRIMARY KEY (job_id, file_id)
);
CREATE INDEX job_files_by_file ON job_files (file_id);

CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE metrics (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    step BIGINT NOT NULL,
    -- Tokens trained up to and including this step.
    tokens BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    step BIGINT NOT NULL,
    path TEXT NOT NULL,
    files TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, step)
);
