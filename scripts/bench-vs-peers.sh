#!/usr/bin/env bash
# graphile-worker's no-op baseline and report-worker's burn-down, back to back on the same
# machine and PostgreSQL, then the ratio. Needs node/npm (registry access) and DATABASE_URL
# (default postgres://postgres@127.0.0.1:5432/postgres).
#   N=20000 CONC=512 scripts/bench-vs-peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
export DATABASE_URL
N="${N:-20000}"
CONC="${CONC:-512}"
PEER=scripts/peers/graphile-worker

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$PEER/drain.js" "$PEER/package.json" "$work/"
(cd "$work" && npm install --no-audit --no-fund --silent >/dev/null)

cargo build --release --quiet
gw=$(cd "$work" && DATABASE_URL="${DATABASE_URL%/*}/gw_peer" N="$N" CONC=32 node drain.js 2>/dev/null | tail -n 1)
rw=$(./target/release/report-worker bench --only burn-down --reports "$N" --concurrency "$CONC" --json 2>/dev/null)

node -e '
const gw = JSON.parse(process.argv[1]), rw = JSON.parse(process.argv[2]).burn_down;
console.log(`graphile-worker ${gw.system.split(" ")[1]} (default mode, concurrency ${gw.concurrency}): ${gw.jobs_per_s} no-op jobs/s`);
console.log(`report-worker burn-down (concurrency ${rw.concurrency}): ${Math.round(rw.reports_per_s)} reports/s, ${rw.upstream_calls_per_report.toFixed(1)} HTTP calls and ${rw.transactions_per_report.toFixed(2)} transactions per report`);
console.log(`ratio report-worker / graphile-worker: ${(rw.reports_per_s / gw.jobs_per_s).toFixed(2)}`);
' "$gw" "$rw"
