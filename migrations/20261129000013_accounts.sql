-- Several accounts (UPSTREAM_ACCOUNTS): a row remembers which account its current task
-- was created with, because only that account may poll and download it. Set by the
-- create intent (in the same statement that commits the attempt), or to the orphan's
-- account when an orphaned task is adopted. NULL on rows created before this
-- migration: the first configured account polls those. Safe to run twice by hand.
ALTER TABLE report_requests ADD COLUMN IF NOT EXISTS account text;

-- The create intent for many rows, each naming the account it is about to create with.
-- One transaction: the account is written only to rows that are still the caller's and
-- have no create on the wire (a create sent before a cancel and retry keeps its
-- account), then each row is decided by report_begin_create_batch; a row that adopted an
-- orphan takes the orphan's account, whoever was about to create.
CREATE OR REPLACE FUNCTION report_begin_create_batch(
    p_ids bigint[], p_tokens bigint[], p_owner text, p_budget_secs float8,
    p_adopt_within_secs float8, p_first_poll_secs float8, p_accounts text[])
RETURNS TABLE (id bigint, outcome text, attempts int, unanswered int, job_id text,
               started_at timestamptz, wait_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    IF cardinality(p_accounts) IS DISTINCT FROM cardinality(p_ids) THEN
        RAISE EXCEPTION 'report_begin_create_batch: % ids but % accounts',
            cardinality(p_ids), cardinality(p_accounts);
    END IF;
    UPDATE report_requests q
       SET account = b.account
      FROM unnest(p_ids, p_tokens, p_accounts) AS b (id, token, account)
     WHERE q.id = b.id AND q.lease_token = b.token AND q.lease_owner = p_owner
       AND q.state || '' = 'queued' AND q.create_started_at IS NULL
       AND q.account IS DISTINCT FROM b.account;
    FOR d IN
        SELECT * FROM report_begin_create_batch(p_ids, p_tokens, p_owner, p_budget_secs,
                                                p_adopt_within_secs, p_first_poll_secs)
    LOOP
        IF d.outcome = 'adopted' THEN
            UPDATE report_requests q
               SET account = o.account
              FROM report_orphan_tasks o
             WHERE q.id = d.id AND o.request_id = d.id AND o.job_id = d.job_id;
        END IF;
        id := d.id; outcome := d.outcome; attempts := d.attempts; unanswered := d.unanswered;
        job_id := d.job_id; started_at := d.started_at; wait_until := d.wait_until;
        RETURN NEXT;
    END LOOP;
END $$;

REVOKE EXECUTE ON FUNCTION report_begin_create_batch(bigint[], bigint[], text, float8, float8, float8, text[]) FROM PUBLIC;
