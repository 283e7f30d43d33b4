-- Fair share between batches, and a forecast of when each batch finishes (issue 25).
-- Safe to run twice by hand.

-- Within one priority, claims take queued rows round-robin across the groups that have
-- work: each batch, and every row without a batch as one more group. A batch's weight
-- is its share of that round (2 takes two rows for every one of a batch of weight 1).
ALTER TABLE report_batches ADD COLUMN IF NOT EXISTS weight real NOT NULL DEFAULT 1;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_batches_weight_out_of_range') THEN
        ALTER TABLE report_batches ADD CONSTRAINT report_batches_weight_out_of_range
            CHECK (weight >= 0.01 AND weight <= 1000);
    END IF;
END $$;
COMMENT ON COLUMN report_batches.weight IS
    'The batch''s share of the claims among the batches with queued rows of the same priority (1 = equal); set with report_set_batch_weight';

-- The claim's index: queued rows by group, then the order they are claimed in within it.
-- It replaces report_requests_queued_idx, (priority, run_after, id) over the same rows:
-- a queue with one group (no batches) is claimed from it in exactly that order.
CREATE INDEX IF NOT EXISTS report_requests_queued_fair_idx
    ON report_requests ((coalesce(batch, '')), priority, run_after, id) WHERE state = 'queued';
DROP INDEX IF EXISTS report_requests_queued_idx;

CREATE OR REPLACE FUNCTION report_set_batch_weight(p_batch text, p_weight real) RETURNS real
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF p_weight IS NULL OR NOT (p_weight >= 0.01 AND p_weight <= 1000) THEN
        RAISE EXCEPTION 'report_set_batch_weight: the weight of batch % must be between 0.01 and 1000, not %',
            p_batch, coalesce(p_weight::text, 'NULL')
            USING ERRCODE = 'check_violation', CONSTRAINT = 'report_batches_weight_out_of_range';
    END IF;
    UPDATE report_batches SET weight = p_weight WHERE batch = p_batch;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'report_set_batch_weight: no batch named % (a batch exists once a row names it)',
            coalesce(p_batch, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM pg_notify('report_requests', 'weight');
    RETURN p_weight;
END $$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION report_set_batch_weight(text, real) SET search_path = %I, pg_temp',
                   current_schema());
END $$;
REVOKE EXECUTE ON FUNCTION report_set_batch_weight(text, real) FROM PUBLIC;

-- What each running worker may spend, per account, for the forecast: its QPS (0 = no
-- limit), its daily create limit and the part of it kept for retries (null = none).
-- Written with the worker's heartbeat: {"account": {"qps": 5, "daily_limit": 1000,
-- "headroom": 50}, ...}.
ALTER TABLE report_workers ADD COLUMN IF NOT EXISTS account_limits jsonb NOT NULL DEFAULT '{}';

-- The forecast of every open batch (one with queued or generating rows) as seen at
-- `p_at`: the view report_batch_forecast is this at now(). Every input is a row the
-- workers keep anyway:
--   * capacity: the provider calls per second of the accounts live workers use (their
--     QPS; where one has none, the calls the workers made in the last 10 minutes);
--   * per report, from the batch's own first finished rows (up to 200 of its first
--     1,000): the calls it took (creates + polls), the share served from a stored
--     document (no paid task), the time from its task's create to its end; for a batch
--     that has none yet, the whole queue's last hour, then defaults (6 calls, 300 s);
--   * fair share: every open group (each batch, and the rows without one) gets capacity
--     in proportion to its weight until its last create (generalised processor sharing:
--     a group that runs out hands its share to the others);
--   * the daily create limit (less what is kept for retries) left on the account's
--     provider day (Asia/Shanghai) and on the days after it: the creates every group
--     makes before this batch's last one decide the day it ends on.
-- Priorities are not modelled (every group is taken as one priority), nor failures.
CREATE OR REPLACE FUNCTION report_batch_forecast_at(p_at timestamptz)
RETURNS TABLE (
    batch text, weight real, share float8,
    queued bigint, generating bigint, succeeded bigint, failed bigint, cancelled bigint,
    calls_per_report float8, served_share float8, seconds_per_report float8,
    creates_left bigint, calls_left bigint, calls_per_second float8,
    runs_into_daily_limit_at timestamptz, provider_days integer,
    finish_at timestamptz, limited_by text)
LANGUAGE sql STABLE SECURITY DEFINER SET jit = off AS $$
WITH live AS (
    SELECT l.key AS account,
           max(coalesce((l.value ->> 'qps')::float8, 0)) AS qps,
           bool_or(coalesce((l.value ->> 'qps')::float8, 0) <= 0) AS unpaced,
           min((l.value ->> 'daily_limit')::bigint) AS daily_limit,
           max(coalesce((l.value ->> 'headroom')::bigint, 0)) AS headroom
      FROM report_workers w, jsonb_each(w.account_limits) l
     WHERE w.seen_at > p_at - interval '1 minute' AND w.seen_at <= p_at + interval '1 minute'
     GROUP BY l.key),
stops AS (
    SELECT l.account, s.until
      FROM live l JOIN report_account_stops s ON s.account = l.account
     WHERE s.since <= p_at AND (s.until IS NULL OR s.until > p_at)),
start AS (
    -- Creates can begin now if an account is not stopped, else when the first stop ends.
    SELECT CASE WHEN EXISTS (SELECT 1 FROM live l WHERE NOT EXISTS (SELECT 1 FROM stops s WHERE s.account = l.account))
                THEN p_at
                ELSE (SELECT min(until) FROM stops) END AS t0),
day AS (
    SELECT (t0 AT TIME ZONE 'Asia/Shanghai')::date AS today,
           ((((t0 AT TIME ZONE 'Asia/Shanghai')::date + 1)::timestamp) AT TIME ZONE 'Asia/Shanghai') AS next_midnight
      FROM start),
quota AS (
    -- Creates for new rows left on t0's provider day, and per later day; NULL when an
    -- account has no daily limit (no limit to run into).
    SELECT CASE WHEN bool_and(l.daily_limit IS NOT NULL) THEN
                sum(greatest(0, l.daily_limit - l.headroom - coalesce(u.used, 0))) END AS left_today,
           CASE WHEN bool_and(l.daily_limit IS NOT NULL) THEN
                sum(greatest(0, l.daily_limit - l.headroom)) END AS per_day
      FROM live l CROSS JOIN day d
      LEFT JOIN report_daily_creates u ON u.account = l.account AND u.day = d.today
     WHERE NOT EXISTS (SELECT 1 FROM stops s WHERE s.account = l.account AND s.until IS NULL)),
capacity AS (
    SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM live) THEN NULL
                WHEN (SELECT bool_or(unpaced) FROM live) THEN
                     (SELECT nullif(sum(c.n), 0) / 600.0 FROM report_provider_calls c
                       WHERE c.minute >= p_at - interval '10 minutes' AND c.minute < p_at
                         AND c.endpoint IN ('create', 'status'))
                ELSE (SELECT sum(l.qps) FROM live l
                       WHERE NOT EXISTS (SELECT 1 FROM stops s WHERE s.account = l.account AND s.until IS NULL))
           END AS calls_per_second),
queue_hour AS (
    SELECT (SELECT sum(c.n) FROM report_provider_calls c
             WHERE c.minute >= p_at - interval '1 hour' AND c.minute < p_at AND c.endpoint IN ('create', 'status'))::float8
           / nullif((SELECT sum(f.n) FROM report_finished_minutes f
                      WHERE f.minute >= p_at - interval '1 hour' AND f.minute < p_at AND f.state = 'succeeded'), 0)
           AS calls_per_report,
           (SELECT avg(g.upper_secs) FROM (SELECT t.upper_secs FROM report_generation_times t
                                            ORDER BY t.id DESC LIMIT 200) g)::float8 AS generation_secs),
batch_counts AS (
    SELECT c.batch,
           sum(c.n) FILTER (WHERE c.state = 'queued')::bigint AS queued,
           sum(c.n) FILTER (WHERE c.state = 'generating')::bigint AS generating,
           sum(c.n) FILTER (WHERE c.state = 'succeeded')::bigint AS succeeded,
           sum(c.n) FILTER (WHERE c.state = 'failed')::bigint AS failed,
           sum(c.n) FILTER (WHERE c.state = 'cancelled')::bigint AS cancelled
      FROM report_batch_counts c GROUP BY c.batch),
groups AS (
    -- Every open batch, and the rows without a batch as one group ('' here, NULL out).
    SELECT b.batch AS key, coalesce(rb.weight, 1) AS weight, coalesce(b.queued, 0) AS queued,
           coalesce(b.generating, 0) AS generating, coalesce(b.succeeded, 0) AS succeeded,
           coalesce(b.failed, 0) AS failed, coalesce(b.cancelled, 0) AS cancelled
      FROM batch_counts b LEFT JOIN report_batches rb ON rb.batch = b.batch
     WHERE coalesce(b.queued, 0) + coalesce(b.generating, 0) > 0
    UNION ALL
    SELECT '', 1, greatest(0, s.queued - coalesce((SELECT sum(queued) FROM batch_counts), 0)), 0, 0, 0, 0
      FROM (SELECT coalesce(sum(n) FILTER (WHERE state = 'queued'), 0)::bigint AS queued
              FROM report_state_counts) s),
sampled AS (
    SELECT g.*, o.finished, o.calls_per_report AS own_calls, o.served_share, o.seconds_per_report AS own_secs
      FROM groups g
      LEFT JOIN LATERAL (
          SELECT count(*) AS finished,
                 avg(r.creates_sent + r.polls) FILTER (WHERE r.creates_sent > 0)::float8 AS calls_per_report,
                 (count(*) FILTER (WHERE r.creates_sent = 0))::float8 / nullif(count(*), 0) AS served_share,
                 avg(extract(epoch FROM r.finished_at - r.upstream_created_at))
                     FILTER (WHERE r.creates_sent > 0 AND r.upstream_created_at IS NOT NULL)::float8 AS seconds_per_report
            FROM (SELECT f.* FROM (SELECT x.state, x.creates_sent, x.polls, x.finished_at, x.upstream_created_at
                                     FROM report_requests x
                                    WHERE x.batch = g.key ORDER BY x.id LIMIT 1000) f
                   WHERE f.state = 'succeeded' AND f.finished_at <= p_at LIMIT 200) r
      ) o ON g.key <> ''),
est AS (
    SELECT s.*,
           coalesce(CASE WHEN s.own_calls IS NOT NULL AND s.finished >= 5 THEN s.own_calls END,
                    (SELECT calls_per_report FROM queue_hour), 6.0) AS k,
           coalesce(CASE WHEN s.finished >= 5 THEN s.served_share END, 0.0) AS served,
           coalesce(CASE WHEN s.own_secs IS NOT NULL AND s.finished >= 5 THEN s.own_secs END,
                    (SELECT generation_secs FROM queue_hour), 300.0) AS d
      FROM sampled s),
work AS (
    SELECT e.*, round(e.queued * (1 - e.served))::bigint AS creates,
           e.queued * (1 - e.served) * e.k AS calls,
           e.queued * (1 - e.served) * e.k / e.weight AS x
      FROM est e),
gps AS (
    -- Until group b's last create, every group g does min(its work, b's virtual finish
    -- x_b times its weight): the calls and creates the account makes meanwhile.
    SELECT b.key, sum(least(g.calls, b.x * g.weight)) AS calls_before,
           sum(least(g.creates::float8, b.x * g.weight / g.k)) AS creates_before,
           sum(g.weight) FILTER (WHERE g.creates > 0) AS open_weight
      FROM work b CROSS JOIN work g GROUP BY b.key),
timed AS (
    SELECT w.*, p.calls_before, p.creates_before, p.open_weight, c.calls_per_second AS cap, st.t0, q.left_today, q.per_day,
           d.next_midnight,
           CASE WHEN c.calls_per_second > 0 THEN p.calls_before / c.calls_per_second END AS secs_to_last_create
      FROM work w JOIN gps p ON p.key = w.key CROSS JOIN capacity c CROSS JOIN start st
      CROSS JOIN quota q CROSS JOIN day d),
dated AS (
    SELECT t.*,
           CASE WHEN t.creates = 0 OR t.left_today IS NULL OR t.creates_before <= t.left_today THEN 0
                WHEN t.per_day <= 0 THEN NULL
                ELSE ceil((t.creates_before - t.left_today) / t.per_day)::integer END AS extra_days
      FROM timed t)
SELECT nullif(d.key, ''), d.weight,
       CASE WHEN d.creates > 0 THEN d.weight / d.open_weight ELSE 0 END,
       d.queued, d.generating, d.succeeded, d.failed, d.cancelled,
       d.k, d.served, d.d, d.creates, round(d.calls)::bigint, d.cap,
       CASE WHEN d.extra_days > 0 THEN d.t0 + make_interval(secs => d.secs_to_last_create * d.left_today / d.creates_before) END,
       CASE WHEN d.extra_days IS NOT NULL AND d.left_today IS NOT NULL THEN d.extra_days + 1 END,
       CASE WHEN d.creates = 0 THEN
                 -- Only tasks being generated: the last one started ends d after its create.
                 greatest(p_at, (SELECT max(r.upstream_created_at) FROM report_requests r
                                  WHERE r.batch = d.key AND r.state = 'generating')
                                + make_interval(secs => d.d))
            WHEN d.t0 IS NULL OR d.secs_to_last_create IS NULL OR d.extra_days IS NULL THEN NULL
            WHEN d.extra_days = 0 THEN d.t0 + make_interval(secs => d.secs_to_last_create + d.d)
            ELSE d.next_midnight + make_interval(days => d.extra_days - 1)
                 + make_interval(secs => d.secs_to_last_create
                                 * (d.creates_before - d.left_today - (d.extra_days - 1) * d.per_day)
                                 / d.creates_before + d.d)
       END,
       CASE WHEN d.creates = 0 THEN 'generation'
            WHEN d.cap IS NULL AND NOT EXISTS (SELECT 1 FROM live) THEN 'no_worker'
            WHEN d.t0 IS NULL THEN 'account_stopped'
            WHEN d.cap IS NULL THEN 'no_calls_yet'
            WHEN d.extra_days IS NULL THEN 'daily_limit_zero'
            WHEN d.extra_days > 0 THEN 'daily_limit'
            WHEN d.t0 > p_at THEN 'account_stopped'
            ELSE 'qps' END
  FROM dated d
 WHERE d.key <> ''
$$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION report_batch_forecast_at(timestamptz) SET search_path = %I, pg_temp',
                   current_schema());
END $$;
REVOKE EXECUTE ON FUNCTION report_batch_forecast_at(timestamptz) FROM PUBLIC;

CREATE OR REPLACE VIEW report_batch_forecast AS SELECT * FROM report_batch_forecast_at(now());
COMMENT ON VIEW report_batch_forecast IS
    'Every open batch: its fair share, the paid tasks and provider calls still to spend, and when it is expected to finish (limited_by says what decides it)';

-- The claim's order across groups (called by the worker's claim when more than one
-- group has queued rows): from each group (`p_keys`, '' for rows without a batch, with
-- its weight and queued count) its first due rows in its own order, twice its share of
-- the `p_n` rows wanted (rows another claimer has locked are skipped) plus what groups
-- with fewer queued rows than their share leave; ordered by priority, then turn: a
-- row's rank in its group over the group's weight, from a random place in the first
-- round (so that claims of one row share fairly too). A group cut off at its limit may
-- have more rows at its last priority: no row of a lower priority comes before them.
-- Not inlined, and without JIT: the planner cannot know how many rows each group
-- yields, and guessing high would compile this few-millisecond query for longer than
-- it runs.
CREATE OR REPLACE FUNCTION report_fair_candidates(p_n bigint, p_keys text[], p_weights float8[], p_queued bigint[])
RETURNS TABLE (id bigint, priority smallint, turn float8, run_after timestamptz)
LANGUAGE sql VOLATILE ROWS 512 SET jit = off AS $$
WITH g AS (
    SELECT u.key, u.weight, u.queued, random() AS jitter,
           ceil(p_n * u.weight / sum(u.weight) OVER ())::bigint AS share
      FROM unnest(p_keys, p_weights, p_queued) AS u (key, weight, queued)),
spare AS (
    SELECT greatest(0, p_n - sum(least(g.share, coalesce(g.queued, g.share))))::bigint AS n FROM g),
candidates AS (
    SELECT g.key, c.id, c.priority, c.run_after, (c.rank - 1 + g.jitter) / g.weight AS turn,
           g.share * 2 + s.n AS cap
      FROM g CROSS JOIN spare s
      CROSS JOIN LATERAL (
          SELECT r.id, r.priority, r.run_after,
                 row_number() OVER (ORDER BY r.priority, r.run_after, r.id) AS rank
            FROM report_requests r
           WHERE r.state = 'queued' AND coalesce(r.batch, '') = g.key
             AND r.run_after <= now() AND (r.lease_expires_at IS NULL OR r.lease_expires_at < now())
           ORDER BY coalesce(r.batch, ''), r.priority, r.run_after, r.id
           LIMIT g.share * 2 + s.n) c),
cutoff AS (
    SELECT min(last) AS priority FROM (
        SELECT max(c.priority) AS last FROM candidates c
         GROUP BY c.key HAVING count(*) >= max(c.cap)) t)
SELECT c.id, c.priority, c.turn, c.run_after FROM candidates c
 WHERE c.priority <= coalesce((SELECT priority FROM cutoff), 32767)
 ORDER BY c.priority, c.turn, c.run_after, c.id
$$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION report_fair_candidates(bigint, text[], float8[], bigint[]) SET search_path = %I, pg_temp',
                   current_schema());
END $$;
