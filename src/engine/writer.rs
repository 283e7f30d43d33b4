//! Batched writes of row outcomes. Every in-flight row ends its step with one fenced
//! write (task created, not ready yet, document stored); under load hundreds of those
//! land per second. Instead of one statement and one commit each, row tasks hand their
//! write to a batcher per kind and wait for its commit: whatever queued up while the
//! previous batch ran goes out as one statement. Durability is unchanged — a task
//! continues only after its own row's write committed — and there is no added delay
//! when the worker is quiet (a lone write goes out at once).

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::queue::{self, Completed, Created, Snoozed};

/// Rows per statement, and bytes of documents per statement (large reports go alone).
const MAX_ROWS: usize = 256;
const MAX_BYTES: usize = 32 * 1024 * 1024;

trait Item: Send + Sync + 'static {
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

/// Whether the row was still ours (true) or the write was fenced off (false); an error
/// is a database failure that outlasted the retries.
type Reply = Result<bool, String>;

struct Request<T> {
    item: T,
    reply: oneshot::Sender<Reply>,
}

type Exec<T> = for<'a> fn(&'a PgPool, &'a [T]) -> BoxFuture<'a, Result<Vec<i64>, sqlx::Error>>;

/// The three batchers. Cloning is cheap; the batchers stop when every clone is gone.
#[derive(Clone)]
pub struct Writer {
    created: mpsc::UnboundedSender<Request<Created>>,
    snoozed: mpsc::UnboundedSender<Request<Snoozed>>,
    completed: mpsc::UnboundedSender<Request<Completed>>,
}

impl Writer {
    pub fn start(pool: PgPool) -> Writer {
        Writer {
            created: spawn(pool.clone(), |p, items| {
                queue::mark_generating_batch(p, items).boxed()
            }),
            snoozed: spawn(pool.clone(), |p, items| {
                queue::snooze_batch(p, items).boxed()
            }),
            completed: spawn(pool, |p, items| queue::complete_batch(p, items).boxed()),
        }
    }

    pub async fn created(&self, item: Created) -> Reply {
        submit(&self.created, item).await
    }

    pub async fn snoozed(&self, item: Snoozed) -> Reply {
        submit(&self.snoozed, item).await
    }

    pub async fn completed(&self, item: Completed) -> Reply {
        submit(&self.completed, item).await
    }
}

async fn submit<T>(tx: &mpsc::UnboundedSender<Request<T>>, item: T) -> Reply {
    let (reply, answer) = oneshot::channel();
    tx.send(Request { item, reply })
        .map_err(|_| "the writer has stopped".to_string())?;
    answer
        .await
        .map_err(|_| "the writer has stopped".to_string())?
}

fn spawn<T: Item>(pool: PgPool, exec: Exec<T>) -> mpsc::UnboundedSender<Request<T>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(pool, rx, exec));
    tx
}

/// Batches in flight at once per kind: while one waits for its commit to reach the
/// disk, the next can already be sent.
const IN_FLIGHT_BATCHES: usize = 4;

async fn run<T: Item>(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Request<T>>, exec: Exec<T>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BATCHES));
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

async fn execute<T: Item>(pool: &PgPool, batch: Vec<Request<T>>, exec: Exec<T>) {
    use backon::Retryable;
    {
        let (items, replies): (Vec<T>, Vec<oneshot::Sender<Reply>>) =
            batch.into_iter().map(|r| (r.item, r.reply)).unzip();
        // Connection trouble (a restart) is retried for a while; an error about the
        // statement itself is narrowed down to the rows that caused it.
        let result = (|| exec(pool, &items))
            .retry(crate::engine::db_backoff())
            .when(crate::engine::retryable_db_error)
            .await;
        match result {
            Ok(updated) => {
                for (item, reply) in items.iter().zip(replies) {
                    let _ = reply.send(Ok(updated.contains(&item.id())));
                }
            }
            Err(sqlx::Error::Database(_)) if items.len() > 1 => {
                for (item, reply) in items.iter().zip(replies) {
                    let one = exec(pool, std::slice::from_ref(item)).await;
                    let _ = reply.send(
                        one.map(|ids| ids.contains(&item.id()))
                            .map_err(|e| e.to_string()),
                    );
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}
