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
            CHECK (weight >= 0.01::real AND weight <= 1000);
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
    IF p_weight IS NULL OR NOT (p_weight >= 0.01::real AND p_weight <= 1000) THEN
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
--   * per report, from the batch's own finished rows among its first 1,000 (the cohort
--     made before its oldest task still generating, when it has 5): the calls it took (creates + polls), the share served from a stored
--     document (no paid task), the time from its task's create to its end; for a batch
--     that has none yet, the whole queue's calls per finished report in the last hour
--     and its last 200 generation times, then defaults (6 calls, 300 s);
--   * fair share: claims share rows, so every open group (each batch, and the rows
--     without one) takes turns in proportion to its weight until its queued rows are
--     done (generalised processor sharing: a group that runs out hands its turns to the
--     others); the turns all groups take before this batch's last one are the creates
--     and calls the accounts make meanwhile;
--   * the daily create limit (less what is kept for retries): those creates fill the
--     account's provider day (Asia/Shanghai) and the days after, each holding the lesser
--     of the limit left and what the calls allow in the rest of that day.
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
           max(l.qps) AS qps, bool_or(l.qps <= 0) AS unpaced,
           min(l.daily_limit) AS daily_limit, max(l.headroom) AS headroom
      FROM report_workers w,
           LATERAL (SELECT e.key,
                           CASE WHEN jsonb_typeof(e.value -> 'qps') = 'number'
                                THEN least(greatest((e.value ->> 'qps')::numeric, 0), 1e6)::float8 ELSE 0 END AS qps,
                           CASE WHEN jsonb_typeof(e.value -> 'daily_limit') = 'number'
                                THEN least(greatest(0, (e.value ->> 'daily_limit')::numeric), 1e15)::bigint END AS daily_limit,
                           CASE WHEN jsonb_typeof(e.value -> 'headroom') = 'number'
                                THEN least(greatest(0, (e.value ->> 'headroom')::numeric), 1e15)::bigint ELSE 0 END AS headroom
                      FROM jsonb_each(CASE WHEN jsonb_typeof(w.account_limits) = 'object'
                                           THEN w.account_limits ELSE '{}' END) e) l
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
                       WHERE c.minute >= date_trunc('minute', p_at) - interval '10 minutes'
                         AND c.minute < date_trunc('minute', p_at)
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
          -- The batch's first 1,000 rows; of those finished, the cohort made before its
          -- oldest task still being generated (all of them have ended, the slow with
          -- the fast: rows that end first are the quick ones), when it has 5.
          SELECT count(*) AS finished,
                 avg(e.creates_sent + e.polls) FILTER (WHERE e.creates_sent > 0)::float8 AS calls_per_report,
                 (count(*) FILTER (WHERE e.creates_sent = 0))::float8 / nullif(count(*), 0) AS served_share,
                 avg(e.secs) FILTER (WHERE e.creates_sent > 0)::float8 AS seconds_per_report
            FROM (SELECT c.*, count(*) FILTER (WHERE c.cohort) OVER () AS in_cohort
                    FROM (SELECT f.creates_sent, f.polls,
                         extract(epoch FROM f.finished_at - f.upstream_created_at) AS secs,
                         f.oldest_open IS NULL OR coalesce(f.upstream_created_at, f.finished_at) < f.oldest_open AS cohort
                    FROM (SELECT x.state, x.creates_sent, x.polls, x.finished_at, x.upstream_created_at,
                                 min(x.upstream_created_at) FILTER (WHERE x.state = 'generating') OVER () AS oldest_open
                            FROM (SELECT y.state, y.creates_sent, y.polls, y.finished_at, y.upstream_created_at
                                    FROM report_requests y WHERE y.batch = g.key ORDER BY y.id LIMIT 1000) x) f
                   WHERE f.state = 'succeeded' AND f.finished_at <= p_at) c) e
           WHERE e.cohort OR e.in_cohort < 5
      ) o ON g.key <> ''),
est AS (
    SELECT s.*,
           coalesce(CASE WHEN s.own_calls IS NOT NULL AND s.finished >= 5 THEN greatest(s.own_calls, 1) END,
                    (SELECT CASE WHEN calls_per_report > 0 THEN greatest(calls_per_report, 1) END FROM queue_hour), 6.0) AS k,
           coalesce(CASE WHEN s.finished >= 5 THEN s.served_share END, 0.0) AS served,
           coalesce(CASE WHEN s.own_secs IS NOT NULL AND s.finished >= 5 THEN s.own_secs END,
                    (SELECT generation_secs FROM queue_hour), 300.0) AS d
      FROM sampled s),
work AS (
    -- Claims share rows (turns), not calls: a group's rows take their turns whether a
    -- stored document serves them or they pay for a task of k calls.
    SELECT e.*, round(e.queued * (1 - e.served))::bigint AS creates,
           e.queued * (1 - e.served) * e.k AS calls,
           e.queued / e.weight AS x
      FROM est e),
gps AS (
    -- Until group b's last turn, every group g takes min(its rows, x_b times its
    -- weight): the creates and calls the accounts make meanwhile.
    SELECT b.key, sum(least(g.queued, b.x * g.weight) * (1 - g.served) * g.k) AS calls_before,
           sum(least(g.queued, b.x * g.weight) * (1 - g.served)) AS creates_before,
           sum(g.weight) FILTER (WHERE g.queued > 0) AS open_weight
      FROM work b CROSS JOIN work g GROUP BY b.key),
timed AS (
    SELECT w.*, p.calls_before, p.creates_before, p.open_weight, c.calls_per_second AS cap, st.t0,
           q.left_today, q.per_day, d.next_midnight, d.today,
           CASE WHEN c.calls_per_second >= 1e-3 THEN least(p.calls_before / c.calls_per_second, 3e8) END AS secs,
           extract(epoch FROM d.next_midnight - st.t0)::float8 AS to_midnight
      FROM work w JOIN gps p ON p.key = w.key CROSS JOIN capacity c CROSS JOIN start st
      CROSS JOIN quota q CROSS JOIN day d),
rated AS (
    -- R: the creates a second the calls allow while the batch is open; what today and
    -- each later provider day can hold is the lesser of the limit and R's day.
    SELECT t.*, r.rate,
           least(coalesce(t.left_today, 'infinity'), r.rate * t.to_midnight) AS first_day,
           least(coalesce(t.per_day, 'infinity'), r.rate * 86400) AS per_later_day
      FROM timed t
      CROSS JOIN LATERAL (SELECT CASE WHEN t.secs > 0 THEN t.creates_before / t.secs END AS rate) r),
dated AS (
    SELECT t.*,
           CASE WHEN t.creates = 0 OR t.rate IS NULL OR t.creates_before <= t.first_day THEN 0
                WHEN t.per_later_day <= 0 THEN NULL
                ELSE least(ceil((t.creates_before - t.first_day) / t.per_later_day), 36500)::integer END AS extra_days,
           t.left_today IS NOT NULL AND t.left_today < t.rate * t.to_midnight
               AND t.creates_before > t.left_today AS binds_today,
           t.per_day IS NOT NULL AND t.per_day < t.rate * 86400
               AND t.creates_before > t.first_day + t.per_day AS binds_later
      FROM rated t)
SELECT nullif(d.key, ''), d.weight,
       CASE WHEN d.queued > 0 THEN d.weight / d.open_weight ELSE 0 END,
       d.queued, d.generating, d.succeeded, d.failed, d.cancelled,
       d.k, d.served, d.d, d.creates, round(d.calls)::bigint, d.cap,
       CASE WHEN d.binds_today THEN d.t0 + make_interval(secs => d.left_today / d.rate)
            WHEN d.binds_later AND NOT d.binds_today AND d.extra_days > 0
                THEN d.next_midnight + make_interval(secs => d.per_day / d.rate) END,
       CASE WHEN d.extra_days IS NOT NULL AND d.rate IS NOT NULL THEN d.extra_days + 1 END,
       CASE WHEN d.creates = 0 THEN
                 -- Only tasks being generated: the last one started ends d after its create.
                 greatest(p_at, (SELECT max(r.upstream_created_at) FROM report_requests r
                                  WHERE r.batch = d.key AND r.state = 'generating')
                                + make_interval(secs => d.d))
            WHEN d.t0 IS NULL OR d.secs IS NULL OR d.extra_days IS NULL THEN NULL
            WHEN d.extra_days = 0 OR NOT (d.binds_today OR d.binds_later) THEN
                 d.t0 + make_interval(secs => d.secs + d.d)
            ELSE (((d.today + d.extra_days)::timestamp) AT TIME ZONE 'Asia/Shanghai')
                 + make_interval(secs => (d.creates_before - d.first_day - (d.extra_days - 1) * d.per_later_day)
                                         / d.rate + d.d)
       END,
       CASE WHEN d.creates = 0 THEN 'generation'
            WHEN d.cap IS NULL AND NOT EXISTS (SELECT 1 FROM live) THEN 'no_worker'
            WHEN d.t0 IS NULL THEN 'account_stopped'
            WHEN d.secs IS NULL THEN 'no_calls_yet'
            WHEN d.extra_days IS NULL THEN 'daily_limit_zero'
            WHEN d.binds_today OR d.binds_later THEN 'daily_limit'
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

-- The claim's rows across groups, locked (called by the worker's claim when more than
-- one group has rows to claim now): `p_keys` are the groups ('' for rows without a
-- batch), with their weights and the priority of their first row to claim (`p_tops`).
-- Priority by priority, from the highest: the groups with rows of that priority share
-- the `p_n` rows wanted by weight, turn by turn (a row's turn is its rank among its
-- group's rows of that priority over the group's weight, from a random place in the
-- first round; one group, chosen in proportion to its weight, leads it, so a claim of
-- one row takes from each group in proportion to its weight). Each group is asked for
-- exactly its rows among the turns still wanted, locked FOR UPDATE SKIP LOCKED (rows
-- another claimer holds are passed over, not counted); a group that gives fewer has no
-- more of that priority to give now, and its next priority is looked up. Rounds go on
-- until the claim is full or no group has rows left. Returned in claim order: priority,
-- then turn. Without JIT: the planner cannot know how many rows each group yields, and
-- guessing high would compile a few-millisecond query for longer than it runs.
CREATE OR REPLACE FUNCTION report_fair_candidates(p_n bigint, p_keys text[], p_weights float8[], p_tops smallint[])
RETURNS TABLE (id bigint, priority smallint, turn float8, run_after timestamptz)
LANGUAGE plpgsql VOLATILE ROWS 512 SET jit = off AS $$
DECLARE
    n_groups integer := coalesce(array_length(p_keys, 1), 0);
    goal bigint := least(greatest(p_n, 0), 100000);
    -- Per group: the priority of its next row to claim (NULL: none), and the rows it
    -- gave of that priority so far.
    tops smallint[] := p_tops;
    taken bigint[] := array_fill(0::bigint, ARRAY[n_groups]);
    jitter float8[] := array_fill(0::float8, ARRAY[n_groups]);
    ids bigint[] := '{}';
    groups integer[] := '{}';
    priorities smallint[] := '{}';
    afters timestamptz[] := '{}';
    turns float8[] := '{}';
    asks bigint[];
    more_groups integer[];
    more_ids bigint[];
    more_afters timestamptz[];
    more_turns float8[];
    total bigint := 0;
    open_weight float8;
    level smallint;
    led smallint;
    lead float8;
    want bigint;
    i integer;
BEGIN
    FOR round IN 1..10000 LOOP
        SELECT min(tops[k]) INTO level FROM generate_series(1, n_groups) k;
        EXIT WHEN total >= goal OR level IS NULL;
        want := goal - total;
        SELECT sum(p_weights[k]) INTO open_weight FROM generate_series(1, n_groups) k WHERE tops[k] = level;
        IF led IS DISTINCT FROM level THEN
            -- A new priority: one of its groups leads, chosen in proportion to weight;
            -- the others start at a random place within the first round.
            led := level;
            lead := random() * open_weight;
            FOR i IN 1..n_groups LOOP
                CONTINUE WHEN tops[i] IS DISTINCT FROM level;
                taken[i] := 0;
                jitter[i] := random();
            END LOOP;
            FOR i IN 1..n_groups LOOP
                CONTINUE WHEN tops[i] IS DISTINCT FROM level;
                lead := lead - p_weights[i];
                IF lead < 0 THEN
                    jitter[i] := 0;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        -- Each group of this priority: its rows among the `want` first turns still to
        -- come (a claim of one row asks one group for one row).
        asks := ARRAY(
            SELECT coalesce(c.n, 0)::bigint
              FROM generate_series(1, n_groups) AS s (k)
              LEFT JOIN (SELECT t.g, count(*) AS n FROM (
                             SELECT k2 AS g, (taken[k2] + r - 1 + jitter[k2]) / p_weights[k2] AS turn
                               FROM generate_series(1, n_groups) k2,
                                    generate_series(1, ceil(want * p_weights[k2] / open_weight)::integer + 1) r
                              WHERE tops[k2] = level
                              ORDER BY turn LIMIT want) t
                          GROUP BY t.g) c ON c.g = s.k
             ORDER BY s.k);
        -- One statement for every group asked: its first due rows of this priority,
        -- locked.
        SELECT coalesce(array_agg(x.g ORDER BY x.g, x.run_after, x.id), '{}'),
               coalesce(array_agg(x.id ORDER BY x.g, x.run_after, x.id), '{}'),
               coalesce(array_agg(x.run_after ORDER BY x.g, x.run_after, x.id), '{}')
          INTO more_groups, more_ids, more_afters
          FROM (SELECT u.k::integer AS g, c.id, c.run_after
                  FROM unnest(p_keys, asks) WITH ORDINALITY AS u (key, ask, k)
                  CROSS JOIN LATERAL (
                      SELECT r.id, r.run_after
                        FROM report_requests r
                       WHERE r.state = 'queued' AND coalesce(r.batch, '') = u.key AND r.priority = level
                         AND r.run_after <= now() AND (r.lease_expires_at IS NULL OR r.lease_expires_at < now())
                         AND r.id <> ALL (ids)
                       ORDER BY coalesce(r.batch, ''), r.priority, r.run_after, r.id
                       LIMIT u.ask
                         FOR UPDATE OF r SKIP LOCKED) c
                 WHERE u.ask > 0) x;
        -- Their turns, in the order each group gave them.
        SELECT coalesce(array_agg((taken[m.g] + m.rank - 1 + jitter[m.g]) / p_weights[m.g] ORDER BY m.o), '{}')
          INTO STRICT more_turns
          FROM (SELECT g, o, row_number() OVER (PARTITION BY g ORDER BY o) AS rank
                  FROM unnest(more_groups) WITH ORDINALITY AS q (g, o)) m;
        ids := ids || more_ids;
        groups := groups || more_groups;
        priorities := priorities || array_fill(level, ARRAY[cardinality(more_ids)]);
        afters := afters || more_afters;
        turns := turns || more_turns;
        total := total + cardinality(more_ids);
        -- A group that gave fewer than asked has no more of this priority to give now:
        -- its next priority (a plain read; NULL when it has none due).
        SELECT array_agg(CASE WHEN asks[k] > 0 AND coalesce(c.n, 0) < asks[k] THEN
                                  (SELECT d.priority FROM report_requests d
                                    WHERE d.state = 'queued' AND coalesce(d.batch, '') = p_keys[k]
                                      AND d.priority > level AND d.run_after <= now()
                                      AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())
                                    ORDER BY coalesce(d.batch, ''), d.priority, d.run_after, d.id
                                    LIMIT 1)
                              ELSE tops[k] END ORDER BY k),
               array_agg(taken[k] + coalesce(c.n, 0) ORDER BY k)
          INTO tops, taken
          FROM generate_series(1, n_groups) k
          LEFT JOIN (SELECT m.g, count(*) AS n FROM unnest(more_groups) AS m (g) GROUP BY m.g) c ON c.g = k;
    END LOOP;
    RETURN QUERY
    SELECT t.id, t.priority, t.turn, t.run_after
      FROM unnest(ids, priorities, turns, afters) AS t (id, priority, turn, run_after)
     ORDER BY 2, 3, 4, 1;
END $$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION report_fair_candidates(bigint, text[], float8[], smallint[]) SET search_path = %I, pg_temp',
                   current_schema());
END $$;
