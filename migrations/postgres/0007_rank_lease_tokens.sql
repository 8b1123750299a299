-- Every rank of a job spanning workers holds its own claim token, minted with the reservation:
-- rank 0's is also the job's lease token (it fences the job's records), the others' fence
-- their rank's heartbeat.
ALTER TABLE job_ranks ADD COLUMN lease_token TEXT;
