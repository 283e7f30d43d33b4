//! `Db`: the pool every statement of this crate goes through, and how it runs them in
//! the database's pool mode.
//!
//! In session mode (PostgreSQL itself, or a pooler in session mode) it is the sqlx pool,
//! unchanged. Behind a transaction pooler (PgBouncer's `pool_mode = transaction`) a
//! client connection meets whichever server session is free from one transaction to the
//! next; and sqlx prepares a statement in one exchange with the server and runs it in
//! the next. Outside a transaction those two exchanges may reach different sessions (the
//! statement then fails, or, unnamed, runs another client's statement text). So in
//! transaction mode every statement sent through `&Db` is one transaction of its own,
//! prepared unnamed, its rows read before it commits. Explicit transactions
//! (`Db::begin`, as `PgPool::begin`) are one server session already; their statements
//! are unnamed through `sql`.

use std::ops::Deref;

use futures_util::TryStreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use sqlx::Either;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Execute, Executor, PgPool, Postgres, SqlStr};

use super::PoolMode;

/// A pool, and how the database behind it hands out server sessions.
#[derive(Clone, Debug)]
pub struct Db {
    pub(super) pool: PgPool,
    pub(super) mode: PoolMode,
}

impl Db {
    /// `pool`, reached the way `mode` says (its connections opened accordingly: see
    /// `connect_in`).
    pub fn new(pool: PgPool, mode: PoolMode) -> Db {
        if mode == PoolMode::Transaction {
            super::sql::unnamed_from_now_on();
        }
        Db { pool, mode }
    }

    /// The pool mode this pool was opened in.
    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// The sqlx pool itself (for LISTEN and other session-level needs).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Everything else a pool does (`begin`, `acquire`, `close`, `connect_options`…) is the
/// sqlx pool's.
impl Deref for Db {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

/// A statement that is prepared unnamed (never kept on the server session).
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(self) -> SqlStr {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

impl<'p> Executor<'p> for &'_ Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        match self.mode {
            PoolMode::Session => (&self.pool).fetch_many(query),
            PoolMode::Transaction => {
                let pool = self.pool.clone();
                let all = async move {
                    let mut tx = pool.begin().await?;
                    let items: Vec<_> = (&mut *tx).fetch_many(Unnamed(query)).try_collect().await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(items)
                };
                Box::pin(
                    futures_util::stream::once(all)
                        .map_ok(|items| futures_util::stream::iter(items.into_iter().map(Ok)))
                        .try_flatten(),
                )
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Postgres>,
    {
        match self.mode {
            PoolMode::Session => (&self.pool).fetch_optional(query),
            PoolMode::Transaction => {
                let pool = self.pool.clone();
                Box::pin(async move {
                    let mut tx = pool.begin().await?;
                    let row = (&mut *tx).fetch_optional(Unnamed(query)).await?;
                    tx.commit().await?;
                    Ok(row)
                })
            }
        }
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        (&self.pool).prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>> {
        (&self.pool).describe(sql)
    }
}
