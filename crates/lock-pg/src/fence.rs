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

/// Updates the rows of `table` that match `filter`, applying `set`, only where the stored
/// token is not higher than `token`; the rows then carry `token`.
///
/// `set` and `filter` are SQL fragments written by the programmer (never user input), with
/// parameters `$1..$n` bound from `params`; the token is bound as `$n+1`. One statement
/// when the write is accepted; a refused write costs one more read to tell a refusal from
/// a filter that matched nothing.
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
    let sql = format!(
        "UPDATE {tbl} SET {set}, {col} = ${n} WHERE ({filter}) AND ({col} IS NULL OR {col} <= ${n})"
    );
    let mut all: Vec<&(dyn ToSql + Sync)> = params.to_vec();
    all.push(&t);
    let updated = client.execute(&sql, &all).await.map_err(map_err)?;
    if updated > 0 {
        return Ok(FencedWrite::Applied(updated));
    }
    let check = format!("SELECT max({col}) FROM {tbl} WHERE ({filter})");
    let row = client.query_one(&check, params).await.map_err(map_err)?;
    let highest: Option<i64> = row.try_get(0).map_err(map_err)?;
    match highest.and_then(|h| u64::try_from(h).ok()) {
        Some(h) if h > token.get() => Ok(FencedWrite::Refused {
            highest: FencingToken::new(h),
        }),
        _ => Ok(FencedWrite::NoMatch),
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
