-- Which job checkpoints a job starts from (`model.init.from`), so a checkpoint is kept while
-- an unfinished job still needs its weights.
CREATE TABLE job_checkpoints (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    source_job_id TEXT NOT NULL REFERENCES jobs (id),
    step BIGINT NOT NULL,
    PRIMARY KEY (job_id, source_job_id, step)
);
CREATE INDEX job_checkpoints_by_source ON job_checkpoints (source_job_id, step);
