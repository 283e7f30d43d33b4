-- The three promises, kept under every fault: a row never causes more paid creates than
-- max_attempts (never two for one attempt), a row only ever gets a document the provider
-- made for its company and type (no older than it allows), every row ends or waits with
-- a reason and a bound. Safe to run twice by hand.

-- Creates sent for a row over all its lives that may have made a paid task: every
-- committed create intent, less those whose answer proved no task was made. Never reset
-- (report_retry starts a new life's `attempts`, not this). A fast default: no rewrite.
ALTER TABLE report_requests
    ADD COLUMN IF NOT EXISTS creates_sent integer NOT NULL DEFAULT 0,
    -- When the row began waiting for another row's task (coalescing); it waits at most
    -- REPORT_GIVE_UP_AFTER from then.
    ADD COLUMN IF NOT EXISTS coalescing_since timestamptz,
    -- The claim (lease token) that committed the current create intent: when the same
    -- claim asks again — its first ask committed but the answer was lost on the way
    -- back, so nothing was sent — it gets the same intent back instead of waiting for a
    -- create that never left.
    ADD COLUMN IF NOT EXISTS create_token bigint;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_creates_sent_negative') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_creates_sent_negative
            CHECK (creates_sent >= 0) NOT VALID;
    END IF;
END $$;

-- A document's age is the time since its bytes came from the provider: a reuse copy
-- carries its source's `downloaded_at`, so copies of copies age like the original.
-- Documents stored before this migration have none: their `created_at` stands in.
-- `provider_company`: the company the provider's file name names, read before the name
-- was made safe to store, NULL when making it safe changed it (a '/' in the company's
-- name, say) or it has no single '_': such a name teaches nothing.
ALTER TABLE report_documents
    ADD COLUMN IF NOT EXISTS downloaded_at timestamptz,
    ADD COLUMN IF NOT EXISTS provider_company text;
ALTER TABLE report_documents ALTER COLUMN downloaded_at SET DEFAULT now();

-- The spend ledger's durable half: creates per account and provider day (Asia/Shanghai,
-- the day the create was sent), counted by the very statements that commit them, so a
-- killed process loses none. `sent`: create intents committed (each one create call at
-- most); `tasks`: job ids received; `refunded`: creates whose answer proved no task was
-- made. Whatever is left (sent - tasks - refunded) got no usable answer: each may be a
-- paid task at the provider that no job id here records. 16 slots per account and day
-- (one per writer backend modulo 16), so writers do not queue on one row.
CREATE TABLE IF NOT EXISTS report_create_counts (
    day      date     NOT NULL,
    account  text     NOT NULL,
    slot     smallint NOT NULL,
    sent     bigint   NOT NULL DEFAULT 0,
    tasks    bigint   NOT NULL DEFAULT 0,
    refunded bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (day, account, slot)
) WITH (fillfactor = 50);

-- The create intent, in one guarded statement, before any create is sent (see migration
-- 1 for the outcomes). A create that goes counts in `creates_sent` and in
-- report_create_counts (`sent`), in the same statement that commits its attempt.
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
        IF r.create_deadline > now() AND r.create_token = p_token THEN
            -- This very claim asked before, and that ask committed: its answer was lost,
            -- so nothing was sent. The same intent (and attempt) goes.
            RETURN QUERY SELECT 'go'::text, r.attempts, r.unanswered_creates, NULL::text,
                                r.create_started_at, NULL::timestamptz;
            RETURN;
        END IF;
        IF r.create_deadline > now() THEN
            RETURN QUERY SELECT 'wait'::text, r.attempts, r.unanswered_creates, NULL::text,
                                r.create_started_at, r.create_deadline;
            RETURN;
        END IF;
        -- Its sender died or gave up: that create stays spent (and, in the ledger, one
        -- without a usable answer).
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
               bad_downloads = 0, account = o.account, coalescing_since = NULL,
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
           creates_sent = q.creates_sent + 1, create_token = p_token,
           create_started_at = now(), create_deadline = now() + p_budget_secs * interval '1 second',
           lease_expires_at = greatest(q.lease_expires_at, now() + p_budget_secs * interval '1 second'),
           updated_at = now()
     WHERE q.id = p_id;
    RETURN QUERY SELECT 'go'::text, r.attempts + 1, r.unanswered_creates, NULL::text, now(),
                        NULL::timestamptz;
END $$;

-- The create intent for many rows, each naming the account it is about to create with
-- (migration 13), counting what goes: `creates_sent` on each row and `sent` in
-- report_create_counts, in the statement that commits the attempts.
CREATE OR REPLACE FUNCTION report_begin_create_batch(
    p_ids bigint[], p_tokens bigint[], p_owner text, p_budget_secs float8,
    p_adopt_within_secs float8, p_first_poll_secs float8, p_accounts text[])
RETURNS TABLE (id bigint, outcome text, attempts int, unanswered int, job_id text,
               started_at timestamptz, wait_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    go_ids        bigint[];
    go_attempts   int[];
    go_unanswered int[];
    go_accounts   text[];
    d             record;
BEGIN
    IF cardinality(p_accounts) IS DISTINCT FROM cardinality(p_ids) THEN
        RAISE EXCEPTION 'report_begin_create_batch: % ids but % accounts',
            cardinality(p_ids), cardinality(p_accounts);
    END IF;
    -- `q.state || ''` keeps the lookup on the primary key (see queue/outcomes.rs).
    WITH go AS (
        UPDATE report_requests q
           SET attempts = q.attempts + 1, account = b.account, creates_sent = q.creates_sent + 1,
               create_token = b.token,
               create_started_at = now(), create_deadline = now() + p_budget_secs * interval '1 second',
               lease_expires_at = greatest(q.lease_expires_at, now() + p_budget_secs * interval '1 second'),
               updated_at = now()
          FROM unnest(p_ids, p_tokens, p_accounts) AS b (id, token, account)
         WHERE q.id = b.id AND q.lease_token = b.token AND q.lease_owner = p_owner
           AND q.lease_expires_at > now() AND q.state || '' = 'queued'
           AND q.create_started_at IS NULL AND q.attempts < q.max_attempts
           AND NOT EXISTS (SELECT 1 FROM report_orphan_tasks o
                            WHERE o.request_id = q.id AND o.adopted_at IS NULL
                              AND o.created_at > now() - p_adopt_within_secs * interval '1 second')
        RETURNING q.id, q.attempts, q.unanswered_creates, q.account)
    SELECT array_agg(go.id), array_agg(go.attempts), array_agg(go.unanswered_creates),
           array_agg(go.account)
      INTO go_ids, go_attempts, go_unanswered, go_accounts
      FROM go;
    RETURN QUERY
        SELECT g.id, 'go'::text, g.attempts, g.unanswered, NULL::text, now(), NULL::timestamptz
          FROM unnest(go_ids, go_attempts, go_unanswered) AS g (id, attempts, unanswered);
    FOR d IN
        SELECT b.id AS row_id, b.account AS row_account, c.*
          FROM unnest(p_ids, p_tokens, p_accounts) AS b (id, token, account)
         CROSS JOIN LATERAL report_begin_create(b.id, b.token, p_owner, p_budget_secs,
                                                p_adopt_within_secs, p_first_poll_secs) AS c
         WHERE b.id <> ALL (coalesce(go_ids, '{}'))
    LOOP
        -- A repeated go (the same claim's intent, asked again) was counted when it
        -- committed first.
        IF d.outcome = 'go' AND d.started_at = now() THEN
            UPDATE report_requests q SET account = d.row_account WHERE q.id = d.row_id;
            go_accounts := go_accounts || d.row_account;
        END IF;
        id := d.row_id; outcome := d.outcome; attempts := d.attempts;
        unanswered := d.unanswered; job_id := d.job_id; started_at := d.started_at;
        wait_until := d.wait_until;
        RETURN NEXT;
    END LOOP;
    INSERT INTO report_create_counts AS c (day, account, slot, sent)
    SELECT (now() AT TIME ZONE 'Asia/Shanghai')::date, a, (pg_backend_pid() % 16)::smallint, count(*)
      FROM unnest(go_accounts) AS a
     GROUP BY a ORDER BY a
    ON CONFLICT (day, account, slot) DO UPDATE SET sent = c.sent + excluded.sent;
END $$;

REVOKE EXECUTE ON FUNCTION report_begin_create_batch(bigint[], bigint[], text, float8, float8, float8, text[]) FROM PUBLIC;

-- Puts a failed or cancelled row back to work, keeping what was paid for, and wakes a
-- worker:
-- - a document already stored for it (one that arrived just after a cancel) serves it:
--   the row is `succeeded` at once, with no provider call;
-- - else its task, when it has one the provider may still finish (cancelled while
--   generating, failed by transient trouble or because a live task was given up):
--   `generating` again, polled at once, that task counting as the new life's first
--   attempt — no new task is bought unless the provider says this one is lost;
-- - else a create still on the wire (sent before a cancel) keeps its intent and counts
--   as the first attempt (migration 1): `queued`, and the task is adopted when it comes;
-- - else the newest paid task of the row that no row took (its job id arrived after a
--   cancel, however long ago): `generating` with it, as above;
-- - else `queued` with fresh attempts.
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

-- Learning identities from what the provider named, read before any sanitising
-- (`provider_company`, set by the worker), never from the stored, sanitised file name:
-- a company named '甲/乙公司' came back as the file '甲/乙公司_….pdf', whose stored name
-- is '乙公司_….pdf' — read from that, it taught that 甲/乙公司 is 乙公司.
CREATE OR REPLACE FUNCTION report_documents_learn_identity() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('report_worker.action', true), '') = 'reuse' THEN
        RETURN NULL;
    END IF;
    INSERT INTO report_identities AS r (kind, value, company_name, observations, last_request)
    SELECT kind, value, company, count(*), max(request_id)
      FROM (SELECT CASE WHEN nullif(q.company_name, '') IS NOT NULL THEN 'company_name'
                        WHEN nullif(q.credit_code, '') IS NOT NULL THEN 'credit_code'
                        ELSE 'org_number' END AS kind,
                   coalesce(nullif(q.company_name, ''), nullif(q.credit_code, ''), nullif(q.org_number, '')) AS value,
                   nullif(btrim(n.provider_company), '') AS company, n.request_id
              FROM new_documents n JOIN report_requests q ON q.id = n.request_id
             WHERE num_nonnulls(nullif(q.company_name, ''), nullif(q.credit_code, ''), nullif(q.org_number, '')) = 1) s
     WHERE company IS NOT NULL
     GROUP BY kind, value, company
     ORDER BY kind, value, company
    ON CONFLICT (kind, value, company_name) DO UPDATE
       SET observations = r.observations + EXCLUDED.observations, last_seen = now(),
           last_request = EXCLUDED.last_request;
    RETURN NULL;
END $$;

-- Every link learned so far was read from sanitised file names (migration 14), and the
-- raw names were never kept: none of them can be trusted to be the provider's own
-- words. They are forgotten; learning starts again from the next downloads. (Reuse of
-- exactly the same identifier needs no link and goes on as before.)
TRUNCATE report_identities;

-- The worker processes at work, and the accounts each polls with: every `run` process
-- says so every few seconds (and removes its line when it stops). A generating row
-- whose account no process seen in the last minute polls waits for nobody.
CREATE TABLE IF NOT EXISTS report_workers (
    owner            text        PRIMARY KEY,
    accounts         text[]      NOT NULL,
    -- It also polls tasks created before accounts were recorded (its first account).
    polls_unrecorded boolean     NOT NULL DEFAULT false,
    started_at       timestamptz NOT NULL DEFAULT now(),
    seen_at          timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- Generating rows that no running worker can poll, per account (their poll overdue by
-- a minute at least): the account was removed from every worker's UPSTREAM_ACCOUNTS,
-- or every worker with it is down. Workers release such rows after
-- REPORT_GIVE_UP_AFTER (their task kept in report_orphan_tasks, a new one bought).
CREATE OR REPLACE VIEW report_unpolled_accounts AS
SELECT r.account, count(*) AS rows, min(r.next_poll_at) AS oldest_due
  FROM report_requests r
 WHERE r.state = 'generating' AND r.next_poll_at < now() - interval '1 minute'
   AND NOT EXISTS (SELECT 1 FROM report_workers w
                    WHERE w.seen_at > now() - interval '1 minute'
                      AND (r.account = ANY (w.accounts) OR (r.account IS NULL AND w.polls_unrecorded)))
 GROUP BY r.account;

-- Creates per account and day as the ledger counts them: sent, answered with a job id
-- (paid tasks), given back (their answer proved no task was made), and the rest — no
-- usable answer yet or ever (each may be a paid task without a job id here; creates on
-- the wire right now are among them until answered).
CREATE OR REPLACE VIEW report_create_ledger AS
SELECT account, day, sum(sent)::bigint AS sent, sum(tasks)::bigint AS tasks,
       sum(refunded)::bigint AS refunded, (sum(sent) - sum(tasks) - sum(refunded))::bigint AS unknown
  FROM report_create_counts
 GROUP BY account, day;

-- The ledger (migration 10's columns, unchanged): paid tasks and creates without a
-- usable answer now come from report_create_counts, counted durably as they happen; the
-- other calls from the workers' per-minute counts (added every 5 s, so a killed process
-- loses its last few seconds of those). Days from before report_create_counts existed
-- keep the call counts.
CREATE OR REPLACE VIEW report_ledger AS
WITH calls AS (
    SELECT account, day,
           sum(n) FILTER (WHERE endpoint = 'create' AND outcome = 'ok') AS paid_tasks,
           sum(n) FILTER (WHERE endpoint = 'create' AND outcome = 'unanswered') AS unknown_creates,
           sum(n) FILTER (WHERE endpoint = 'download' AND outcome = 'ok') AS documents,
           sum(n) FILTER (WHERE endpoint = 'reuse') AS reuse_hits,
           sum(n) FILTER (WHERE outcome = 'rate_limited') AS rate_limited,
           sum(n) FILTER (WHERE endpoint <> 'reuse') AS calls,
           coalesce(jsonb_object_agg(endpoint || ':' || outcome, n ORDER BY endpoint, outcome)
                    FILTER (WHERE endpoint <> 'reuse'), '{}') AS calls_by_outcome
      FROM report_provider_calls_daily GROUP BY account, day),
orphans AS (
    SELECT account, (created_at AT TIME ZONE 'Asia/Shanghai')::date AS day, count(*) AS orphans
      FROM report_orphan_tasks GROUP BY 1, 2),
days AS (
    SELECT account, day FROM calls UNION SELECT account, day FROM orphans
    UNION SELECT account, day FROM report_create_ledger)
SELECT d.account, d.day,
       coalesce(cr.tasks, c.paid_tasks, 0)::bigint AS paid_tasks,
       coalesce(cr.unknown, c.unknown_creates, 0)::bigint AS unknown_creates,
       coalesce(c.documents, 0)::bigint AS documents,
       coalesce(c.reuse_hits, 0)::bigint AS reuse_hits,
       coalesce(o.orphans, 0)::bigint AS orphans,
       coalesce(c.rate_limited, 0)::bigint AS rate_limited,
       coalesce(c.calls, 0)::bigint AS calls,
       coalesce(c.calls_by_outcome, '{}'::jsonb) AS calls_by_outcome
  FROM days d
  LEFT JOIN calls c ON c.account = d.account AND c.day = d.day
  LEFT JOIN orphans o ON o.account = d.account AND o.day = d.day
  LEFT JOIN report_create_ledger cr ON cr.account = d.account AND cr.day = d.day;
