#!/usr/bin/env node
// Enqueue one report, wait for it without polling, and save the document.
//
//   npm install            (in this folder: installs pg)
//   DATABASE_URL=postgres://my_app@localhost/reports \
//     node wait-for-report.mjs "小米科技有限责任公司" --type pdf --out ./reports
//
// LISTEN on `report_finished` comes before the INSERT, so the event cannot slip past;
// each wait has a timeout, after which the table is asked once (the fallback, which
// also covers a lost notification). Exit status: 0 stored, 1 failed or cancelled,
// 2 gave up waiting.

import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";
import pg from "pg";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "credit-code": { type: "string" },
    type: { type: "string", default: "pdf" },
    batch: { type: "string" },
    out: { type: "string", default: "." },
    wait: { type: "string", default: "900" },
  },
});
const company = positionals[0] ?? null;
const creditCode = values["credit-code"] ?? null;
if (positionals.length > 1 || (company === null && creditCode === null)) {
  console.error(
    "usage: wait-for-report.mjs [COMPANY] [--credit-code CODE] [--type pdf|word] [--batch NAME] [--out DIR]",
  );
  process.exit(64);
}

const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();

// One waiter per request id: resolved by a notification for that id.
const waiters = new Map();
client.on("notification", (note) => {
  const event = JSON.parse(note.payload);
  waiters.get(event.id)?.(event.state);
});
await client.query("LISTEN report_finished");

const { rows } = await client.query(
  `INSERT INTO report_requests (company_name, credit_code, report_type, batch)
   VALUES ($1, $2, $3, $4) RETURNING id`,
  [company, creditCode, values.type, values.batch ?? null],
);
const id = Number(rows[0].id);
console.error(`enqueued request ${id}`);

const state = await waitUntilFinished(id, Number(values.wait) * 1000);
let status;
if (state === null) {
  console.error(`request ${id} is not finished after ${values.wait} s`);
  status = 2;
} else if (state !== "succeeded") {
  const r = await client.query(
    "SELECT last_error_code, last_error FROM report_requests WHERE id = $1", [id]);
  console.error(`request ${id} ${state}: (${r.rows[0].last_error_code}) ${r.rows[0].last_error}`);
  status = 1;
} else {
  status = await saveDocument(id, values.out);
}
await client.end();
process.exit(status);

async function currentState(id) {
  const r = await client.query("SELECT state FROM report_requests WHERE id = $1", [id]);
  return r.rows[0].state;
}

async function waitUntilFinished(id, budgetMs) {
  const deadline = Date.now() + budgetMs;
  for (;;) {
    const state = await currentState(id); // the fallback query
    if (FINAL.has(state)) return state;
    const left = deadline - Date.now();
    if (left <= 0) return null;
    const notified = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(null), Math.min(30_000, left));
      waiters.set(id, (s) => {
        clearTimeout(timer);
        resolve(s);
      });
    });
    waiters.delete(id);
    if (notified !== null) return notified;
  }
}

async function saveDocument(id, out) {
  const { rows } = await client.query(
    "SELECT file_name, sha256, object_key, content FROM report_documents WHERE request_id = $1",
    [id],
  );
  const doc = rows[0];
  if (doc.object_key !== null) {
    console.error(`the document is in object storage: report-worker export --ids ${id} --out ${out}`);
    return 0;
  }
  await mkdir(out, { recursive: true });
  // The provider's file name is untrusted: keep only its last path component.
  const file = path.join(out, `${id}-${path.basename(doc.file_name)}`);
  await writeFile(file, doc.content);
  console.log(`${file} (${doc.content.length} bytes, sha256 ${doc.sha256})`);
  return 0;
}
