-- The queue, its documents, its history and the account-wide state shared by every worker.
-- Plain SQL, applied by `report-worker migrate` and by `sqlx migrate run`; every statement
-- is also safe to run twice by hand (IF NOT EXISTS / OR REPLACE).

CREATE TABLE IF NOT EXISTS report_requests (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- What the application asks for. '' means "not given"; see the constraints below.
    company_name        text,
    credit_code         text,
    org_number          text,
    report_type         text        NOT NULL,
    priority            smallint    NOT NULL DEFAULT 0,
    run_after           timestamptz NOT NULL DEFAULT now(),
    max_attempts        int         NOT NULL DEFAULT 3,
    dedupe_key          text,
    metadata            jsonb       NOT NULL DEFAULT '{}',
    -- What the worker reports.
    state               text        NOT NULL DEFAULT 'queued',
    attempts            int         NOT NULL DEFAULT 0,
    upstream_job_id     text,
    last_error_code     int,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    -- Engine bookkeeping (not part of the public contract).
    -- When the current upstream task was created: the start of its REPORT_WINDOW.
    upstream_created_at timestamptz,
    -- When a generating row's task is polled next (a snooze, not an attempt).
    next_poll_at        timestamptz,
    -- Polls of the current upstream task so far.
    polls               int         NOT NULL DEFAULT 0,
    -- Transient errors since the last successful step, and when that streak began:
    -- together they bound how long a row keeps retrying before it gives up.
    transient_errors    int         NOT NULL DEFAULT 0,
    transient_since     timestamptz,
    -- When last_error was last written; every new error is an event even if its text repeats.
    last_error_at       timestamptz,
    -- The claim: who holds the row, until when, and a fencing counter bumped by every
    -- claim, cancel and retry. Writes after an upstream call carry the token they claimed
    -- with, so a worker whose lease expired cannot overwrite a newer owner's work.
    lease_owner         text,
    lease_expires_at    timestamptz,
    lease_token         bigint      NOT NULL DEFAULT 0,

    CONSTRAINT report_requests_identifier_required CHECK (
        coalesce(company_name, '') <> '' OR coalesce(credit_code, '') <> '' OR coalesce(org_number, '') <> ''),
    CONSTRAINT report_requests_report_type_word_or_pdf CHECK (report_type IN ('word', 'pdf')),
    CONSTRAINT report_requests_company_name_no_control_chars CHECK (company_name !~ '[[:cntrl:]]'),
    CONSTRAINT report_requests_credit_code_no_control_chars CHECK (credit_code !~ '[[:cntrl:]]'),
    CONSTRAINT report_requests_org_number_no_control_chars CHECK (org_number !~ '[[:cntrl:]]'),
    CONSTRAINT report_requests_company_name_not_trimmed CHECK (company_name !~ '^[[:space:]\u00a0\u3000]|[[:space:]\u00a0\u3000]$'),
    CONSTRAINT report_requests_credit_code_not_trimmed CHECK (credit_code !~ '^[[:space:]\u00a0\u3000]|[[:space:]\u00a0\u3000]$'),
    CONSTRAINT report_requests_org_number_not_trimmed CHECK (org_number !~ '^[[:space:]\u00a0\u3000]|[[:space:]\u00a0\u3000]$'),
    CONSTRAINT report_requests_company_name_too_long CHECK (char_length(company_name) <= 200),
    CONSTRAINT report_requests_credit_code_not_18_digits_or_capitals CHECK (credit_code = '' OR credit_code ~ '^[0-9A-Z]{18}$'),
    CONSTRAINT report_requests_org_number_too_long CHECK (char_length(org_number) <= 32),
    CONSTRAINT report_requests_dedupe_key_too_long CHECK (char_length(dedupe_key) <= 255),
    CONSTRAINT report_requests_dedupe_key_no_control_chars CHECK (dedupe_key !~ '[[:cntrl:]]'),
    CONSTRAINT report_requests_max_attempts_out_of_range CHECK (max_attempts BETWEEN 1 AND 100),
    CONSTRAINT report_requests_metadata_not_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT report_requests_metadata_too_large CHECK (pg_column_size(metadata) <= 65536),
    CONSTRAINT report_requests_state_unknown CHECK (state IN ('queued', 'generating', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT report_requests_attempts_negative CHECK (attempts >= 0),
    CONSTRAINT report_requests_upstream_job_id_not_digits CHECK (upstream_job_id ~ '^[0-9]{1,20}$'),
    CONSTRAINT report_requests_generating_without_job CHECK (
        state <> 'generating' OR (upstream_job_id IS NOT NULL AND upstream_created_at IS NOT NULL AND next_poll_at IS NOT NULL))
);

CREATE UNIQUE INDEX IF NOT EXISTS report_requests_dedupe_key_key ON report_requests (dedupe_key);
-- The two claim paths, each a small partial index that only holds claimable work.
CREATE INDEX IF NOT EXISTS report_requests_queued_idx
    ON report_requests (priority, run_after, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS report_requests_generating_idx
    ON report_requests (next_poll_at, id) WHERE state = 'generating';

-- Finished documents, one per succeeded request. Reports are already compressed
-- (PDF streams, DOCX is a ZIP): EXTERNAL storage skips a pointless pglz attempt.
CREATE TABLE IF NOT EXISTS report_documents (
    request_id   bigint      PRIMARY KEY REFERENCES report_requests (id) ON DELETE CASCADE,
    content      bytea       NOT NULL,
    content_type text        NOT NULL,
    file_name    text        NOT NULL,
    byte_size    bigint      NOT NULL,
    sha256       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT report_documents_content_type_unknown CHECK (content_type IN (
        'application/pdf', 'application/vnd.openxmlformats-officedocument.wordprocessingml.document')),
    CONSTRAINT report_documents_sha256_not_hex CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    CONSTRAINT report_documents_byte_size_mismatch CHECK (byte_size = octet_length(content)),
    CONSTRAINT report_documents_file_name_invalid CHECK (file_name <> '' AND file_name !~ '[[:cntrl:]/\\]')
);
ALTER TABLE report_documents ALTER COLUMN content SET STORAGE EXTERNAL;

-- Append-only history: one row per state change or recorded error, written by the
-- statement triggers below, so changes made by hand in SQL are recorded too. No foreign
-- key: only the triggers write here, and a per-row key check would cost a third of a
-- bulk load; deleting requests deletes their events (trigger below).
CREATE TABLE IF NOT EXISTS report_events (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      bigint      NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    state           text        NOT NULL,
    previous_state  text,
    attempts        int         NOT NULL,
    upstream_job_id text,
    error_code      int,
    error           text
);
CREATE INDEX IF NOT EXISTS report_events_request_idx ON report_events (request_id, id);

-- The account-wide stop, shared by every worker process: while a row exists for an
-- account no worker calls the provider for it except for one probe at `probe_at`.
-- scope 'create' stops only new tasks (balance, quota: polls of paid tasks go on);
-- 'all' stops every call (credentials, permission, configuration, or polls refused too).
CREATE TABLE IF NOT EXISTS report_account_stops (
    account    text        PRIMARY KEY,
    scope      text        NOT NULL DEFAULT 'all' CONSTRAINT report_account_stops_scope_unknown CHECK (scope IN ('create', 'all')),
    reason     text        NOT NULL,
    error_code int,
    since      timestamptz NOT NULL DEFAULT now(),
    until      timestamptz,
    probe_at   timestamptz NOT NULL,
    probes     int         NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The account's shared call schedule: each call reserves the next free slot, spaced
-- 1/QPS apart, so every process together stays under the account's QPS without bursts.
CREATE TABLE IF NOT EXISTS report_account_pacing (
    account      text        PRIMARY KEY,
    next_slot_at timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION report_requests_record_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_events (request_id, state, attempts, upstream_job_id, error_code, error)
    SELECT n.id, n.state, n.attempts, n.upstream_job_id, n.last_error_code, n.last_error FROM new_rows n;
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
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION report_requests_forget_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM report_events e USING old_rows o WHERE e.request_id = o.id;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER report_requests_deleted
    AFTER DELETE ON report_requests REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION report_requests_forget_events();
CREATE OR REPLACE TRIGGER report_requests_inserted
    AFTER INSERT ON report_requests REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION report_requests_record_inserts();
CREATE OR REPLACE TRIGGER report_requests_updated
    AFTER UPDATE ON report_requests REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION report_requests_record_updates();

-- One row per state, zeros included, with the age of the oldest row in that state.
CREATE OR REPLACE VIEW report_queue_stats AS
SELECT s.state,
       count(r.id)                 AS count,
       now() - min(r.created_at)   AS oldest_age,
       min(r.created_at)           AS oldest_created_at
  FROM unnest(ARRAY['queued', 'generating', 'succeeded', 'failed', 'cancelled']) WITH ORDINALITY AS s (state, ord)
  LEFT JOIN report_requests r ON r.state = s.state
 GROUP BY s.state, s.ord
 ORDER BY s.ord;

-- Stops a queued or generating row. Bumping lease_token fences off a worker that holds
-- it right now: its next write finds a different token and changes nothing.
CREATE OR REPLACE FUNCTION report_cancel(p_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE report_requests
       SET state = 'cancelled', finished_at = now(), updated_at = now(), next_poll_at = NULL,
           lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1
     WHERE id = p_id AND state IN ('queued', 'generating');
    RETURN FOUND;
END $$;

-- Puts a failed or cancelled row back in the queue with fresh attempts, and wakes a worker.
CREATE OR REPLACE FUNCTION report_retry(p_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE report_requests
       SET state = 'queued', attempts = 0, run_after = now(), finished_at = NULL, updated_at = now(),
           upstream_job_id = NULL, upstream_created_at = NULL, next_poll_at = NULL, polls = 0,
           transient_errors = 0, transient_since = NULL,
           last_error = NULL, last_error_code = NULL, last_error_at = NULL,
           lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1
     WHERE id = p_id AND state IN ('failed', 'cancelled');
    IF FOUND THEN
        PERFORM pg_notify('report_requests', 'retry');
    END IF;
    RETURN FOUND;
END $$;
