// graphile-worker draining N no-op jobs: the queue's own overhead, measured on the same
// machine and PostgreSQL as report-worker's burn-down (scripts/bench-vs-peers.sh runs both
// in one sitting and prints the ratios), with the WAL written per job. Prints one JSON line.
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/gw_peer N=20000 CONC=32 node drain.js
const { run, runMigrations } = require("graphile-worker");
const { Client } = require("pg");

const url = process.env.DATABASE_URL || "postgres://postgres@127.0.0.1:5432/gw_peer";
const jobs = Number(process.env.N || 20000);
const concurrency = Number(process.env.CONC || 32);

async function main() {
  // A database of its own, created on first use.
  const server = new Client({ connectionString: url.replace(/\/[^/]*$/, "/postgres") });
  await server.connect();
  const name = new URL(url).pathname.slice(1);
  const found = await server.query("SELECT 1 FROM pg_database WHERE datname = $1", [name]);
  if (found.rowCount === 0) await server.query(`CREATE DATABASE "${name}"`);
  await server.end();

  await runMigrations({ connectionString: url });
  const db = new Client({ connectionString: url });
  await db.connect();
  await db.query("DELETE FROM graphile_worker._private_jobs");
  await db.query(
    `SELECT graphile_worker.add_jobs(ARRAY(
       SELECT json_populate_record(NULL::graphile_worker.job_spec,
              json_build_object('identifier', 'noop', 'payload', json_build_object('n', n)))
         FROM generate_series(1, $1) n))`,
    [jobs],
  );

  // WAL the server writes while the queue drains (the whole server's: run it alone).
  const walBefore = (await db.query("SELECT pg_current_wal_lsn()::text AS lsn")).rows[0].lsn;
  const started = process.hrtime.bigint();
  const runner = await run({
    connectionString: url,
    concurrency,
    maxPoolSize: concurrency + 2,
    pollInterval: 100,
    noHandleSignals: true,
    taskList: { noop: async () => {} },
  });
  for (;;) {
    const left = await db.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs");
    if (left.rows[0].n === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const wal = (await db.query(
    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8 AS bytes",
    [walBefore],
  )).rows[0].bytes;
  await runner.stop();
  await db.end();
  const version = require("graphile-worker/package.json").version;
  console.log(JSON.stringify({
    system: `graphile-worker ${version}`,
    concurrency,
    jobs,
    seconds: Number(seconds.toFixed(3)),
    jobs_per_s: Math.round(jobs / seconds),
    wal_bytes_per_job: Math.round(wal / jobs),
  }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
