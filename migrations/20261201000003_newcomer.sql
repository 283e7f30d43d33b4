-- Whether each running worker can reach the provider, per account: a streak of calls
-- that got no answer at all (nothing listens, DNS, TLS, timeouts), with when it began
-- and the last error, written with the worker's presence every few seconds. `status`
-- and `/healthz` show it, so an unreachable provider is not only in rows' last_error.
-- Safe to run twice by hand.
ALTER TABLE report_workers
    ADD COLUMN IF NOT EXISTS provider_trouble jsonb NOT NULL DEFAULT '{}';

CREATE OR REPLACE VIEW report_provider_trouble AS
SELECT w.owner, t.key AS account, (t.value ->> 'since')::timestamptz AS since,
       (t.value ->> 'calls')::int AS calls, t.value ->> 'error' AS error
  FROM report_workers w, jsonb_each(w.provider_trouble) t
 WHERE w.seen_at > now() - interval '1 minute';

-- Throughput counted in whole minutes, the current one included: a row finished ten
-- seconds ago is in "the last minute" (this minute so far and the one before it), as
-- the dashboard counts it; until now the current minute was left out of all three.
CREATE OR REPLACE VIEW report_throughput AS
SELECT s.state,
       coalesce(sum(f.n) FILTER (WHERE f.minute >= date_trunc('minute', now() - interval '1 minute')), 0)::bigint AS last_minute,
       coalesce(sum(f.n) FILTER (WHERE f.minute >= date_trunc('minute', now() - interval '1 hour')), 0)::bigint AS last_hour,
       coalesce(sum(f.n) FILTER (WHERE f.minute >= date_trunc('minute', now() - interval '1 day')), 0)::bigint AS last_day
  FROM unnest(ARRAY['succeeded', 'failed', 'cancelled']) WITH ORDINALITY AS s (state, ord)
  LEFT JOIN report_finished_minutes f
         ON f.state = s.state AND f.minute >= date_trunc('minute', now() - interval '1 day')
 GROUP BY s.state, s.ord
 ORDER BY s.ord;

-- The migrations applied, for any role: every command checks the schema first, and the
-- application and worker roles may not read _sqlx_migrations itself.
CREATE OR REPLACE FUNCTION report_schema_versions() RETURNS bigint[]
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT coalesce(pg_catalog.array_agg(version ORDER BY version), '{}')
      FROM _sqlx_migrations WHERE success
$$;

-- Every function that runs as its owner (SECURITY DEFINER) searches the queue's schema,
-- then pg_temp last (pg_catalog is searched first when not named): a login's temporary
-- table or view, or an object of its own in another schema, can never stand in for one
-- of the queue's and run as the owner. `SET search_path FROM CURRENT`, which the earlier
-- migrations used, kept "$user", public and left pg_temp first for relations.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS signature
          FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace AND p.prosecdef
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f.signature, current_schema());
    END LOOP;
END $$;
