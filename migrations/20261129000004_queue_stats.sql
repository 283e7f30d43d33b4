-- Queue statistics that cost the same on day 1,000 as on day 1. Safe to run twice by hand.
--
-- Per-state row counts are kept by the statement triggers in report_state_counts, spread
-- over 16 slots (the writing backend's pid modulo 16) so that concurrent writers seldom
-- wait on one hot row; a read sums at most 16 rows per state. Rows finished per minute are
-- kept the same way in report_finished_minutes, for throughput. The age of each state's
-- oldest row comes from an index (every state but succeeded) or, for succeeded, from the
-- first such row in id order (history is finished oldest first).

CREATE TABLE IF NOT EXISTS report_state_counts (
    state text     NOT NULL,
    slot  smallint NOT NULL,
    n     bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (state, slot)
);

CREATE TABLE IF NOT EXISTS report_finished_minutes (
    minute timestamptz NOT NULL,
    state  text        NOT NULL,
    slot   smallint    NOT NULL,
    n      bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, state, slot)
);

CREATE INDEX IF NOT EXISTS report_requests_unfinished_age_idx
    ON report_requests (state, created_at) WHERE state <> 'succeeded';

CREATE OR REPLACE FUNCTION report_requests_record_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_events (request_id, state, attempts, upstream_job_id, error_code, error)
    SELECT n.id, n.state, n.attempts, n.upstream_job_id, n.last_error_code, n.last_error FROM new_rows n;
    INSERT INTO report_state_counts AS c (state, slot, n)
    SELECT n.state, (pg_backend_pid() % 16)::smallint, count(*) FROM new_rows n
     GROUP BY n.state ORDER BY n.state
    ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n;
    -- One notification per statement (a bulk load wakes the workers once).
    PERFORM pg_notify('report_requests', 'insert');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION report_requests_record_updates() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_events (request_id, state, previous_state, attempts, upstream_job_id, error_code, error)
    SELECT n.id, n.state, o.state, n.attempts, n.upstream_job_id,
           CASE WHEN error_changed THEN n.last_error_code END,
           CASE WHEN error_changed THEN n.last_error END
      FROM new_rows n
      JOIN old_rows o ON o.id = n.id
     CROSS JOIN LATERAL (SELECT n.last_error IS NOT NULL AND (
                n.last_error_at IS DISTINCT FROM o.last_error_at
             OR n.last_error IS DISTINCT FROM o.last_error
             OR n.last_error_code IS DISTINCT FROM o.last_error_code) AS error_changed) e
     WHERE n.state IS DISTINCT FROM o.state
        OR n.upstream_job_id IS DISTINCT FROM o.upstream_job_id
        OR e.error_changed;
    -- Counts move only with a state change; claims, heartbeats and snoozes skip this.
    WITH moved AS MATERIALIZED (
             SELECT o.state AS was, n.state AS now_state
               FROM new_rows n JOIN old_rows o ON o.id = n.id
              WHERE n.state IS DISTINCT FROM o.state),
         delta AS (
             SELECT state, sum(d) AS d
               FROM (SELECT was AS state, -1 AS d FROM moved
                     UNION ALL SELECT now_state, 1 FROM moved) x
              GROUP BY state),
         counted AS (
             INSERT INTO report_state_counts AS c (state, slot, n)
             SELECT state, (pg_backend_pid() % 16)::smallint, d FROM delta WHERE d <> 0 ORDER BY state
             ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n
             RETURNING 1)
    INSERT INTO report_finished_minutes AS f (minute, state, slot, n)
    SELECT date_trunc('minute', now()), now_state, (pg_backend_pid() % 16)::smallint, count(*)
      FROM moved WHERE now_state IN ('succeeded', 'failed', 'cancelled')
     GROUP BY now_state ORDER BY now_state
    ON CONFLICT (minute, state, slot) DO UPDATE SET n = f.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION report_requests_forget_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM report_events e USING old_rows o WHERE e.request_id = o.id;
    INSERT INTO report_state_counts AS c (state, slot, n)
    SELECT o.state, (pg_backend_pid() % 16)::smallint, -count(*) FROM old_rows o
     GROUP BY o.state ORDER BY o.state
    ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION report_requests_forget_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM report_state_counts;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER report_requests_truncated
    AFTER TRUNCATE ON report_requests
    FOR EACH STATEMENT EXECUTE FUNCTION report_requests_forget_counts();

-- The counts of the rows already there, once. `report-worker migrate` applies this file in
-- one transaction: with the table locked, no writer slips between the new triggers and
-- this count. (By hand on a live queue, apply it with `psql -1` for the same guarantee.)
DO $$
BEGIN
    LOCK TABLE report_requests IN SHARE ROW EXCLUSIVE MODE;
    IF NOT EXISTS (SELECT 1 FROM report_state_counts) THEN
        INSERT INTO report_state_counts (state, slot, n)
        SELECT state, 0, count(*) FROM report_requests GROUP BY state;
    END IF;
END $$;

-- One row per state, zeros included, with the age of the oldest row in that state.
-- Same columns and meaning as before; the cost no longer grows with history.
CREATE OR REPLACE VIEW report_queue_stats AS
WITH counts AS (SELECT state, sum(n)::bigint AS n FROM report_state_counts GROUP BY state),
     oldest (state, created_at) AS (
         SELECT 'queued', (SELECT created_at FROM report_requests WHERE state = 'queued' ORDER BY created_at LIMIT 1)
         UNION ALL
         SELECT 'generating', (SELECT created_at FROM report_requests WHERE state = 'generating' ORDER BY created_at LIMIT 1)
         UNION ALL
         SELECT 'succeeded', (SELECT created_at FROM report_requests WHERE state = 'succeeded' ORDER BY id LIMIT 1)
         UNION ALL
         SELECT 'failed', (SELECT created_at FROM report_requests WHERE state = 'failed' ORDER BY created_at LIMIT 1)
         UNION ALL
         SELECT 'cancelled', (SELECT created_at FROM report_requests WHERE state = 'cancelled' ORDER BY created_at LIMIT 1))
SELECT s.state,
       coalesce(c.n, 0)::bigint     AS count,
       now() - o.created_at         AS oldest_age,
       o.created_at                 AS oldest_created_at
  FROM unnest(ARRAY['queued', 'generating', 'succeeded', 'failed', 'cancelled']) WITH ORDINALITY AS s (state, ord)
  LEFT JOIN counts c ON c.state = s.state
  LEFT JOIN oldest o ON o.state = s.state
 ORDER BY s.ord;

-- Rows that reached each final state in the last complete minute, hour and day.
CREATE OR REPLACE VIEW report_throughput AS
SELECT s.state,
       coalesce(sum(f.n) FILTER (WHERE f.minute >= date_trunc('minute', now()) - interval '1 minute'
                                   AND f.minute <  date_trunc('minute', now())), 0)::bigint AS last_minute,
       coalesce(sum(f.n) FILTER (WHERE f.minute >= date_trunc('minute', now()) - interval '1 hour'
                                   AND f.minute <  date_trunc('minute', now())), 0)::bigint AS last_hour,
       coalesce(sum(f.n) FILTER (WHERE f.minute >= date_trunc('minute', now()) - interval '1 day'
                                   AND f.minute <  date_trunc('minute', now())), 0)::bigint AS last_day
  FROM unnest(ARRAY['succeeded', 'failed', 'cancelled']) WITH ORDINALITY AS s (state, ord)
  LEFT JOIN report_finished_minutes f
         ON f.state = s.state AND f.minute >= date_trunc('minute', now()) - interval '1 day'
 GROUP BY s.state, s.ord
 ORDER BY s.ord;
