-- The create intent for many rows in one statement (one commit), as the worker's
-- batched writer sends it. Each row is decided exactly as report_begin_create decides
-- it; the common case (still ours, no create in flight, no orphan to adopt, attempts
-- left) is done for all such rows in one set-based UPDATE, the rest row by row.
-- Safe to run twice by hand.
CREATE OR REPLACE FUNCTION report_begin_create_batch(
    p_ids bigint[], p_tokens bigint[], p_owner text, p_budget_secs float8,
    p_adopt_within_secs float8, p_first_poll_secs float8)
RETURNS TABLE (id bigint, outcome text, attempts int, unanswered int, job_id text,
               started_at timestamptz, wait_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    go_ids        bigint[];
    go_attempts   int[];
    go_unanswered int[];
BEGIN
    -- `q.state || ''` keeps the lookup on the primary key (see queue/outcomes.rs).
    WITH go AS (
        UPDATE report_requests q
           SET attempts = q.attempts + 1,
               create_started_at = now(), create_deadline = now() + p_budget_secs * interval '1 second',
               lease_expires_at = greatest(q.lease_expires_at, now() + p_budget_secs * interval '1 second'),
               updated_at = now()
          FROM unnest(p_ids, p_tokens) AS b (id, token)
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
    RETURN QUERY
        SELECT b.id, c.outcome, c.attempts, c.unanswered, c.job_id, c.started_at, c.wait_until
          FROM unnest(p_ids, p_tokens) AS b (id, token)
         CROSS JOIN LATERAL report_begin_create(b.id, b.token, p_owner, p_budget_secs,
                                                p_adopt_within_secs, p_first_poll_secs) AS c
         WHERE b.id <> ALL (coalesce(go_ids, '{}'));
END $$;
