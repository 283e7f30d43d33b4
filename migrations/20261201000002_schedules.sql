-- Jobs that one worker process at a time runs on a schedule (scheduled retention): who
-- holds each and until when. A row, not a session advisory lock, so that it works the
-- same through a transaction pooler (PgBouncer's pool_mode = transaction), where a lock
-- and its unlock could land on different server sessions. Safe to run twice by hand.
CREATE TABLE IF NOT EXISTS report_schedules (
    job        text        PRIMARY KEY,
    owner      text,
    held_until timestamptz NOT NULL DEFAULT now(),
    last_run   timestamptz
) WITH (fillfactor = 50);
