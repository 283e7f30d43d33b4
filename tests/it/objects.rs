//! Documents in S3-compatible object storage (a real server: moto, started by `.ci/run`):
//! byte-exact, checked, never a row pointing at nothing; export, move and purge.

use std::time::Duration;

use crate::common::*;
use report_worker::simulator::SimConfig;
use report_worker::store::DocumentStore;

/// Every stored document is in the bucket under its key, byte-exact, and is what the
/// simulator served; no row holds bytes itself.
async fn assert_objects_exact(
    pool: &report_worker::queue::Db,
    sim: &report_worker::simulator::Simulator,
    endpoint: &str,
    bucket: &str,
) -> usize {
    let rows: Vec<(i64, String, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT d.request_id, r.upstream_job_id, d.sha256, d.object_key, d.content IS NULL
           FROM report_documents d JOIN report_requests r ON r.id = d.request_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let served = sim.stats().documents;
    assert!(!rows.is_empty(), "no document to check");
    for (id, job, sha, key, no_content) in &rows {
        let key = key
            .as_deref()
            .unwrap_or_else(|| panic!("row {id} has no object key"));
        assert!(no_content, "row {id} holds bytes too");
        assert_eq!(served.get(job), Some(sha), "row {id}: not what was served");
        assert_eq!(
            object_sha256(endpoint, bucket, key).await.as_ref(),
            Some(sha),
            "row {id}: the object under {key} differs"
        );
    }
    rows.len()
}

#[tokio::test]
async fn documents_in_object_storage_are_byte_exact_small_and_large() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    let db = TestDb::new().await;
    let (store, bucket) = s3_store(&endpoint, "reports").await;
    let sim = start_sim(SimConfig {
        doc_size: 40_000,
        ..SimConfig::instant()
    })
    .await;
    for (i, kind) in ["pdf", "word", "pdf", "word"].iter().enumerate() {
        enqueue(&db.pool, Some(&format!("对象{i}")), None, None, kind).await;
    }
    let mut config = fast_worker_config(&sim.config().client_id);
    config.documents = store;
    let w = spawn_worker(&db.url, client_config(&sim), config.clone()).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    assert_eq!(
        assert_objects_exact(&db.pool, &sim, &endpoint, &bucket).await,
        4
    );
    sim.stop().await;
    // A document past the spool's memory threshold: on disk, uploaded in parts.
    let big = start_sim(SimConfig {
        doc_size: 12_000_000,
        ..SimConfig::instant()
    })
    .await;
    let id = enqueue(&db.pool, Some("大文件"), None, None, "pdf").await;
    let w = spawn_worker(&db.url, client_config(&big), config).await;
    wait_all_finished(&db.pool, Duration::from_secs(60)).await;
    w.stop().await;
    let (size, key): (i64, String) =
        sqlx::query_as("SELECT byte_size, object_key FROM report_documents WHERE request_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(size > 10_000_000, "{size}");
    let served = big.stats().documents;
    let job: String =
        sqlx::query_scalar("SELECT upstream_job_id FROM report_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        object_sha256(&endpoint, &bucket, &key).await,
        served.get(&job).cloned()
    );
    big.stop().await;
    db.close().await;
}

/// A `report-worker run` process storing documents in `bucket`.
fn object_worker(
    db_url: &str,
    sim: &report_worker::simulator::Simulator,
    endpoint: &str,
    bucket: &str,
) -> std::process::Child {
    let store = format!("s3://{bucket}/crash");
    worker_process(
        db_url,
        sim,
        &[
            ("REPORT_FIRST_POLL", "100ms"),
            ("REPORT_POLL_MIN", "100ms"),
            ("REPORT_POLL_MAX", "200ms"),
            ("WORKER_LEASE", "2s"),
            ("DOCUMENT_STORE", &store),
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test-secret"),
        ],
    )
}

#[tokio::test]
async fn a_crash_between_upload_and_commit_leaves_no_row_pointing_at_nothing() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    let db = TestDb::new().await;
    let (_, bucket) = s3_store(&endpoint, "crash").await;
    let sim = start_sim(SimConfig::instant()).await;
    // The document row's insert stalls: the object is written, the commit not yet.
    sqlx::raw_sql(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$;
         CREATE TRIGGER stall BEFORE INSERT ON report_documents FOR EACH ROW EXECUTE FUNCTION stall();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    enqueue(&db.pool, Some("崩溃"), None, None, "pdf").await;
    let mut worker = object_worker(&db.url, &sim, &endpoint, &bucket);
    let key = wait_for(
        "the object, not yet its row",
        Duration::from_secs(30),
        || async {
            let listing = http_client()
                .get(format!("{endpoint}/{bucket}?list-type=2&prefix=crash/"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let start = listing.find("<Key>")? + 5;
            let end = listing[start..].find("</Key>")? + start;
            Some(listing[start..end].to_string())
        },
    )
    .await;
    // The crash, mid-commit.
    worker.kill().unwrap();
    worker.wait().unwrap();
    let admin = report_worker::queue::connect(&admin_url(), 1)
        .await
        .unwrap();
    // The completion statement, by its first lines (pg_stat_activity cuts long
    // statements at track_activity_query_size).
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND query LIKE 'WITH%' AND query LIKE '%SET state = ''succeeded''%'")
        .bind(&db.name)
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("DROP TRIGGER stall ON report_documents")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM report_documents").await,
        0,
        "no row points at the object"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM report_requests WHERE state = 'succeeded'"
        )
        .await,
        0
    );
    assert!(
        object_sha256(&endpoint, &bucket, &key).await.is_some(),
        "the object is only unreferenced"
    );
    // The next process completes the row; it points at a good object.
    let mut next = object_worker(&db.url, &sim, &endpoint, &bucket);
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    next.kill().unwrap();
    next.wait().unwrap();
    assert_eq!(
        assert_objects_exact(&db.pool, &sim, &endpoint, &bucket).await,
        1
    );
    sim.stop().await;
    admin.close().await;
    db.close().await;
}

#[tokio::test]
async fn export_reads_both_stores_and_move_documents_moves_them_resumably() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    let db = TestDb::new().await;
    let (store, bucket) = s3_store(&endpoint, "moved").await;
    let sim = start_sim(SimConfig::instant()).await;
    for i in 0..4 {
        enqueue(
            &db.pool,
            Some(&format!("搬家{i}")),
            None,
            None,
            if i % 2 == 0 { "pdf" } else { "word" },
        )
        .await;
    }
    // Stored in PostgreSQL first.
    let w = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    assert_eq!(assert_documents_exact(&db.pool, &sim).await, 4);
    let cancel = tokio_util::sync::CancellationToken::new();
    let moved =
        report_worker::ops::move_documents::move_documents(&db.pool, &store, &cancel, false)
            .await
            .unwrap();
    assert_eq!(moved.documents, 4);
    assert_eq!(
        assert_objects_exact(&db.pool, &sim, &endpoint, &bucket).await,
        4
    );
    let again =
        report_worker::ops::move_documents::move_documents(&db.pool, &store, &cancel, false)
            .await
            .unwrap();
    assert_eq!(again.documents, 0, "resumable: what moved stays moved");
    // One more stored in PostgreSQL: export reads from both stores.
    enqueue(&db.pool, Some("留在数据库"), None, None, "pdf").await;
    let w = spawn_fast_worker(&db.url, &sim).await;
    wait_all_finished(&db.pool, Duration::from_secs(30)).await;
    w.stop().await;
    let out = tempfile::tempdir().unwrap();
    let filter = report_worker::ops::export::ExportFilter::default();
    let s = report_worker::ops::export::export(&db.pool, &store, out.path(), &filter, false)
        .await
        .unwrap();
    assert_eq!(s.written, 5);
    let served: Vec<String> = sim.stats().documents.into_values().collect();
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 5);
    for f in std::fs::read_dir(out.path()).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        let sha = report_worker::upstream::document::sha256_hex(&bytes);
        assert!(
            served.contains(&sha),
            "an exported file is not what was served"
        );
    }
    // Without the object store, export says which document it cannot reach.
    let e = report_worker::ops::export::export(
        &db.pool,
        &DocumentStore::Postgres,
        tempfile::tempdir().unwrap().path(),
        &filter,
        false,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("DOCUMENT_STORE"), "{e}");
    // Purging removes the objects too.
    sqlx::query("UPDATE report_requests SET created_at = now() - interval '101 days', finished_at = now() - interval '100 days'")
        .execute(&db.pool)
        .await
        .unwrap();
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT object_key FROM report_documents WHERE object_key IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(keys.len(), 4, "the four moved documents are objects");
    let scope = report_worker::queue::PurgeScope {
        finished_before: chrono::Utc::now() - chrono::Duration::days(90),
        documents_only: true,
    };
    report_worker::engine::retention::purge(
        &db.pool,
        &store,
        Some(&scope),
        None,
        report_worker::engine::retention::Pace::Full,
        &cancel,
        |_| {},
    )
    .await
    .unwrap();
    for key in keys {
        assert!(
            object_sha256(&endpoint, &bucket, &key).await.is_none(),
            "{key} was not deleted"
        );
    }
    sim.stop().await;
    db.close().await;
}

#[tokio::test]
async fn a_bucket_that_is_not_there_is_named_at_start_up() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    let e = DocumentStore::open("s3://no-such-bucket-here/x", &s3_settings(&endpoint))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("object storage"), "{e}");
    let e = DocumentStore::open("ftp://x", &s3_settings(&endpoint))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("s3://bucket/prefix"), "{e}");
}
