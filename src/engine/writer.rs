//! Batched writes of row outcomes. Every in-flight row ends its step with one fenced
//! write (task created, not ready yet, document stored); under load hundreds of those
//! land per second. Instead of one statement and one commit each, row tasks hand their
//! write to a batcher per kind and wait for its commit: whatever queued up while the
//! previous batch ran goes out as one statement. Durability is unchanged — a task
//! continues only after its own row's write committed — and there is no added delay
//! when the worker is quiet (a lone write goes out at once).

use std::sync::Arc;

use backon::Retryable;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::queue::{self, Completed, Created, Fenced, Snoozed, WriteError};

/// Rows per statement, and bytes of documents per statement (large reports go alone).
const MAX_ROWS: usize = 256;
const MAX_BYTES: usize = 32 * 1024 * 1024;

/// Batches in flight at once per kind: while one waits for its commit to reach the
/// disk, the next can already be sent.
const IN_FLIGHT_BATCHES: usize = 4;

/// A write the batcher can carry: which row it is for, and how large it is.
pub(crate) trait Item: Send + Sync + 'static {
    fn id(&self) -> i64;
    fn bytes(&self) -> usize {
        0
    }
}

impl Item for Created {
    fn id(&self) -> i64 {
        self.id
    }
}

impl Item for Snoozed {
    fn id(&self) -> i64 {
        self.id
    }
}

impl Item for Completed {
    fn id(&self) -> i64 {
        self.id
    }
    fn bytes(&self) -> usize {
        self.document.content.len()
    }
}

/// Whether the row was still ours, or why the write did not happen.
pub type Reply = Result<Fenced, WriteError>;

struct Request<T> {
    item: T,
    reply: oneshot::Sender<Reply>,
}

/// One batch statement: writes `items`, returns the ids of the rows it wrote (those
/// still held with their lease token).
pub(crate) type Exec<T> =
    for<'a> fn(&'a PgPool, &'a [T]) -> BoxFuture<'a, Result<Vec<i64>, sqlx::Error>>;

/// The three batchers. Cloning is cheap; the batchers stop when every clone is gone.
#[derive(Clone)]
pub struct Writer {
    created: Batcher<Created>,
    snoozed: Batcher<Snoozed>,
    completed: Batcher<Completed>,
}

impl Writer {
    pub fn start(pool: PgPool) -> Writer {
        Writer {
            created: Batcher::start(pool.clone(), |p, items| {
                queue::mark_generating_batch(p, items).boxed()
            }),
            snoozed: Batcher::start(pool.clone(), |p, items| {
                queue::snooze_batch(p, items).boxed()
            }),
            completed: Batcher::start(pool, |p, items| queue::complete_batch(p, items).boxed()),
        }
    }

    pub async fn created(&self, item: Created) -> Reply {
        self.created.submit(item).await
    }

    pub async fn snoozed(&self, item: Snoozed) -> Reply {
        self.snoozed.submit(item).await
    }

    pub async fn completed(&self, item: Completed) -> Reply {
        self.completed.submit(item).await
    }
}

/// Collects writes of one kind and sends them as batches.
pub(crate) struct Batcher<T> {
    tx: mpsc::UnboundedSender<Request<T>>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Item> Batcher<T> {
    pub(crate) fn start(pool: PgPool, exec: Exec<T>) -> Batcher<T> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, rx, exec));
        Batcher { tx }
    }

    pub(crate) async fn submit(&self, item: T) -> Reply {
        let stopped = || WriteError::Unavailable("the writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { item, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run<T: Item>(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Request<T>>, exec: Exec<T>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES));
    loop {
        // Take a slot first, so a batch collects everything that arrived meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut bytes = first.item.bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_ROWS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.item.bytes();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            execute(&pool, batch, exec).await;
            drop(slot);
        });
    }
}

fn fenced(written: &[i64], id: i64) -> Fenced {
    if written.contains(&id) {
        Fenced::Written
    } else {
        Fenced::Lost
    }
}

async fn execute<T: Item>(pool: &PgPool, batch: Vec<Request<T>>, exec: Exec<T>) {
    let (items, replies): (Vec<T>, Vec<oneshot::Sender<Reply>>) =
        batch.into_iter().map(|r| (r.item, r.reply)).unzip();
    // Connection trouble (a restart) is retried for a while; an error about the
    // statement itself is narrowed down to the rows that caused it.
    let result = (|| exec(pool, &items))
        .retry(queue::backoff())
        .when(queue::is_retryable)
        .await;
    match result {
        Ok(written) => {
            for (item, reply) in items.iter().zip(replies) {
                let _ = reply.send(Ok(fenced(&written, item.id())));
            }
        }
        Err(e) if items.len() > 1 && !queue::is_retryable(&e) => {
            for (item, reply) in items.iter().zip(replies) {
                let one = exec(pool, std::slice::from_ref(item)).await;
                let _ = reply.send(
                    one.map(|written| fenced(&written, item.id()))
                        .map_err(WriteError::from),
                );
            }
        }
        Err(e) => {
            let error = WriteError::from(e);
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
