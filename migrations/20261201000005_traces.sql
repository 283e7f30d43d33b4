-- One OpenTelemetry trace per request row (issue 24). Both columns are plain text, on no
-- index: writing them never costs an index entry, and an update that sets them stays HOT.
-- Safe to run twice by hand.
--
-- traceparent: the application's own trace, if it wants the report to join it: a W3C
-- `traceparent` (version 00, lowercase hex: 00-<32 trace id>-<16 parent span id>-<2
-- flags>) set at insert. The report's spans then carry the application's trace id, and
-- its root span is a child of the application's span. NULL: the report starts a trace of
-- its own.
--
-- trace_context: the report's own span (the root of everything the workers do for the
-- row), as a W3C traceparent: the trace id (the application's, when it gave one) and the
-- report span's id. Written by the first claim of a worker that exports traces, then
-- never changed (a retry of the row stays in the same trace); NULL while no worker has
-- exported traces for the row. Every process's spans for the row are its children.
ALTER TABLE report_requests
    ADD COLUMN IF NOT EXISTS traceparent text,
    ADD COLUMN IF NOT EXISTS trace_context text;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_traceparent_format') THEN
        -- NOT VALID: no scan of the table under its lock. The columns are new, NULL on
        -- every existing row, which the checks pass; every insert and update is checked.
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_traceparent_format
            CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                   AND substr(traceparent, 4, 32) <> repeat('0', 32)
                   AND substr(traceparent, 37, 16) <> repeat('0', 16)) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_trace_context_format') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_trace_context_format
            CHECK (trace_context ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') NOT VALID;
    END IF;
END $$;

COMMENT ON COLUMN report_requests.traceparent IS
    'The application''s W3C traceparent (00-<trace id>-<span id>-<flags>), if the report should join its trace';
COMMENT ON COLUMN report_requests.trace_context IS
    'The report''s own span as a W3C traceparent, set by the first claim of a worker that exports traces';

-- Random lowercase hex for trace and span ids, from random() (no extension, and no md5,
-- which a server in FIPS mode refuses).
CREATE OR REPLACE FUNCTION report_random_hex(digits integer) RETURNS text
    LANGUAGE sql VOLATILE PARALLEL RESTRICTED
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT left(string_agg(lpad(to_hex(floor(random() * 65536)::integer), 4, '0'), ''), digits)
      FROM generate_series(1, (digits + 3) / 4)
$$;

-- A finished row that comes back to life (report_retry, and report_retry_batch and the
-- dashboard through it) stays in its trace but gets a new report span: each life's
-- `report` span is exported once, when that life ends, never twice with one id. The
-- function as migration 20261201000001 left it, plus that one line in both of its
-- revivals (a row served again from its kept document finishes at once: no new life,
-- no new span). Not a trigger: a BEFORE UPDATE row trigger locks every updated row
-- first, a WAL record on every update of the table.
CREATE OR REPLACE FUNCTION report_retry(p_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r report_requests%ROWTYPE;
    o report_orphan_tasks%ROWTYPE;
BEGIN
    SELECT * INTO r FROM report_requests WHERE id = p_id AND state IN ('failed', 'cancelled') FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM report_documents WHERE request_id = p_id) THEN
        UPDATE report_requests
           SET state = 'succeeded', finished_at = now(), updated_at = now(), next_poll_at = NULL,
               last_error = NULL, last_error_code = NULL, last_error_at = NULL,
               lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1
         WHERE id = p_id;
        RETURN true;
    END IF;
    IF r.upstream_job_id IS NULL AND r.upstream_created_at IS NULL
       AND (r.create_deadline IS NULL OR r.create_deadline <= now()) THEN
        SELECT * INTO o FROM report_orphan_tasks t
         WHERE t.request_id = p_id AND t.adopted_at IS NULL
           -- Only a task some running worker can poll (its account configured).
           AND EXISTS (SELECT 1 FROM report_workers w
                        WHERE t.account = ANY (w.accounts) AND w.seen_at > now() - interval '1 minute')
         ORDER BY t.created_at DESC LIMIT 1
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            UPDATE report_orphan_tasks SET adopted_at = now() WHERE id = o.id;
            r.upstream_job_id := o.job_id;
            r.upstream_created_at := o.created_at;
            r.account := o.account;
        END IF;
    END IF;
    IF r.upstream_job_id IS NOT NULL AND r.upstream_created_at IS NOT NULL THEN
        UPDATE report_requests
           SET state = 'generating', next_poll_at = now(), finished_at = NULL, updated_at = now(),
               upstream_job_id = r.upstream_job_id, upstream_created_at = r.upstream_created_at,
               account = r.account,
               trace_context = '00-' || substr(trace_context, 4, 32) || '-' || report_random_hex(16) || '-01',
               run_after = now(), attempts = 1, unanswered_creates = 0, polls = 0, bad_downloads = 0,
               create_started_at = NULL, create_deadline = NULL, coalescing_since = NULL,
               transient_errors = 0, transient_since = NULL,
               last_error = NULL, last_error_code = NULL, last_error_at = NULL,
               lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1
         WHERE id = p_id;
        UPDATE report_orphan_tasks SET adopted_at = now()
         WHERE job_id = r.upstream_job_id AND adopted_at IS NULL;
    ELSE
        UPDATE report_requests
           SET state = 'queued', run_after = now(), finished_at = NULL, updated_at = now(),
               trace_context = '00-' || substr(trace_context, 4, 32) || '-' || report_random_hex(16) || '-01',
               attempts = CASE WHEN create_deadline > now() THEN 1 ELSE 0 END,
               unanswered_creates = 0, coalescing_since = NULL,
               create_started_at = CASE WHEN create_deadline > now() THEN create_started_at END,
               create_deadline = CASE WHEN create_deadline > now() THEN create_deadline END,
               upstream_job_id = NULL, upstream_created_at = NULL, next_poll_at = NULL, polls = 0,
               bad_downloads = 0, transient_errors = 0, transient_since = NULL,
               last_error = NULL, last_error_code = NULL, last_error_at = NULL,
               lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1
         WHERE id = p_id;
    END IF;
    PERFORM pg_notify('report_requests', 'retry');
    RETURN true;
END $$;
-- As every SECURITY DEFINER function: its own schema, then pg_temp last (migration
-- 20261201000003).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION report_retry(bigint) SET search_path = %I, pg_temp',
                   current_schema());
END $$;
