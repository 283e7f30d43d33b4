-- Fewer bytes written per report (issue 23). A row is updated about five times in its
-- life (claim, create intent, job id, poll claim, outcome); three of those change no
-- indexed column, so they can be HOT updates — a new version on the same page, no index
-- entries — when the page has room. At a fill factor of 80 (migration 6) a bulk-loaded
-- page had room for a fifth of its rows' first update: the rest moved to another page
-- and added an entry to every index. Pages filled from now on keep half their space for
-- their rows' own updates (a burn-down: 82 % of those three updates HOT, against 65 % at
-- a fill factor of 70); pages already full stay as they are until their rows go.
ALTER TABLE report_requests SET (fillfactor = 50);

-- The identifiers were indexed by one GIN index over ARRAY[company_name, credit_code,
-- org_number]: three entries per row version (NULLs included), through GIN's pending
-- list, on every insert and every update that moved a row — the largest index write per
-- report. One B-tree per identifier, only where it is set, answers the same lookups
-- (`value IN (company_name, credit_code, org_number)`, a BitmapOr of the three) with one
-- small entry per identifier a row names.
CREATE INDEX IF NOT EXISTS report_requests_company_name_idx
    ON report_requests (company_name) WHERE company_name IS NOT NULL;
CREATE INDEX IF NOT EXISTS report_requests_credit_code_idx
    ON report_requests (credit_code) WHERE credit_code IS NOT NULL;
CREATE INDEX IF NOT EXISTS report_requests_org_number_idx
    ON report_requests (org_number) WHERE org_number IS NOT NULL;
DROP INDEX IF EXISTS report_requests_identifiers_idx;

-- The update trigger ran its five statements (events, counts, batches, finished minutes,
-- webhooks and notifications) over every UPDATE's rows, three of a report's five updates
-- changing none of what they record. It now looks once and stops there. (Transition
-- tables rule out `AFTER UPDATE OF column`, which would not look at all.) Otherwise as in
-- migration 8.
CREATE OR REPLACE FUNCTION report_requests_record_updates() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_actor  text := nullif(current_setting('report_worker.actor', true), '');
    v_action text := nullif(current_setting('report_worker.action', true), '');
BEGIN
    -- Most updates are claims, lease extensions, create intents and poll times: they
    -- change nothing logged or counted below, and then one look at the rows is all.
    -- (A count, not NOT EXISTS: asked for one row, the planner nests loops over the
    -- transition tables, and finding none costs rows × rows.)
    IF (SELECT count(*) FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.state IS DISTINCT FROM o.state OR n.batch IS DISTINCT FROM o.batch
            OR n.upstream_job_id IS DISTINCT FROM o.upstream_job_id
            OR n.last_error IS DISTINCT FROM o.last_error
            OR n.last_error_code IS DISTINCT FROM o.last_error_code
            OR n.last_error_at IS DISTINCT FROM o.last_error_at) = 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO report_events (request_id, state, previous_state, attempts, upstream_job_id, error_code, error,
                               actor, action)
    SELECT n.id, n.state, o.state, n.attempts, n.upstream_job_id,
           CASE WHEN error_changed THEN n.last_error_code END,
           CASE WHEN error_changed THEN n.last_error END,
           v_actor, v_action
      FROM new_rows n
      JOIN old_rows o ON o.id = n.id
     CROSS JOIN LATERAL (SELECT n.last_error IS NOT NULL AND (
                n.last_error_at IS DISTINCT FROM o.last_error_at
             OR n.last_error IS DISTINCT FROM o.last_error
             OR n.last_error_code IS DISTINCT FROM o.last_error_code) AS error_changed) e
     WHERE n.state IS DISTINCT FROM o.state
        OR n.upstream_job_id IS DISTINCT FROM o.upstream_job_id
        OR e.error_changed;
    -- Counts move only with a state (or batch) change; claims, heartbeats and snoozes
    -- skip this.
    WITH moved AS MATERIALIZED (
             SELECT n.id, o.state AS was, n.state AS now_state, o.batch AS was_batch, n.batch AS now_batch
               FROM new_rows n JOIN old_rows o ON o.id = n.id
              WHERE n.state IS DISTINCT FROM o.state OR n.batch IS DISTINCT FROM o.batch),
         delta AS (
             SELECT state, sum(d) AS d
               FROM (SELECT was AS state, -1 AS d FROM moved
                     UNION ALL SELECT now_state, 1 FROM moved) x
              GROUP BY state),
         counted AS (
             INSERT INTO report_state_counts AS c (state, slot, n)
             SELECT state, (pg_backend_pid() % 16)::smallint, d FROM delta WHERE d <> 0 ORDER BY state
             ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n
             RETURNING 1),
         batch_delta AS (
             SELECT batch, state, sum(d) AS d
               FROM (SELECT was_batch AS batch, was AS state, -1 AS d FROM moved WHERE was_batch IS NOT NULL
                     UNION ALL SELECT now_batch, now_state, 1 FROM moved WHERE now_batch IS NOT NULL) x
              GROUP BY batch, state),
         listed AS (
             INSERT INTO report_batches AS b (batch, last_id)
             SELECT now_batch, max(id) FROM moved
              WHERE now_batch IS NOT NULL AND now_batch IS DISTINCT FROM was_batch
              GROUP BY now_batch ORDER BY now_batch
             ON CONFLICT (batch) DO UPDATE SET last_id = greatest(b.last_id, excluded.last_id)
             RETURNING 1),
         batch_counted AS (
             INSERT INTO report_batch_counts AS c (batch, state, slot, n)
             SELECT batch, state, (pg_backend_pid() % 16)::smallint, d FROM batch_delta WHERE d <> 0
              ORDER BY batch, state
             ON CONFLICT (batch, state, slot) DO UPDATE SET n = c.n + excluded.n
             RETURNING 1)
    INSERT INTO report_finished_minutes AS f (minute, state, slot, n)
    SELECT date_trunc('minute', now()), now_state, (pg_backend_pid() % 16)::smallint, count(*)
      FROM moved WHERE was IS DISTINCT FROM now_state AND now_state IN ('succeeded', 'failed', 'cancelled')
     GROUP BY now_state ORDER BY now_state
    ON CONFLICT (minute, state, slot) DO UPDATE SET n = f.n + excluded.n;
    -- Rows that just finished: a webhook to deliver when they asked for one, and a
    -- completion event for every listener (delivered at commit, like every NOTIFY).
    INSERT INTO report_webhook_deliveries (request_id, url, event_state)
    SELECT n.id, n.callback_url, n.state
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE n.state IS DISTINCT FROM o.state AND n.state IN ('succeeded', 'failed', 'cancelled')
       AND n.callback_url IS NOT NULL;
    IF FOUND THEN
        -- Wakes the senders (identical payloads collapse into one per transaction).
        PERFORM pg_notify('report_webhooks', '');
    END IF;
    PERFORM pg_notify('report_finished', json_build_object('id', n.id, 'state', n.state, 'batch', n.batch)::text)
       FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE n.state IS DISTINCT FROM o.state AND n.state IN ('succeeded', 'failed', 'cancelled');
    RETURN NULL;
END $$;
DO $$
BEGIN
    -- As migration 20261201000003 set it for every SECURITY DEFINER function.
    EXECUTE format('ALTER FUNCTION report_requests_record_updates() SET search_path = %I, pg_temp',
                   current_schema());
END $$;
