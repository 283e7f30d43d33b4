#!/usr/bin/env bash
# graphile-worker's no-op baseline and report-worker's burn-down on the same machine and
# PostgreSQL, alternating, ROUNDS times in one sitting; each round prints both systems'
# throughput and WAL per unit of work, then both ratios, with their spread over the rounds:
#   throughput: report-worker reports/s ÷ graphile-worker no-op jobs/s (goal ≥ 1.5)
#   WAL: report-worker bookkeeping bytes per report (its WAL minus the stored document)
#        ÷ graphile-worker WAL bytes per job (goal ≤ 2)
# Needs node/npm (registry access) and DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/postgres); nothing else may use the server meanwhile.
#   N=20000 CONC=512 ROUNDS=3 scripts/bench-vs-peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
export DATABASE_URL
N="${N:-20000}"
CONC="${CONC:-512}"
ROUNDS="${ROUNDS:-3}"
PEER=scripts/peers/graphile-worker

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$PEER/drain.js" "$PEER/package.json" "$work/"
(cd "$work" && npm install --no-audit --no-fund --silent >/dev/null)

cargo build --release --quiet
results="$work/rounds.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    gw=$(cd "$work" && DATABASE_URL="${DATABASE_URL%/*}/gw_peer" N="$N" CONC=32 node drain.js 2>/dev/null | tail -n 1)
    rw=$(./target/release/report-worker bench --only burn-down --reports "$N" --concurrency "$CONC" --json 2>/dev/null | tr -d "\n")
    printf '{"round": %s, "gw": %s, "rw": %s}\n' "$round" "$gw" "$rw" >> "$results"
done

node -e '
const rounds = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
const spread = (xs, digits) => {
  const lo = Math.min(...xs), hi = Math.max(...xs);
  return `${lo.toFixed(digits)}–${hi.toFixed(digits)}`;
};
const speed = [], wal = [];
for (const { round, gw, rw } of rounds) {
  const b = rw.burn_down;
  speed.push(b.reports_per_s / gw.jobs_per_s);
  wal.push(b.bookkeeping_wal_bytes_per_report / gw.wal_bytes_per_job);
  console.log(`round ${round}: ${gw.system} (concurrency ${gw.concurrency}) ${gw.jobs_per_s} no-op jobs/s, ${gw.wal_bytes_per_job} WAL bytes/job;`
    + ` report-worker (concurrency ${b.concurrency}) ${Math.round(b.reports_per_s)} reports/s, ${b.transactions_per_report.toFixed(2)} transactions/report,`
    + ` ${Math.round(b.wal_bytes_per_report)} WAL bytes/report (${Math.round(b.document_bytes_per_report)} document, ${Math.round(b.bookkeeping_wal_bytes_per_report)} bookkeeping)`);
}
console.log(`throughput ratio report-worker / graphile-worker: ${speed.map((r) => r.toFixed(2)).join(" · ")} (spread ${spread(speed, 2)}; goal ≥ 1.5)`);
console.log(`WAL ratio report-worker bookkeeping / graphile-worker: ${wal.map((r) => r.toFixed(2)).join(" · ")} (spread ${spread(wal, 2)}; goal ≤ 2)`);
' "$results"
