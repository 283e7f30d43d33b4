-- Spend safety: a row never pays for more upstream tasks than max_attempts, and never two
-- for one attempt. Every create is preceded by a committed intent (the attempt is counted
-- before the request leaves); a task whose job id cannot be written to its row is kept
-- in report_orphan_tasks, and adopted by its row when the row waits for a task again.
-- Safe to run twice by hand.

ALTER TABLE report_requests
    -- A create may be on the wire since this time (the intent), and will have been
    -- answered or given up by create_deadline. Both NULL when no create is in flight.
    ADD COLUMN IF NOT EXISTS create_started_at  timestamptz,
    ADD COLUMN IF NOT EXISTS create_deadline    timestamptz,
    -- Creates of this row's current life that got no usable answer: each may have made a
    -- paid task at the provider that no job id here records.
    ADD COLUMN IF NOT EXISTS unanswered_creates int NOT NULL DEFAULT 0;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_create_intent_incomplete') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_create_intent_incomplete
            CHECK ((create_started_at IS NULL) = (create_deadline IS NULL));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_unanswered_creates_negative') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_unanswered_creates_negative
            CHECK (unanswered_creates >= 0);
    END IF;
END $$;

-- Paid tasks whose job id could not be written to their row: the row was cancelled or
-- taken over while the create was on the wire, or the write failed. Kept, never lost:
-- operators see the waste here, and a row that waits for a task again adopts its orphan
-- instead of buying a new one.
CREATE TABLE IF NOT EXISTS report_orphan_tasks (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      text        NOT NULL,
    -- No foreign key: the record outlives a deleted request.
    request_id  bigint      NOT NULL,
    account     text        NOT NULL,
    report_type text        NOT NULL,
    -- When the task's job id arrived (the task was created just before).
    created_at  timestamptz NOT NULL DEFAULT now(),
    reason      text        NOT NULL,
    -- When its row took it over (then it is no longer wasted).
    adopted_at  timestamptz,
    CONSTRAINT report_orphan_tasks_job_id_not_digits CHECK (job_id ~ '^[0-9]{1,20}$'),
    CONSTRAINT report_orphan_tasks_job_id_key UNIQUE (job_id)
);
CREATE INDEX IF NOT EXISTS report_orphan_tasks_waiting_idx
    ON report_orphan_tasks (request_id, created_at) WHERE adopted_at IS NULL;

-- The create intent, in one guarded statement, before any create is sent. The row must
-- still be ours (token, owner, unexpired lease) and queued; then, in order:
--   'wait'      a create sent before a cancel and retry is still on the wire: wait for it
--               (until wait_until), its job id will be adopted when it arrives;
--   (an intent whose deadline passed means its sender died: that attempt stays spent
--    and is counted as unanswered)
--   'adopted'   an orphaned task of this row (younger than p_adopt_within_secs) becomes
--               its task: the row is generating, no new task is bought;
--   'exhausted' attempts are spent: the caller fails the row;
--   'go'        attempts + 1 is committed, the intent recorded, the lease extended to
--               cover the create: the caller may send it now;
--   'lost'      the row is no longer ours: no call.
CREATE OR REPLACE FUNCTION report_begin_create(
    p_id bigint, p_token bigint, p_owner text, p_budget_secs float8,
    p_adopt_within_secs float8, p_first_poll_secs float8)
RETURNS TABLE (outcome text, attempts int, unanswered int, job_id text, started_at timestamptz,
               wait_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    r report_requests%ROWTYPE;
    o report_orphan_tasks%ROWTYPE;
BEGIN
    SELECT * INTO r FROM report_requests q
     WHERE q.id = p_id AND q.lease_token = p_token AND q.lease_owner = p_owner
       AND q.lease_expires_at > now() AND q.state = 'queued'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost'::text, NULL::int, NULL::int, NULL::text, NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    IF r.create_started_at IS NOT NULL THEN
        IF r.create_deadline > now() THEN
            RETURN QUERY SELECT 'wait'::text, r.attempts, r.unanswered_creates, NULL::text,
                                r.create_started_at, r.create_deadline;
            RETURN;
        END IF;
        r.unanswered_creates := r.unanswered_creates + 1;
    END IF;
    UPDATE report_orphan_tasks t SET adopted_at = now()
     WHERE t.id = (SELECT x.id FROM report_orphan_tasks x
                    WHERE x.request_id = p_id AND x.adopted_at IS NULL
                      AND x.created_at > now() - p_adopt_within_secs * interval '1 second'
                    ORDER BY x.created_at DESC LIMIT 1
                      FOR UPDATE SKIP LOCKED)
    RETURNING t.* INTO o;
    IF FOUND THEN
        UPDATE report_requests q
           SET state = 'generating', upstream_job_id = o.job_id, upstream_created_at = o.created_at,
               next_poll_at = greatest(now(), o.created_at + p_first_poll_secs * interval '1 second'),
               attempts = r.attempts + 1, unanswered_creates = r.unanswered_creates, polls = 0,
               create_started_at = NULL, create_deadline = NULL,
               transient_errors = 0, transient_since = NULL,
               lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE q.id = p_id;
        RETURN QUERY SELECT 'adopted'::text, r.attempts + 1, r.unanswered_creates, o.job_id,
                            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    IF r.attempts >= r.max_attempts THEN
        UPDATE report_requests q
           SET unanswered_creates = r.unanswered_creates, create_started_at = NULL, create_deadline = NULL
         WHERE q.id = p_id;
        RETURN QUERY SELECT 'exhausted'::text, r.attempts, r.unanswered_creates, NULL::text,
                            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE report_requests q
       SET attempts = r.attempts + 1, unanswered_creates = r.unanswered_creates,
           create_started_at = now(), create_deadline = now() + p_budget_secs * interval '1 second',
           lease_expires_at = greatest(q.lease_expires_at, now() + p_budget_secs * interval '1 second'),
           updated_at = now()
     WHERE q.id = p_id;
    RETURN QUERY SELECT 'go'::text, r.attempts + 1, r.unanswered_creates, NULL::text, now(),
                        NULL::timestamptz;
END $$;

-- Puts a failed or cancelled row back in the queue with fresh attempts, and wakes a worker.
-- A create still on the wire (sent before a cancel) keeps its intent and counts as the
-- first attempt: its job id is adopted when it arrives instead of a second task bought.
CREATE OR REPLACE FUNCTION report_retry(p_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE report_requests
       SET state = 'queued', run_after = now(), finished_at = NULL, updated_at = now(),
           attempts = CASE WHEN create_deadline > now() THEN 1 ELSE 0 END,
           unanswered_creates = 0,
           create_started_at = CASE WHEN create_deadline > now() THEN create_started_at END,
           create_deadline = CASE WHEN create_deadline > now() THEN create_deadline END,
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
