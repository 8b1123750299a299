-- The host memory a worker's runs may hold (`--host-memory`), in bytes; NULL when unbounded.
-- A job spanning workers is planned within each worker's share of its own.
ALTER TABLE workers ADD COLUMN host_memory_bytes BIGINT;
