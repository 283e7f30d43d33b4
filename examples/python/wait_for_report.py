#!/usr/bin/env python3
"""Enqueue one report, wait for it without polling, and save the document.

    pip install "psycopg[binary]"
    DATABASE_URL=postgres://my_app@localhost/reports \
        python3 wait_for_report.py "小米科技有限责任公司" --type pdf --out ./reports

The application LISTENs on `report_finished` (one NOTIFY per finished row, sent by the
database, payload {"id": …, "state": …, "batch": …}) *before* it inserts, so the
event cannot slip past it. It waits with a timeout per wait, and on every timeout
asks the table once (a fallback that also covers a dropped connection). With the
default document store the bytes are in `report_documents`; with object storage
(DOCUMENT_STORE=s3://…) `report-worker export --ids ID` fetches them.

Exit status: 0 stored, 1 the report failed or was cancelled, 2 gave up waiting.
"""

import argparse
import json
import os
import pathlib
import sys
import time

import psycopg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("company", nargs="?", help="company name (or give --credit-code)")
    parser.add_argument("--credit-code", help="unified social credit code")
    parser.add_argument("--type", choices=["pdf", "word"], default="pdf")
    parser.add_argument("--batch", help="group this request with others")
    parser.add_argument("--out", default=".", help="folder for the document")
    parser.add_argument("--wait", type=float, default=900.0, help="seconds to wait in all")
    args = parser.parse_args()
    if not args.company and not args.credit_code:
        parser.error("give a company name or --credit-code")

    # autocommit: each statement commits at once, and notifications arrive between them.
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("LISTEN report_finished")
        request_id = conn.execute(
            """INSERT INTO report_requests (company_name, credit_code, report_type, batch)
               VALUES (%s, %s, %s, %s) RETURNING id""",
            (args.company or None, args.credit_code, args.type, args.batch),
        ).fetchone()[0]
        print(f"enqueued request {request_id}", file=sys.stderr)

        state = wait_until_finished(conn, request_id, args.wait)
        if state is None:
            print(f"request {request_id} is not finished after {args.wait:.0f} s", file=sys.stderr)
            return 2
        if state != "succeeded":
            error = conn.execute(
                "SELECT last_error_code, last_error FROM report_requests WHERE id = %s",
                (request_id,),
            ).fetchone()
            print(f"request {request_id} {state}: ({error[0]}) {error[1]}", file=sys.stderr)
            return 1
        return save_document(conn, request_id, pathlib.Path(args.out))


def wait_until_finished(conn, request_id: int, budget: float):
    """The final state of the row, or None when `budget` seconds pass first."""
    deadline = time.monotonic() + budget
    while True:
        # The fallback query: the row may have finished before LISTEN took effect on a
        # reconnect, or a notification may have been lost with a connection.
        state = conn.execute(
            "SELECT state FROM report_requests WHERE id = %s", (request_id,)
        ).fetchone()[0]
        if state in ("succeeded", "failed", "cancelled"):
            return state
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Wait for notifications for at most 30 s, then ask the table again.
        for note in conn.notifies(timeout=min(30.0, left)):
            event = json.loads(note.payload)
            if event["id"] == request_id:
                return event["state"]


def save_document(conn, request_id: int, out: pathlib.Path) -> int:
    row = conn.execute(
        """SELECT d.file_name, d.sha256, d.object_key, d.content
             FROM report_documents d WHERE d.request_id = %s""",
        (request_id,),
    ).fetchone()
    file_name, sha256, object_key, content = row
    if object_key is not None:
        print(
            f"the document is in object storage ({object_key}): "
            f"report-worker export --ids {request_id} --out {out}",
            file=sys.stderr,
        )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    # The provider's file name is untrusted: keep only its last path component.
    path = out / f"{request_id}-{pathlib.PurePath(file_name).name}"
    path.write_bytes(content)
    print(f"{path} ({len(content)} bytes, sha256 {sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
