-- Validation loss and early stopping: each checkpoint's validation loss (retention and the
-- checkpoints API mark the best by it), and whether a succeeded job stopped early.
ALTER TABLE checkpoints ADD COLUMN val_loss DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN stopped_early BOOLEAN NOT NULL DEFAULT FALSE;
