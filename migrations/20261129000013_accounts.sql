-- Several accounts (UPSTREAM_ACCOUNTS): a row remembers which account its current task
-- was created with, because only that account may poll and download it. Set by the
-- create intent (in the same statement that commits the attempt), or to the orphan's
-- account when an orphaned task is adopted. NULL on rows created before this
-- migration: the first configured account polls those. Safe to run twice by hand.
ALTER TABLE report_requests ADD COLUMN IF NOT EXISTS account text;

-- The create intent for many rows, each naming the account it is about to create with:
-- report_begin_create_batch (migration 2) with the account written in the same UPDATE
-- that commits the attempt (one row version per create, as before). Rows the set-based
-- path does not take are decided one by one by report_begin_create, as before; of those,
-- one that goes takes the caller's account, one that adopted an orphan the orphan's.
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
    d             record;
BEGIN
    IF cardinality(p_accounts) IS DISTINCT FROM cardinality(p_ids) THEN
        RAISE EXCEPTION 'report_begin_create_batch: % ids but % accounts',
            cardinality(p_ids), cardinality(p_accounts);
    END IF;
    -- `q.state || ''` keeps the lookup on the primary key (see queue/outcomes.rs).
    WITH go AS (
        UPDATE report_requests q
           SET attempts = q.attempts + 1, account = b.account,
               create_started_at = now(), create_deadline = now() + p_budget_secs * interval '1 second',
               lease_expires_at = greatest(q.lease_expires_at, now() + p_budget_secs * interval '1 second'),
               updated_at = now()
          FROM unnest(p_ids, p_tokens, p_accounts) AS b (id, token, account)
         WHERE q.id = b.id AND q.lease_token = b.token AND q.lease_owner = p_owner
           AND q.lease_expires_at > now() AND q.state || '' = 'queued'
           AND q.create_started_at IS NULL AND q.attempts < q.max_attempts
           AND NOT EXISTS (SELECT 1 FROM report_orphan_tasks o
                            WHERE o.request_id = q.id AND o.adopted_at IS NULL)
        RETURNING q.id, q.attempts, q.unanswered_creates)
    SELECT array_agg(go.id), array_agg(go.attempts), array_agg(go.unanswered_creates)
      INTO go_ids, go_attempts, go_unanswered
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
        IF d.outcome = 'go' THEN
            UPDATE report_requests q SET account = d.row_account WHERE q.id = d.row_id;
        ELSIF d.outcome = 'adopted' THEN
            UPDATE report_requests q
               SET account = o.account
              FROM report_orphan_tasks o
             WHERE q.id = d.row_id AND o.request_id = d.row_id AND o.job_id = d.job_id;
        END IF;
        id := d.row_id; outcome := d.outcome; attempts := d.attempts;
        unanswered := d.unanswered; job_id := d.job_id; started_at := d.started_at;
        wait_until := d.wait_until;
        RETURN NEXT;
    END LOOP;
END $$;

REVOKE EXECUTE ON FUNCTION report_begin_create_batch(bigint[], bigint[], text, float8, float8, float8, text[]) FROM PUBLIC;
