//! The SQL contract on a real database: constraints, dedupe, cancel/retry, events,
//! NOTIFY and idempotent migrations.

use std::time::Duration;

use crate::common::{TestDb, report_retry};
use sqlx::postgres::PgListener;

async fn insert(db: &TestDb, columns: &str, values: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO report_requests ({columns}) VALUES ({values}) RETURNING id"
    )))
    .fetch_one(&db.pool)
    .await
}

fn constraint_of(e: sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.constraint().unwrap_or_default().to_string(),
        other => panic!("expected a database error, got {other}"),
    }
}

#[tokio::test]
async fn contract_statements_work_as_written() {
    let db = TestDb::new().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO report_requests (company_name, report_type) VALUES ('小米科技有限责任公司', 'pdf') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO report_requests (credit_code, report_type, priority, metadata)
              VALUES ('91110108551385082Q', 'word', -10, '{\"customer\": 42}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (state, attempts, max_attempts, priority): (String, i32, i32, i16) = sqlx::query_as(
        "SELECT state, attempts, max_attempts, priority FROM report_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), attempts, max_attempts, priority),
        ("queued", 0, 3, 0)
    );
    let stats: Vec<(String, i64)> = sqlx::query_as("SELECT state, count FROM report_queue_stats")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stats,
        vec![
            ("queued".into(), 2),
            ("generating".into(), 0),
            ("succeeded".into(), 0),
            ("failed".into(), 0),
            ("cancelled".into(), 0)
        ]
    );
    db.close().await;
}

#[tokio::test]
async fn good_rows_pass() {
    let db = TestDb::new().await;
    for (cols, vals) in [
        ("company_name, report_type", "'小米科技有限责任公司', 'pdf'"),
        ("credit_code, report_type", "'91110108551385082Q', 'word'"),
        ("org_number, report_type", "'5513850T82', 'word'"),
        (
            "company_name, credit_code, report_type",
            "'', '91110108551385082Q', 'pdf'",
        ),
        (
            "company_name, report_type",
            "'A Company (Beijing) Co., Ltd.', 'pdf'",
        ),
        ("company_name, report_type, max_attempts", "'x', 'pdf', 100"),
        (
            "company_name, report_type, metadata",
            "'x', 'pdf', '{\"a\": [1, 2]}'",
        ),
    ] {
        insert(&db, cols, vals)
            .await
            .unwrap_or_else(|e| panic!("({cols}) = ({vals}) refused: {e}"));
    }
    db.close().await;
}

#[tokio::test]
async fn bad_rows_are_refused_by_named_constraints() {
    let db = TestDb::new().await;
    let long_name = "公".repeat(201);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "report_type",
            "'pdf'".into(),
            "report_requests_identifier_required",
        ),
        (
            "company_name, report_type",
            "'', 'pdf'".into(),
            "report_requests_identifier_required",
        ),
        (
            "company_name, credit_code, org_number, report_type",
            "'', '', '', 'word'".into(),
            "report_requests_identifier_required",
        ),
        (
            "company_name, report_type",
            "'x', 'xls'".into(),
            "report_requests_report_type_word_or_pdf",
        ),
        (
            "company_name, report_type",
            "'x', 'PDF'".into(),
            "report_requests_report_type_word_or_pdf",
        ),
        (
            "company_name, report_type",
            "E'x\\ty', 'pdf'".into(),
            "report_requests_company_name_no_control_chars",
        ),
        (
            "company_name, report_type",
            "E'x\\u007f', 'pdf'".into(),
            "report_requests_company_name_no_control_chars",
        ),
        (
            "credit_code, report_type",
            "E'91110108551385082\\n', 'pdf'".into(),
            "report_requests_credit_code_no_control_chars",
        ),
        (
            "org_number, report_type",
            "E'55\\r13', 'pdf'".into(),
            "report_requests_org_number_no_control_chars",
        ),
        (
            "company_name, report_type",
            "' 小米', 'pdf'".into(),
            "report_requests_company_name_not_trimmed",
        ),
        (
            "company_name, report_type",
            "E'小米\\u3000', 'pdf'".into(),
            "report_requests_company_name_not_trimmed",
        ),
        (
            "company_name, report_type",
            "'   ', 'pdf'".into(),
            "report_requests_company_name_not_trimmed",
        ),
        (
            "org_number, report_type",
            "'5513850T82 ', 'pdf'".into(),
            "report_requests_org_number_not_trimmed",
        ),
        (
            "company_name, report_type",
            format!("'{long_name}', 'pdf'"),
            "report_requests_company_name_too_long",
        ),
        (
            "credit_code, report_type",
            "'9111010855138508', 'pdf'".into(),
            "report_requests_credit_code_not_18_digits_or_capitals",
        ),
        (
            "credit_code, report_type",
            "'91110108551385082q', 'pdf'".into(),
            "report_requests_credit_code_not_18_digits_or_capitals",
        ),
        (
            "org_number, report_type",
            format!("'{}', 'pdf'", "9".repeat(33)),
            "report_requests_org_number_too_long",
        ),
        (
            "company_name, report_type, dedupe_key",
            format!("'x', 'pdf', '{}'", "k".repeat(256)),
            "report_requests_dedupe_key_too_long",
        ),
        (
            "company_name, report_type, max_attempts",
            "'x', 'pdf', 0".into(),
            "report_requests_max_attempts_out_of_range",
        ),
        (
            "company_name, report_type, max_attempts",
            "'x', 'pdf', 1000".into(),
            "report_requests_max_attempts_out_of_range",
        ),
        (
            "company_name, report_type, metadata",
            "'x', 'pdf', '[1]'".into(),
            "report_requests_metadata_not_object",
        ),
        (
            "company_name, report_type, state",
            "'x', 'pdf', 'done'".into(),
            "report_requests_state_unknown",
        ),
        (
            "company_name, report_type, state",
            "'x', 'pdf', 'generating'".into(),
            "report_requests_generating_without_job",
        ),
        (
            "company_name, report_type, upstream_job_id",
            "'x', 'pdf', '1.5e18'".into(),
            "report_requests_upstream_job_id_not_digits",
        ),
        (
            "company_name, report_type, dedupe_key",
            "'x', 'pdf', E'order\\n1'".into(),
            "report_requests_dedupe_key_no_control_chars",
        ),
        ("company_name, report_type, attempts", "'x', 'pdf', -1".into(), "report_requests_attempts_negative"),
        (
            "company_name, report_type, metadata",
            "'x', 'pdf', (SELECT jsonb_object_agg(i::text, md5(i::text) || md5((i * 7)::text)) FROM generate_series(1, 3000) i)".into(),
            "report_requests_metadata_too_large",
        ),
    ];
    for (cols, vals, expected) in cases {
        let err = insert(&db, cols, &vals)
            .await
            .expect_err(&format!("({cols}) = ({vals}) was accepted"));
        assert_eq!(constraint_of(err), expected, "({cols}) = ({vals})");
    }
    // PostgreSQL text cannot hold NUL at all: the insert fails before any constraint.
    let err =
        sqlx::query("INSERT INTO report_requests (company_name, report_type) VALUES ($1, 'pdf')")
            .bind("a\0b")
            .execute(&db.pool)
            .await
            .expect_err("NUL accepted");
    assert!(err.to_string().contains("0x00"), "{err}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM report_requests")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    db.close().await;
}

#[tokio::test]
async fn dedupe_key_is_idempotent() {
    let db = TestDb::new().await;
    let sql = "INSERT INTO report_requests (company_name, report_type, dedupe_key)
               VALUES ('x', 'pdf', 'order-1') ON CONFLICT (dedupe_key) DO NOTHING RETURNING id";
    let first: Option<i64> = sqlx::query_scalar(sql)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
    let second: Option<i64> = sqlx::query_scalar(sql)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
    assert!(first.is_some());
    assert_eq!(second, None);
    // Without ON CONFLICT the duplicate is refused by the unique index, by name.
    let err = sqlx::query("INSERT INTO report_requests (company_name, report_type, dedupe_key) VALUES ('y', 'pdf', 'order-1')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(constraint_of(err), "report_requests_dedupe_key_key");
    // NULL keys never conflict.
    for _ in 0..2 {
        insert(&db, "company_name, report_type", "'z', 'pdf'")
            .await
            .unwrap();
    }
    // The library's enqueue reports the existing row.
    let r = report_worker::domain::NewRequest::new(
        Some("x"),
        None,
        None,
        report_worker::domain::ReportType::Pdf,
    )
    .unwrap()
    .with_dedupe_key(Some("order-1"))
    .unwrap();
    let again = report_worker::queue::enqueue(&db.pool, &r).await.unwrap();
    assert_eq!(
        again,
        report_worker::queue::Enqueued::Duplicate(first.unwrap())
    );
    db.close().await;
}

async fn set_state(db: &TestDb, id: i64, state: &str) {
    let extra = if state == "generating" {
        ", upstream_job_id = '1579434053399035904', upstream_created_at = now(), next_poll_at = now()"
    } else {
        ""
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE report_requests SET state = '{state}'{extra} WHERE id = $1"
    )))
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn state_of(db: &TestDb, id: i64) -> (String, i32, i64) {
    sqlx::query_as("SELECT state, attempts, lease_token FROM report_requests WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn cancel_and_retry_in_every_state() {
    let db = TestDb::new().await;
    // (state, cancel applies, retry applies)
    for (state, cancels, retries) in [
        ("queued", true, false),
        ("generating", true, false),
        ("succeeded", false, false),
        ("failed", false, true),
        ("cancelled", false, true),
    ] {
        let id = insert(&db, "company_name, report_type", "'x', 'pdf'")
            .await
            .unwrap();
        set_state(&db, id, state).await;
        sqlx::query("UPDATE report_requests SET attempts = 2, last_error = 'boom', last_error_code = 68300008 WHERE id = $1")
            .bind(id)
            .execute(&db.pool)
            .await
            .unwrap();
        let before = state_of(&db, id).await;
        let cancelled: bool = sqlx::query_scalar("SELECT report_cancel($1)")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(cancelled, cancels, "report_cancel on {state}");
        let after_cancel = state_of(&db, id).await;
        if cancels {
            assert_eq!(after_cancel.0, "cancelled");
            assert!(
                after_cancel.2 > before.2,
                "cancel must fence off the current holder"
            );
            // back to the original state for the retry check
            set_state(&db, id, state).await;
        } else {
            assert_eq!(after_cancel, before, "report_cancel changed a {state} row");
        }
        let before = state_of(&db, id).await;
        let retried: bool = report_retry(&db.pool, id).await;
        assert_eq!(retried, retries, "report_retry on {state}");
        let after = state_of(&db, id).await;
        if retries {
            assert_eq!((after.0.as_str(), after.1), ("queued", 0), "fresh attempts");
            let (err, code): (Option<String>, Option<i32>) = sqlx::query_as(
                "SELECT last_error, last_error_code FROM report_requests WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert_eq!((err, code), (None, None));
        } else {
            assert_eq!(after, before, "report_retry changed a {state} row");
        }
    }
    // Unknown ids change nothing.
    let none: bool = sqlx::query_scalar("SELECT report_cancel(999999)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!none);
    let none: bool = sqlx::query_scalar("SELECT report_retry(999999)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!none);
    db.close().await;
}

#[tokio::test]
async fn events_record_plain_sql_changes_and_errors() {
    let db = TestDb::new().await;
    let id = insert(&db, "company_name, report_type", "'x', 'pdf'")
        .await
        .unwrap();
    sqlx::query("UPDATE report_requests SET last_error = 'busy', last_error_code = 67200100, last_error_at = now() WHERE id = $1")
        .bind(id).execute(&db.pool).await.unwrap();
    // The same error again, later: still a new event.
    sqlx::query(
        "UPDATE report_requests SET last_error_at = now() + interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    // A change that is neither a state change nor an error: no event.
    sqlx::query("UPDATE report_requests SET priority = 5 WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE report_requests SET state = 'failed', last_error = 'by hand' , last_error_code = NULL WHERE id = $1")
        .bind(id).execute(&db.pool).await.unwrap();
    type Event = (String, Option<String>, Option<i32>, Option<String>);
    let events: Vec<Event> = sqlx::query_as(
        "SELECT state, previous_state, error_code, error FROM report_events WHERE request_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        events,
        vec![
            ("queued".into(), None, None, None),
            (
                "queued".into(),
                Some("queued".into()),
                Some(67200100),
                Some("busy".into())
            ),
            (
                "queued".into(),
                Some("queued".into()),
                Some(67200100),
                Some("busy".into())
            ),
            (
                "failed".into(),
                Some("queued".into()),
                None,
                Some("by hand".into())
            ),
        ]
    );
    db.close().await;
}

#[tokio::test]
async fn insert_and_retry_notify_listeners() {
    let db = TestDb::new().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(report_worker::queue::NOTIFY_CHANNEL)
        .await
        .unwrap();
    let id = insert(&db, "company_name, report_type", "'x', 'pdf'")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("notify on insert")
        .unwrap();
    assert_eq!(n.channel(), "report_requests");
    set_state(&db, id, "failed").await;
    let retried: bool = report_retry(&db.pool, id).await;
    assert!(retried);
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("notify on retry")
        .unwrap();
    assert_eq!(n.payload(), "retry");
    db.close().await;
}

#[tokio::test]
async fn migrations_apply_twice_and_by_hand() {
    let db = TestDb::empty().await;
    report_worker::queue::migrate(&db.pool).await.unwrap();
    report_worker::queue::migrate(&db.pool).await.unwrap();
    // The SQL itself is idempotent too (for those who apply it with psql).
    for m in report_worker::queue::MIGRATOR.iter() {
        sqlx::raw_sql(m.sql.clone())
            .execute(&db.pool)
            .await
            .unwrap();
    }
    insert(&db, "company_name, report_type", "'x', 'pdf'")
        .await
        .unwrap();
    db.close().await;
}

#[tokio::test]
async fn deleting_requests_deletes_their_history() {
    let db = TestDb::new().await;
    let keep = insert(&db, "company_name, report_type", "'keep', 'pdf'")
        .await
        .unwrap();
    let gone = insert(&db, "company_name, report_type", "'gone', 'pdf'")
        .await
        .unwrap();
    set_state(&db, gone, "failed").await;
    sqlx::query("DELETE FROM report_requests WHERE id = $1")
        .bind(gone)
        .execute(&db.pool)
        .await
        .unwrap();
    let events: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT request_id FROM report_events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, vec![keep]);
    db.close().await;
}

/// The schema the migrations build, in a canonical text form: columns, constraints,
/// indexes, functions, triggers, views and table options of the public schema.
async fn schema_text(pool: &report_worker::queue::Db) -> String {
    let lines: Vec<String> = sqlx::query_scalar(
        r#"
        SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               || CASE WHEN a.attidentity <> '' THEN ' identity' ELSE '' END
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'p')
           AND c.relname <> '_sqlx_migrations' AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid <> 0
           AND conrelid::regclass::text <> '_sqlx_migrations'
        UNION ALL
        SELECT 'index ' || indexdef FROM pg_indexes
         WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations'
        UNION ALL
        SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') '
               || pg_get_function_result(p.oid) || ' body ' || md5(p.prosrc)
          FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger
         WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'report\_%'
        UNION ALL
        SELECT 'view ' || viewname || ' ' || regexp_replace(definition, '\s+', ' ', 'g')
          FROM pg_views WHERE schemaname = 'public'
        UNION ALL
        SELECT 'options ' || relname || ' ' || array_to_string(reloptions, ',')
          FROM pg_class WHERE relnamespace = 'public'::regnamespace AND reloptions IS NOT NULL
        UNION ALL
        SELECT 'storage ' || c.relname || '.' || a.attname || ' ' || a.attstorage::text
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0
           AND NOT a.attisdropped AND a.attstorage <> (SELECT typstorage FROM pg_type WHERE oid = a.atttypid)
        ORDER BY 1
        "#,
    )
    .fetch_all(pool)
    .await
    .unwrap();
    lines.join("\n") + "\n"
}

/// The migrations build exactly the committed snapshot `tests/schema.snapshot`. A schema
/// change comes with a new numbered migration and a refreshed snapshot
/// (`UPDATE_SCHEMA_SNAPSHOT=1 cargo test schema_matches`), so a reviewer sees the whole
/// schema change in one diff.
#[tokio::test]
async fn schema_matches_the_committed_snapshot() {
    let db = TestDb::new().await;
    let actual = schema_text(&db.pool).await;
    db.close().await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schema.snapshot");
    if std::env::var_os("UPDATE_SCHEMA_SNAPSHOT").is_some() {
        std::fs::write(path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if actual != expected {
        let missing: Vec<&str> = expected
            .lines()
            .filter(|l| !actual.lines().any(|a| a == *l))
            .collect();
        let added: Vec<&str> = actual
            .lines()
            .filter(|l| !expected.lines().any(|e| e == *l))
            .collect();
        panic!(
            "the migrations no longer build tests/schema.snapshot.\nonly in the snapshot:\n  {}\nonly in the database:\n  {}\nIf the change is intended, refresh it: UPDATE_SCHEMA_SNAPSHOT=1 cargo test schema_matches",
            missing.join("\n  "),
            added.join("\n  ")
        );
    }
}

/// Applied migrations are never edited: their checksums are pinned in
/// `migrations/checksums.txt`, and a new migration is a new, higher-numbered file.
#[test]
fn applied_migrations_are_never_edited() {
    use sha2::{Digest, Sha256};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let actual: String = files
        .iter()
        .map(|f| {
            let sql = std::fs::read(format!("{dir}/{f}")).unwrap();
            format!("{}  {f}\n", hex::encode(Sha256::digest(&sql)))
        })
        .collect();
    let pinned = std::fs::read_to_string(format!("{dir}/checksums.txt")).unwrap_or_default();
    if std::env::var_os("UPDATE_SCHEMA_SNAPSHOT").is_some() && actual.starts_with(&pinned) {
        std::fs::write(format!("{dir}/checksums.txt"), &actual).unwrap();
        return;
    }
    for line in pinned.lines() {
        assert!(
            actual.lines().any(|a| a == line),
            "migration edited after it was applied: {line} (write a new migration instead)"
        );
    }
    assert_eq!(
        actual, pinned,
        "a new migration: pin it with UPDATE_SCHEMA_SNAPSHOT=1 cargo test applied_migrations"
    );
}

/// The sanitiser and the table agree on every code point: whatever the sanitiser keeps,
/// both file-name constraints accept (under this database's locale), and the
/// locale-independent constraint refuses exactly the code points the sanitiser replaces.
#[tokio::test]
async fn file_name_sanitiser_and_constraints_agree_on_every_code_point() {
    use report_worker::domain::ReportType;
    use report_worker::upstream::document::{is_unsafe_in_file_name, sanitize_file_name};
    let db = TestDb::new().await;
    let defs: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
          WHERE conname IN ('report_documents_file_name_invalid', 'report_documents_file_name_unsafe')
          ORDER BY conname",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(defs.len(), 2, "{defs:?}");
    let chars: Vec<char> = (1u32..=0x10FFFF).filter_map(char::from_u32).collect();
    let names: Vec<String> = chars
        .iter()
        .map(|c| sanitize_file_name(&format!("a{c}b"), ReportType::Pdf, None))
        .collect();
    // Every sanitised name passes both constraints as written in the database.
    let refused: Vec<String> = sqlx::query_scalar(
        "SELECT n FROM unnest($1::text[]) AS n
          WHERE NOT (n <> '' AND n !~ '[[:cntrl:]/\\\\]')
             OR n ~ (SELECT substring(pg_get_constraintdef(oid) FROM '''(\\[.*\\])''')
                       FROM pg_constraint WHERE conname = 'report_documents_file_name_unsafe')",
    )
    .bind(&names)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        refused.is_empty(),
        "kept by the sanitiser, refused by the table: {:?}",
        &refused[..refused.len().min(5)]
    );
    // The locale-independent class is exactly the sanitiser's table.
    let in_class: Vec<i32> = sqlx::query_scalar(
        "SELECT cp FROM generate_series(1, 1114111) cp
          WHERE (cp < 55296 OR cp > 57343)
            AND chr(cp) ~ (SELECT substring(pg_get_constraintdef(oid) FROM '''(\\[.*\\])''')
                             FROM pg_constraint WHERE conname = 'report_documents_file_name_unsafe')
          ORDER BY cp",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let table: Vec<i32> = chars
        .iter()
        .filter(|c| **c != '\0' && is_unsafe_in_file_name(**c))
        .map(|c| *c as i32)
        .collect();
    assert_eq!(in_class, table);
    db.close().await;
}

/// Every function that runs as its owner searches the queue's schema and then pg_temp,
/// last: no login's temporary or own objects can stand in for the queue's.
#[tokio::test]
async fn security_definer_functions_search_pg_temp_last() {
    let db = TestDb::new().await;
    let loose: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.pronamespace = current_schema()::regnamespace AND p.prosecdef
            AND NOT coalesce(p.proconfig, '{}') @> ARRAY['search_path=public, pg_temp']",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(loose.is_empty(), "{loose:?}");
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = current_schema()::regnamespace AND prosecdef",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(count >= 5, "{count}");
    db.close().await;
}
