-- The dashboard: who did what (operators' actions in the event log), the provider calls
-- per minute (shared by every process, so any process can show them), the account's
-- configured QPS, and indexes that keep the request list fast at tens of millions of
-- rows. Safe to run twice by hand.

-- Operators' actions are events too. `actor` and `action` come from the transaction's
-- settings `report_worker.actor` / `report_worker.action` (set_config(…, true)), which
-- the dashboard sets; the engine leaves them empty. Account-wide actions (probe a
-- stopped account now) have no request: they name the account instead.
ALTER TABLE report_events
    ADD COLUMN IF NOT EXISTS actor   text,
    ADD COLUMN IF NOT EXISTS action  text,
    ADD COLUMN IF NOT EXISTS account text,
    ALTER COLUMN request_id DROP NOT NULL;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_events_request_or_account') THEN
        ALTER TABLE report_events ADD CONSTRAINT report_events_request_or_account
            CHECK (request_id IS NOT NULL OR account IS NOT NULL) NOT VALID;
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS report_events_account_idx
    ON report_events (account, id) WHERE account IS NOT NULL;

-- Provider calls per minute, account, endpoint and outcome, added up by every worker
-- process (each flushes its own counts every few seconds). Minutes older than a week
-- are removed by the workers as they flush.
CREATE TABLE IF NOT EXISTS report_provider_calls (
    minute   timestamptz NOT NULL,
    account  text        NOT NULL,
    endpoint text        NOT NULL,
    outcome  text        NOT NULL,
    n        bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, account, endpoint, outcome)
);

-- The QPS the account's processes are configured with (written with every call slot).
ALTER TABLE report_account_pacing ADD COLUMN IF NOT EXISTS qps double precision;

-- The request list: newest first within one state (the partial index leaves out the
-- succeeded rows, the bulk of a long-lived table, which the primary key serves), by
-- identifier (any of the three), and by insert time (BRIN: tiny, nearly free to keep).
CREATE INDEX IF NOT EXISTS report_requests_state_id_idx
    ON report_requests (state, id) WHERE state <> 'succeeded';
CREATE INDEX IF NOT EXISTS report_requests_identifiers_idx
    ON report_requests USING gin ((ARRAY[company_name, credit_code, org_number]));
CREATE INDEX IF NOT EXISTS report_requests_created_brin
    ON report_requests USING brin (created_at);

-- Batches at a glance at any size: one row per batch (its newest request, for a
-- newest-first list) and its rows per state, kept by the statement triggers like
-- report_state_counts (16 slots per state, so concurrent finishes do not queue on one
-- row). A batch's row goes when its last request does.
CREATE TABLE IF NOT EXISTS report_batches (
    batch      text        PRIMARY KEY,
    last_id    bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS report_batches_last_idx ON report_batches (last_id);
CREATE TABLE IF NOT EXISTS report_batch_counts (
    batch text     NOT NULL,
    state text     NOT NULL,
    slot  smallint NOT NULL,
    n     bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (batch, state, slot)
);

-- Row history with who did it: as before, plus `actor` and `action`; batch counts.
CREATE OR REPLACE FUNCTION report_requests_record_updates() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_actor  text := nullif(current_setting('report_worker.actor', true), '');
    v_action text := nullif(current_setting('report_worker.action', true), '');
BEGIN
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

-- An operator asks for a stopped account to be probed now rather than at `probe_at`
-- (the next process to look takes the probe; one process probes, as always). Recorded
-- in report_events with the account and the transaction's actor. False: no stop.
CREATE OR REPLACE FUNCTION report_probe_now(p_account text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_stop report_account_stops%ROWTYPE;
BEGIN
    UPDATE report_account_stops SET probe_at = least(probe_at, now()), until = NULL, updated_at = now()
     WHERE account = p_account
    RETURNING * INTO v_stop;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO report_events (request_id, account, state, attempts, error_code, error, actor, action)
    VALUES (NULL, p_account, 'account_stop', 0, v_stop.error_code, v_stop.reason,
            nullif(current_setting('report_worker.actor', true), ''), 'probe_now');
    PERFORM pg_notify('report_requests', 'probe');
    RETURN true;
END $$;

-- Inserts: as before, plus the batch counts.
CREATE OR REPLACE FUNCTION report_requests_record_inserts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO report_events (request_id, state, attempts, upstream_job_id, error_code, error)
    SELECT n.id, n.state, n.attempts, n.upstream_job_id, n.last_error_code, n.last_error FROM new_rows n;
    INSERT INTO report_state_counts AS c (state, slot, n)
    SELECT n.state, (pg_backend_pid() % 16)::smallint, count(*) FROM new_rows n
     GROUP BY n.state ORDER BY n.state
    ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO report_batches AS b (batch, last_id)
    SELECT n.batch, max(n.id) FROM new_rows n WHERE n.batch IS NOT NULL
     GROUP BY n.batch ORDER BY n.batch
    ON CONFLICT (batch) DO UPDATE SET last_id = greatest(b.last_id, excluded.last_id);
    INSERT INTO report_batch_counts AS c (batch, state, slot, n)
    SELECT n.batch, n.state, (pg_backend_pid() % 16)::smallint, count(*) FROM new_rows n
     WHERE n.batch IS NOT NULL
     GROUP BY n.batch, n.state ORDER BY n.batch, n.state
    ON CONFLICT (batch, state, slot) DO UPDATE SET n = c.n + excluded.n;
    PERFORM pg_notify('report_finished', json_build_object('id', n.id, 'state', n.state, 'batch', n.batch)::text)
       FROM new_rows n WHERE n.state IN ('succeeded', 'failed', 'cancelled');
    -- One notification per statement (a bulk load wakes the workers once).
    PERFORM pg_notify('report_requests', 'insert');
    RETURN NULL;
END $$;

-- Deletes: as before, plus the batch counts; a batch with no request left goes.
CREATE OR REPLACE FUNCTION report_requests_forget_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM report_events e USING old_rows o WHERE e.request_id = o.id;
    DELETE FROM report_webhook_deliveries w USING old_rows o WHERE w.request_id = o.id;
    INSERT INTO report_state_counts AS c (state, slot, n)
    SELECT o.state, (pg_backend_pid() % 16)::smallint, -count(*) FROM old_rows o
     GROUP BY o.state ORDER BY o.state
    ON CONFLICT (state, slot) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO report_batch_counts AS c (batch, state, slot, n)
    SELECT o.batch, o.state, (pg_backend_pid() % 16)::smallint, -count(*) FROM old_rows o
     WHERE o.batch IS NOT NULL
     GROUP BY o.batch, o.state ORDER BY o.batch, o.state
    ON CONFLICT (batch, state, slot) DO UPDATE SET n = c.n + excluded.n;
    WITH emptied AS (
             DELETE FROM report_batches b
              USING (SELECT DISTINCT batch FROM old_rows WHERE batch IS NOT NULL) g
              WHERE b.batch = g.batch
                AND NOT EXISTS (SELECT 1 FROM report_requests r WHERE r.batch IS NOT NULL AND r.batch = g.batch)
             RETURNING b.batch)
    DELETE FROM report_batch_counts c USING emptied e WHERE c.batch = e.batch;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION report_requests_forget_counts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM report_state_counts;
    DELETE FROM report_batch_counts;
    DELETE FROM report_batches;
    RETURN NULL;
END $$;

-- The batches already there, once (in the migration's transaction, with the table
-- locked against writers, like the state counts in migration 4).
DO $$
BEGIN
    LOCK TABLE report_requests IN SHARE ROW EXCLUSIVE MODE;
    IF NOT EXISTS (SELECT 1 FROM report_batches) THEN
        INSERT INTO report_batches (batch, last_id)
        SELECT batch, max(id) FROM report_requests WHERE batch IS NOT NULL GROUP BY batch;
        INSERT INTO report_batch_counts (batch, state, slot, n)
        SELECT batch, state, 0, count(*) FROM report_requests WHERE batch IS NOT NULL GROUP BY batch, state;
    END IF;
END $$;

-- Probing a stopped account is the engine's and the operators' (report_worker), not
-- every role's.
REVOKE EXECUTE ON FUNCTION report_probe_now(text) FROM PUBLIC;
