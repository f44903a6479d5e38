//! Fenced writes to the user's own rows, and locks inside the user's own transaction.

use lock_core::{FencedWrite, FencingToken, LockError};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use crate::config::validate_ident;
use crate::sql::map_err;

/// A table of the user's, with a `bigint` column that stores the highest fencing token
/// that wrote each row. Names are validated (plain identifiers, optionally
/// `schema.table`), so they can be placed in SQL text safely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencedTable {
    table: String,
    token_column: String,
}

impl FencedTable {
    /// Names the table (`table` or `schema.table`) and its token column.
    pub fn new(table: &str, token_column: &str) -> Result<Self, LockError> {
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 {
            return Err(LockError::InvalidConfig(format!(
                "table {table:?}: use table or schema.table"
            )));
        }
        for p in &parts {
            validate_ident("table name part", p, 63)?;
        }
        validate_ident("token column", token_column, 63)?;
        Ok(Self {
            table: table.to_owned(),
            token_column: token_column.to_owned(),
        })
    }
}

/// Updates the rows of `table` that match `filter`, applying `set`, all or nothing: only
/// if no matching row's token is higher than `token`; the rows then carry `token`. Equal
/// tokens are accepted, so one holder may write many times under one grant.
///
/// - [`FencedWrite::Applied`]`(n)`: every one of the `n` matching rows was written.
/// - [`FencedWrite::Refused`]: a matching row was written with a higher token (a later
///   holder of the lock already acted); **no** row was written.
/// - [`FencedWrite::NoMatch`]: no row matched; nothing was written.
/// - A matching row whose token is NULL is an error ([`LockError::InvalidConfig`]): it
///   cannot tell which holder wrote it. Give the column `NOT NULL DEFAULT 0`.
///
/// One statement: the matching rows are locked (`FOR UPDATE`) and checked, then updated
/// only if every one passed (and no row is ever written with a lower token than it has,
/// whatever the filter). The filter must give the same rows twice in one statement: no
/// volatile functions. `set` and `filter` are SQL fragments written by the
/// programmer (never user input), with parameters `$1..$n` bound from `params`; the token
/// is bound as `$n+1`. Write a read-modify-write as an expression in `set` (`stock =
/// stock - 1`): it reads the row the fence checked. One table must be written under the
/// tokens of one lock key only: tokens of different keys are not ordered with each other.
///
/// ```no_run
/// # async fn f(client: &tokio_postgres::Client, token: lock_core::FencingToken) -> Result<(), lock_core::LockError> {
/// use lock_pg::{fenced_update, FencedTable, FencedWrite};
/// let inventory = FencedTable::new("inventory", "fence_token")?;
/// let item = "item-1";
/// match fenced_update(client, &inventory, "stock = stock - 1", "item = $1 AND stock > 0", &[&item], token).await? {
///     FencedWrite::Applied(_) => println!("sold one"),
///     FencedWrite::Refused { highest } => println!("a later holder ({highest}) already wrote"),
///     FencedWrite::NoMatch => println!("sold out"),
///     _ => {}
/// }
/// # Ok(()) }
/// ```
pub async fn fenced_update<C: GenericClient + Sync>(
    client: &C,
    table: &FencedTable,
    set: &str,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
    token: FencingToken,
) -> Result<FencedWrite, LockError> {
    let t = i64::try_from(token.get())
        .map_err(|_| LockError::InvalidOptions(format!("token {token} exceeds bigint")))?;
    let n = params.len() + 1;
    let (tbl, col) = (&table.table, &table.token_column);
    // `chk` locks and reads every matching row first (the update's subquery on it makes it
    // run first); the update then writes them only if none is ahead of the token.
    let sql = format!(
        "WITH chk AS MATERIALIZED ( \
             SELECT count(*) AS n, count(*) FILTER (WHERE {col} IS NULL) AS nulls, \
                    max({col}) AS high \
             FROM (SELECT {col} FROM {tbl} WHERE ({filter}) FOR UPDATE) m), \
         upd AS ( \
             UPDATE {tbl} SET {set}, {col} = ${n} \
             WHERE ({filter}) AND {col} <= ${n} \
               AND (SELECT nulls = 0 AND coalesce(high, 0) <= ${n} FROM chk) \
             RETURNING 1) \
         SELECT chk.n, chk.nulls, chk.high, (SELECT count(*) FROM upd) FROM chk"
    );
    let mut all: Vec<&(dyn ToSql + Sync)> = params.to_vec();
    all.push(&t);
    let row = client.query_one(&sql, &all).await.map_err(map_err)?;
    let (matched, nulls, high, updated): (i64, i64, Option<i64>, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if nulls > 0 {
        return Err(LockError::InvalidConfig(format!(
            "{nulls} row(s) of {tbl} matching the filter have a NULL {col}: a fenced row must \
             carry a token (give the column NOT NULL DEFAULT 0); nothing was written"
        )));
    }
    match high.map(|h| u64::try_from(h).unwrap_or(0)) {
        Some(h) if h > token.get() => Ok(FencedWrite::Refused {
            highest: FencingToken::new(h),
        }),
        _ if matched == 0 => Ok(FencedWrite::NoMatch),
        _ => Ok(FencedWrite::Applied(u64::try_from(updated).unwrap_or(0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(FencedTable::new("inventory", "fence_token").is_ok());
        assert!(FencedTable::new("shop.inventory", "fence_token").is_ok());
        for (t, c) in [
            ("inventory; drop table x", "f"),
            ("a.b.c", "f"),
            ("Inventory", "f"),
            ("inventory", "f t"),
            ("", "f"),
        ] {
            assert!(FencedTable::new(t, c).is_err(), "{t} {c}");
        }
    }
}
