//! Batched writes of row outcomes. Every in-flight row begins a create with one guarded
//! write (the create intent) and ends its step with one fenced write (task created, not
//! ready yet, document stored); under load hundreds of those land per second. Instead of one statement and one commit each, row tasks hand their
//! write to a batcher per kind and wait for its commit: whatever queued up while the
//! previous batch ran goes out as one statement. Durability is unchanged — a task
//! continues only after its own row's write committed — and there is no added delay
//! when the worker is quiet (a lone write goes out at once).

use std::sync::Arc;

use crate::queue::Db;
use backon::Retryable;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::queue::{
    self, Begin, Completed, CreateIntent, Created, Fenced, Snoozed, Stored, WriteError,
};

/// Rows per statement, and bytes of documents per statement (large reports go alone).
const MAX_ROWS: usize = 256;
const MAX_BYTES: usize = 32 * 1024 * 1024;

/// Batches in flight at once per kind: while one waits for its commit to reach the
/// disk, the next can already be sent.
const IN_FLIGHT_BATCHES: usize = 2;

/// A write the batcher can carry: which row it is for, how large it is, and what the
/// row gets back.
pub(crate) trait Item: Send + Sync + 'static {
    /// What the statement answers for one row.
    type Answer: Clone + Send + 'static;
    /// The answer for a row the statement did not return: it is no longer ours.
    const LOST: Self::Answer;

    fn id(&self) -> i64;
    fn bytes(&self) -> usize {
        0
    }
}

impl Item for Created {
    type Answer = Fenced;
    const LOST: Fenced = Fenced::Lost;
    fn id(&self) -> i64 {
        self.id
    }
}

impl Item for Snoozed {
    type Answer = Fenced;
    const LOST: Fenced = Fenced::Lost;
    fn id(&self) -> i64 {
        self.id
    }
}

impl Item for Completed {
    type Answer = Stored;
    const LOST: Stored = Stored::Lost;
    fn id(&self) -> i64 {
        self.id
    }
    fn bytes(&self) -> usize {
        self.document.content().map_or(0, <[u8]>::len)
    }
}

impl Item for Begin {
    type Answer = CreateIntent;
    const LOST: CreateIntent = CreateIntent::Lost;
    fn id(&self) -> i64 {
        self.id
    }
}

/// What a row gets back, or why the write did not happen.
pub type Reply<A = Fenced> = Result<A, WriteError>;

/// Where a row's answer goes.
type ReplyTo<T> = oneshot::Sender<Reply<<T as Item>::Answer>>;

struct Request<T: Item> {
    item: T,
    reply: ReplyTo<T>,
}

/// One batch statement: writes `items`, returns each row it wrote with its answer.
pub(crate) type Exec<T> =
    for<'a> fn(
        &'a Db,
        &'a [T],
    ) -> BoxFuture<'a, Result<Vec<(i64, <T as Item>::Answer)>, sqlx::Error>>;

/// The rows a fenced batch statement wrote (those still held with their lease token).
fn written(
    ids: BoxFuture<'_, Result<Vec<i64>, sqlx::Error>>,
) -> BoxFuture<'_, Result<Vec<(i64, Fenced)>, sqlx::Error>> {
    ids.map(|r| r.map(|ids| ids.into_iter().map(|id| (id, Fenced::Written)).collect()))
        .boxed()
}

/// The four batchers. Cloning is cheap; the batchers stop when every clone is gone.
#[derive(Clone)]
pub struct Writer {
    begin: Batcher<Begin>,
    created: Batcher<Created>,
    snoozed: Batcher<Snoozed>,
    completed: Batcher<Completed>,
}

impl Writer {
    pub fn start(pool: Db) -> Writer {
        Writer {
            begin: Batcher::start(pool.clone(), |p, items| {
                queue::begin_create_batch(p, items).boxed()
            }),
            created: Batcher::start(pool.clone(), |p, items| {
                written(queue::mark_generating_batch(p, items).boxed())
            }),
            snoozed: Batcher::start(pool.clone(), |p, items| {
                written(queue::snooze_batch(p, items).boxed())
            }),
            completed: Batcher::start(pool, |p, items| queue::complete_batch(p, items).boxed()),
        }
    }

    /// The create intent (see `queue::begin_create`).
    pub async fn begin(&self, item: Begin) -> Reply<CreateIntent> {
        self.begin.submit(item).await
    }

    pub async fn created(&self, item: Created) -> Reply {
        self.created.submit(item).await
    }

    pub async fn snoozed(&self, item: Snoozed) -> Reply {
        self.snoozed.submit(item).await
    }

    pub async fn completed(&self, item: Completed) -> Reply<Stored> {
        self.completed.submit(item).await
    }
}

/// Collects writes of one kind and sends them as batches.
pub(crate) struct Batcher<T: Item> {
    tx: mpsc::UnboundedSender<Request<T>>,
}

impl<T: Item> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Item> Batcher<T> {
    pub(crate) fn start(pool: Db, exec: Exec<T>) -> Batcher<T> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, rx, exec));
        Batcher { tx }
    }

    pub(crate) async fn submit(&self, item: T) -> Reply<T::Answer> {
        let stopped = || WriteError::Unavailable("the writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { item, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run<T: Item>(pool: Db, mut rx: mpsc::UnboundedReceiver<Request<T>>, exec: Exec<T>) {
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

/// The answer the statement gave row `id`, or `LOST` when it returned none.
fn answer_for<T: Item>(answers: &[(i64, T::Answer)], id: i64) -> T::Answer {
    answers
        .iter()
        .find(|(row, _)| *row == id)
        .map_or(T::LOST, |(_, a)| a.clone())
}

async fn execute<T: Item>(pool: &Db, batch: Vec<Request<T>>, exec: Exec<T>) {
    let (items, replies): (Vec<T>, Vec<ReplyTo<T>>) =
        batch.into_iter().map(|r| (r.item, r.reply)).unzip();
    // Connection trouble (a restart) is retried for a while; an error about the
    // statement itself is narrowed down to the rows that caused it.
    let result = (|| exec(pool, &items))
        .retry(queue::backoff())
        .when(queue::is_retryable)
        .await;
    match result {
        Ok(answers) => {
            for (item, reply) in items.iter().zip(replies) {
                let _ = reply.send(Ok(answer_for::<T>(&answers, item.id())));
            }
        }
        Err(e) if items.len() > 1 && !queue::is_retryable(&e) => {
            for (item, reply) in items.iter().zip(replies) {
                let one = exec(pool, std::slice::from_ref(item)).await;
                let _ = reply.send(
                    one.map(|answers| answer_for::<T>(&answers, item.id()))
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use sqlx::postgres::PgPoolOptions;

    use super::*;

    /// A write of a given size for a row: even ids are still held, odd ones were lost.
    struct Fake {
        id: i64,
        bytes: usize,
    }

    impl Item for Fake {
        type Answer = Fenced;
        const LOST: Fenced = Fenced::Lost;
        fn id(&self) -> i64 {
            self.id
        }
        fn bytes(&self) -> usize {
            self.bytes
        }
    }

    /// A pool that never connects: the fake statements do not use it.
    fn pool() -> Db {
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        Db::new(pool, crate::queue::PoolMode::Session)
    }

    /// A constraint violation, as PostgreSQL reports one.
    #[derive(Debug)]
    struct Refusal;

    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("new row violates check constraint \"fake_check\"")
        }
    }

    impl std::error::Error for Refusal {}

    impl sqlx::error::DatabaseError for Refusal {
        fn message(&self) -> &str {
            "new row violates check constraint \"fake_check\""
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some("23514".into())
        }
        fn constraint(&self) -> Option<&str> {
            Some("fake_check")
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::CheckViolation
        }
    }

    fn even(items: &[Fake]) -> Vec<(i64, Fenced)> {
        items
            .iter()
            .map(|i| i.id)
            .filter(|id| id % 2 == 0)
            .map(|id| (id, Fenced::Written))
            .collect()
    }

    type Answers = Result<Vec<(i64, Fenced)>, sqlx::Error>;

    async fn submit_all(batcher: &Batcher<Fake>, items: Vec<Fake>) -> Vec<(i64, Reply)> {
        let mut tasks = tokio::task::JoinSet::new();
        for item in items {
            let b = batcher.clone();
            tasks.spawn(async move { (item.id, b.submit(item).await) });
        }
        let mut replies = tasks.join_all().await;
        replies.sort_by_key(|(id, _)| *id);
        replies
    }

    static SIZES: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

    /// Records each batch's rows and bytes, taking a while like a commit does.
    fn sized(_: &Db, items: &[Fake]) -> BoxFuture<'static, Answers> {
        let bytes = items.iter().map(|i| i.bytes).sum();
        SIZES.lock().unwrap().push((items.len(), bytes));
        let written = even(items);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(written)
        }
        .boxed()
    }

    #[tokio::test]
    async fn batches_respect_row_and_byte_limits_and_fence_each_row() {
        let batcher = Batcher::start(pool(), sized);
        let rows: Vec<Fake> = (0..1500).map(|id| Fake { id, bytes: 10 }).collect();
        let replies = submit_all(&batcher, rows).await;
        for (id, reply) in &replies {
            let want = if id % 2 == 0 {
                Fenced::Written
            } else {
                Fenced::Lost
            };
            assert_eq!(reply, &Ok(want), "row {id}");
        }
        let big = 20 * 1024 * 1024;
        let docs: Vec<Fake> = (0..6).map(|id| Fake { id, bytes: big }).collect();
        submit_all(&batcher, docs).await;
        let sizes = SIZES.lock().unwrap().clone();
        assert_eq!(sizes.iter().map(|(n, _)| n).sum::<usize>(), 1506);
        assert!(sizes.iter().all(|(n, _)| *n <= MAX_ROWS), "{sizes:?}");
        assert!(
            sizes.iter().any(|(n, _)| *n > 1),
            "writes that queue up share a statement: {sizes:?}"
        );
        // A batch stops growing once it holds MAX_BYTES: at most one document beyond.
        assert!(
            sizes.iter().all(|(_, bytes)| *bytes < MAX_BYTES + big),
            "{sizes:?}"
        );
    }

    static CALLS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    /// Refuses any statement that holds row 13, the way a constraint refuses a batch.
    fn refuses_13(_: &Db, items: &[Fake]) -> BoxFuture<'static, Answers> {
        CALLS.lock().unwrap().push(items.len());
        let result = if items.iter().any(|i| i.id == 13) {
            Err(sqlx::Error::Database(Box::new(Refusal)))
        } else {
            Ok(even(items))
        };
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            result
        }
        .boxed()
    }

    #[tokio::test]
    async fn a_refused_batch_is_retried_row_by_row_and_only_the_bad_row_fails() {
        let batcher = Batcher::start(pool(), refuses_13);
        let rows: Vec<Fake> = (0..40).map(|id| Fake { id, bytes: 0 }).collect();
        let replies = submit_all(&batcher, rows).await;
        for (id, reply) in replies {
            match id {
                13 => assert_eq!(
                    reply,
                    Err(WriteError::Refused {
                        constraint: Some("fake_check".into()),
                        message: "new row violates check constraint \"fake_check\"".into()
                    })
                ),
                id if id % 2 == 0 => assert_eq!(reply, Ok(Fenced::Written), "row {id}"),
                id => assert_eq!(reply, Ok(Fenced::Lost), "row {id}"),
            }
        }
        let calls = CALLS.lock().unwrap().clone();
        assert!(calls.iter().any(|n| *n > 1), "{calls:?}");
        assert!(
            calls.contains(&1),
            "the refused batch went row by row: {calls:?}"
        );
    }

    static FLAKY: Mutex<u32> = Mutex::new(0);

    /// Loses the connection twice, then works: the batch is retried, not failed.
    fn flaky(_: &Db, items: &[Fake]) -> BoxFuture<'static, Answers> {
        let mut failures = FLAKY.lock().unwrap();
        let result = if *failures < 2 {
            *failures += 1;
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "server closed the connection",
            )))
        } else {
            Ok(even(items))
        };
        async move { result }.boxed()
    }

    #[tokio::test]
    async fn connection_trouble_is_retried() {
        let batcher = Batcher::start(pool(), flaky);
        let reply = batcher.submit(Fake { id: 2, bytes: 0 }).await;
        assert_eq!(reply, Ok(Fenced::Written));
        assert_eq!(*FLAKY.lock().unwrap(), 2);
    }
}
