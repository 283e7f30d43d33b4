-- Applications and batches: completion events, webhooks, batches, and functions that run
-- with their owner's rights (so an application's role needs no write access to the
-- engine's columns and tables; see `report-worker grant`). Safe to run twice by hand.

ALTER TABLE report_requests
    -- A name grouping requests loaded together (a CSV file, an order): free text.
    ADD COLUMN IF NOT EXISTS batch        text,
    -- Where to POST the outcome when the row finishes (optional, per row).
    ADD COLUMN IF NOT EXISTS callback_url text;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_batch_invalid') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_batch_invalid
            CHECK (char_length(batch) BETWEEN 1 AND 200 AND batch !~ '[[:cntrl:]]');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_callback_url_not_http') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_callback_url_not_http
            CHECK (callback_url ~ '^https?://[^/?#[:space:][:cntrl:]]+([/?#][^[:space:][:cntrl:]]*)?$');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_callback_url_too_long') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_callback_url_too_long
            CHECK (char_length(callback_url) <= 2048);
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS report_requests_batch_idx
    ON report_requests (batch, id) WHERE batch IS NOT NULL;

-- One row per webhook to deliver: created by the update trigger when a row with a
-- callback_url reaches a final state, delivered by `run` (retried with backoff, never
-- blocking report work). The body is built when it is sent, from the row and its
-- document as they are then.
CREATE TABLE IF NOT EXISTS report_webhook_deliveries (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id       bigint      NOT NULL,
    url              text        NOT NULL,
    -- The final state the row reached: what this delivery announces.
    event_state      text        NOT NULL,
    state            text        NOT NULL DEFAULT 'pending',
    attempts         int         NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      int,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    CONSTRAINT report_webhook_deliveries_state_unknown CHECK (state IN ('pending', 'delivered', 'failed')),
    CONSTRAINT report_webhook_deliveries_event_state_unknown CHECK (event_state IN ('succeeded', 'failed', 'cancelled'))
);
CREATE INDEX IF NOT EXISTS report_webhook_deliveries_due_idx
    ON report_webhook_deliveries (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS report_webhook_deliveries_failed_idx
    ON report_webhook_deliveries (id) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS report_webhook_deliveries_request_idx
    ON report_webhook_deliveries (request_id, id);

-- Finishing rows: the history, the counts, and now the completion event (NOTIFY on
-- report_finished, one per row: {"id":…,"state":…,"batch":…}) and webhook deliveries.
CREATE OR REPLACE FUNCTION report_requests_record_updates() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
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

-- Rows inserted already finished (an import of history) announce it too.
CREATE OR REPLACE FUNCTION report_requests_record_inserts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO report_events (request_id, state, attempts, upstream_job_id, error_code, error)
    SELECT n.id, n.state, n.attempts, n.upstream_job_id, n.last_error_code, n.last_error FROM new_rows n;
    INSERT INTO report_state_counts AS c (state, slot, n)
    SELECT n.state, (pg_backend_pid() % 16)::smallint, count(*) FROM new_rows n
     GROUP BY n.state ORDER BY n.state
    ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n;
    PERFORM pg_notify('report_finished', json_build_object('id', n.id, 'state', n.state, 'batch', n.batch)::text)
       FROM new_rows n WHERE n.state IN ('succeeded', 'failed', 'cancelled');
    -- One notification per statement (a bulk load wakes the workers once).
    PERFORM pg_notify('report_requests', 'insert');
    RETURN NULL;
END $$;

-- Deleting requests (a purge, or by hand) forgets their history, counts and deliveries.
CREATE OR REPLACE FUNCTION report_requests_forget_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM report_events e USING old_rows o WHERE e.request_id = o.id;
    DELETE FROM report_webhook_deliveries w USING old_rows o WHERE w.request_id = o.id;
    INSERT INTO report_state_counts AS c (state, slot, n)
    SELECT o.state, (pg_backend_pid() % 16)::smallint, -count(*) FROM old_rows o
     GROUP BY o.state ORDER BY o.state
    ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;

-- Re-queues a batch's failed rows (as report_retry does each); returns how many.
CREATE OR REPLACE FUNCTION report_retry_batch(p_batch text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    retried integer := 0;
    r bigint;
BEGIN
    FOR r IN SELECT id FROM report_requests WHERE batch = p_batch AND state = 'failed' ORDER BY id LOOP
        IF report_retry(r) THEN
            retried := retried + 1;
        END IF;
    END LOOP;
    RETURN retried;
END $$;

-- The functions applications call, and the triggers their INSERTs fire, run with their
-- owner's rights: an application's role may cancel and retry, and insert, without write
-- access to the engine's columns or to the history and counts the triggers keep.
ALTER FUNCTION report_cancel(bigint) SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION report_retry(bigint) SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION report_requests_forget_counts() SECURITY DEFINER SET search_path FROM CURRENT;
-- The engine's own functions are the engine's only.
REVOKE EXECUTE ON FUNCTION report_begin_create(bigint, bigint, text, float8, float8, float8) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION report_begin_create_batch(bigint[], bigint[], text, float8, float8, float8) FROM PUBLIC;
