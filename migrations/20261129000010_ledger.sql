-- The ledger: provider calls per account and day as the provider counts days
-- (Asia/Shanghai), kept as long as the requests are (the per-minute counts go after 8
-- days), and a view of what each day cost. Safe to run twice by hand.

CREATE TABLE IF NOT EXISTS report_provider_calls_daily (
    day      date   NOT NULL,
    account  text   NOT NULL,
    endpoint text   NOT NULL,
    outcome  text   NOT NULL,
    n        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, account, endpoint, outcome)
);

-- The days already counted per minute, once.
INSERT INTO report_provider_calls_daily (day, account, endpoint, outcome, n)
SELECT (minute AT TIME ZONE 'Asia/Shanghai')::date, account, endpoint, outcome, sum(n)
  FROM report_provider_calls GROUP BY 1, 2, 3, 4
ON CONFLICT DO NOTHING;

-- One line per account and day: paid tasks (creates answered with a job id), creates
-- with no usable answer (each may be a paid task without a job id here), documents
-- downloaded, rows served by reusing a stored document (no call), paid tasks kept as
-- orphans, "too fast" answers (67200002), provider calls in all and by endpoint:outcome.
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
      FROM report_orphan_tasks GROUP BY 1, 2)
SELECT coalesce(c.account, o.account) AS account,
       coalesce(c.day, o.day) AS day,
       coalesce(c.paid_tasks, 0)::bigint AS paid_tasks,
       coalesce(c.unknown_creates, 0)::bigint AS unknown_creates,
       coalesce(c.documents, 0)::bigint AS documents,
       coalesce(c.reuse_hits, 0)::bigint AS reuse_hits,
       coalesce(o.orphans, 0)::bigint AS orphans,
       coalesce(c.rate_limited, 0)::bigint AS rate_limited,
       coalesce(c.calls, 0)::bigint AS calls,
       coalesce(c.calls_by_outcome, '{}'::jsonb) AS calls_by_outcome
  FROM calls c FULL JOIN orphans o ON o.account = c.account AND o.day = c.day;
