-- Learned polling: the moment of each "not ready" answer, and one observed generation
-- time per finished task (as an interval: not ready at `lower_secs`, ready at
-- `upper_secs`, both after the create). Safe to run twice by hand.

ALTER TABLE report_requests ADD COLUMN IF NOT EXISTS last_polled_at timestamptz;

CREATE TABLE IF NOT EXISTS report_generation_times (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    report_type text        NOT NULL,
    lower_secs  real        NOT NULL,
    upper_secs  real        NOT NULL,
    observed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT report_generation_times_interval_invalid CHECK (lower_secs >= 0 AND upper_secs >= lower_secs)
);
CREATE INDEX IF NOT EXISTS report_generation_times_recent_idx
    ON report_generation_times (report_type, id);
