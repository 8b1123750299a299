-- The links between machines as the ranks of jobs spanning them measured them (before their
-- first step): one row per pair of machine names (the lesser first), replaced by each new
-- measurement. Bandwidth in bytes per second, latency in seconds one way, measured_at in
-- milliseconds since the Unix epoch.
CREATE TABLE network_links (
    machine_a TEXT NOT NULL,
    machine_b TEXT NOT NULL,
    bytes_per_s DOUBLE PRECISION NOT NULL,
    latency_s DOUBLE PRECISION NOT NULL,
    measured_at BIGINT NOT NULL,
    PRIMARY KEY (machine_a, machine_b)
);
