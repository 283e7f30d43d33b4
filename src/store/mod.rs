//! Where documents' bytes live: in PostgreSQL (`report_documents.content`, the default)
//! or in S3-compatible object storage (`DOCUMENT_STORE=s3://bucket/prefix`), with the
//! metadata row in PostgreSQL either way.
//!
//! In object storage a document is uploaded in parts straight from its spool (memory
//! stays bounded whatever its size), read back and its sha256 checked, and only then
//! does its row say `succeeded`: a crash in between leaves at worst an object no row
//! points at, never a row pointing at nothing. This module knows nothing of the queue.

use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::domain::{Document, DocumentBody};
use crate::spool::Spool;

/// Parts of a multipart upload, and how many are in flight at once: at most
/// `PART × PARTS_IN_FLIGHT` bytes of a document are in memory while it is uploaded.
const PART: usize = 5 * 1024 * 1024;
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DOCUMENT_STORE {0:?} is not postgres or s3://bucket/prefix")]
    BadUrl(String),
    #[error("object storage: {0}")]
    Objects(#[from] object_store::Error),
    #[error("the stored object {key} does not read back as written ({why})")]
    Mismatch { key: String, why: String },
    #[error("reading the document: {0}")]
    Io(#[from] std::io::Error),
    #[error("document {0} is in object storage, but no DOCUMENT_STORE is configured")]
    NoObjectStore(String),
}

/// How to reach an S3-compatible store. Unset fields come from the usual environment
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// Where documents go.
#[derive(Clone)]
pub enum DocumentStore {
    /// `report_documents.content` (bytea).
    Postgres,
    /// An S3-compatible bucket; keys start with `prefix`.
    Objects {
        store: Arc<dyn ObjectStore>,
        bucket: String,
        prefix: String,
    },
}

impl std::fmt::Debug for DocumentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl DocumentStore {
    /// Opens `postgres` (or an empty value) or `s3://bucket/prefix`; for a bucket,
    /// checks that it answers, so a wrong name or credentials fail at start-up.
    pub async fn open(url: &str, s3: &S3Settings) -> Result<DocumentStore, StoreError> {
        let url = url.trim();
        if url.is_empty() || url.eq_ignore_ascii_case("postgres") {
            return Ok(DocumentStore::Postgres);
        }
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| StoreError::BadUrl(url.into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::BadUrl(url.into()));
        }
        crate::config::install_crypto_provider();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = s3.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL"));
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // S3-compatible servers (MinIO, moto, Ceph) want path-style requests.
            .with_virtual_hosted_style_request(false);
        if let Some(endpoint) = &endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = s3.region.clone().or_else(|| env("AWS_REGION")) {
            builder = builder.with_region(region);
        }
        if let Some(key) = &s3.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &s3.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let store: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
        let prefix = prefix.trim_matches('/').to_string();
        // One cheap call: a missing bucket or refused credentials show now, not later.
        let probe = ObjectPath::from(prefix.as_str());
        store.list_with_delimiter(Some(&probe)).await?;
        Ok(DocumentStore::Objects {
            store,
            bucket: bucket.into(),
            prefix,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            DocumentStore::Postgres => "postgres".into(),
            DocumentStore::Objects { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }

    /// Stores a verified document's bytes and returns the document as its row will
    /// describe it. For object storage the object is written and read back first.
    pub async fn keep(
        &self,
        request_id: i64,
        mut spool: Spool,
        content_type: &'static str,
        file_name: String,
        provider_company: Option<String>,
        extension: &str,
    ) -> Result<Document, StoreError> {
        let sha256 = spool.sha256();
        let byte_size = spool.len();
        let body = match self {
            DocumentStore::Postgres => DocumentBody::Inline(spool.into_bytes()?),
            DocumentStore::Objects { store, prefix, .. } => {
                let key = object_key(prefix, request_id, &sha256, extension);
                upload(store.as_ref(), &key, &mut spool).await?;
                verify(store.as_ref(), &key, &sha256, byte_size).await?;
                DocumentBody::Stored { key }
            }
        };
        Ok(Document {
            content_type,
            file_name,
            sha256,
            byte_size,
            body,
            provider_company,
        })
    }

    /// Streams a stored object into `out`, returning its length.
    pub async fn copy_to(
        &self,
        key: &str,
        out: &mut impl std::io::Write,
    ) -> Result<u64, StoreError> {
        let DocumentStore::Objects { store, .. } = self else {
            return Err(StoreError::NoObjectStore(key.into()));
        };
        let mut stream = store.get(&ObjectPath::from(key)).await?.into_stream();
        let mut n = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            out.write_all(&chunk)?;
            n += chunk.len() as u64;
        }
        Ok(n)
    }

    /// A stored object's bytes as a stream of chunks (serving a download without holding
    /// the document in memory).
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<
        futures_util::stream::BoxStream<'static, Result<bytes::Bytes, StoreError>>,
        StoreError,
    > {
        let DocumentStore::Objects { store, .. } = self else {
            return Err(StoreError::NoObjectStore(key.into()));
        };
        let stream = store.get(&ObjectPath::from(key)).await?.into_stream();
        Ok(stream.map(|chunk| chunk.map_err(StoreError::from)).boxed())
    }

    /// Copies a stored object to `to` (a reused document gets its own object, so that
    /// removing one row's document never removes another's).
    pub async fn copy_object(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let DocumentStore::Objects { store, .. } = self else {
            return Err(StoreError::NoObjectStore(from.into()));
        };
        store
            .copy(&ObjectPath::from(from), &ObjectPath::from(to))
            .await?;
        Ok(())
    }

    /// Deletes objects (documents removed by retention); missing ones are fine.
    pub async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        let DocumentStore::Objects { store, .. } = self else {
            return Ok(());
        };
        for key in keys {
            match store.delete(&ObjectPath::from(key.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Uploads bytes already in memory under `key` and checks them (moving documents
    /// out of PostgreSQL).
    pub async fn put_bytes(&self, key: &str, bytes: &[u8], sha256: &str) -> Result<(), StoreError> {
        let DocumentStore::Objects { store, .. } = self else {
            return Err(StoreError::NoObjectStore(key.into()));
        };
        let mut spool = Spool::new(usize::MAX);
        spool.write(bytes)?;
        upload(store.as_ref(), key, &mut spool).await?;
        verify(store.as_ref(), key, sha256, bytes.len() as u64).await
    }

    /// The key a document of `request_id` gets in this store.
    pub fn key_for(&self, request_id: i64, sha256: &str, extension: &str) -> Option<String> {
        match self {
            DocumentStore::Postgres => None,
            DocumentStore::Objects { prefix, .. } => {
                Some(object_key(prefix, request_id, sha256, extension))
            }
        }
    }
}

/// `<prefix>/<request id>/<sha256>.<ext>`: the same document always lands on the same
/// key (a retry after a crash overwrites, never duplicates).
fn object_key(prefix: &str, request_id: i64, sha256: &str, extension: &str) -> String {
    let name = format!("{request_id}/{sha256}.{extension}");
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// A multipart upload from the spool, a part at a time, a few parts in flight.
async fn upload(store: &dyn ObjectStore, key: &str, spool: &mut Spool) -> Result<(), StoreError> {
    use std::io::Read;
    let upload = store.put_multipart(&ObjectPath::from(key)).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
    let mut buf = vec![0u8; PART];
    let mut reader = spool.reader()?;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            return Err(e.into());
        }
        writer.write(&buf[..n]);
    }
    writer.finish().await?;
    Ok(())
}

/// Reads the object back and checks its size and sha256.
async fn verify(
    store: &dyn ObjectStore,
    key: &str,
    sha256: &str,
    size: u64,
) -> Result<(), StoreError> {
    let mut stream = store.get(&ObjectPath::from(key)).await?.into_stream();
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        n += chunk.len() as u64;
    }
    let got = hex::encode(hasher.finalize());
    if n != size || got != sha256 {
        return Err(StoreError::Mismatch {
            key: key.into(),
            why: format!("{n} bytes with sha256 {got}, expected {size} bytes with {sha256}"),
        });
    }
    Ok(())
}
