-- Learned polling uses the provider's queue_num: a row keeps its task's last "queued"
-- answer (when, and how many jobs were ahead), and each observed generation time keeps
-- it too, seconds after the create. Nullable columns: no table rewrite. A value from an
-- earlier task of the row is told apart by being older than upstream_created_at. Safe
-- to run twice by hand.
ALTER TABLE report_requests
    ADD COLUMN IF NOT EXISTS last_waiting_at timestamptz,
    ADD COLUMN IF NOT EXISTS last_queue_num  integer;
ALTER TABLE report_generation_times
    ADD COLUMN IF NOT EXISTS waiting_secs real,
    ADD COLUMN IF NOT EXISTS queue_num    integer;
