//! The bank: the schema every workload check uses, the statements of a transfer leg, and
//! the invariant checker.
//!
//! Rules the checker enforces: the total of all balances is conserved; every transfer's
//! ledger rows are on exactly two databases with deltas summing to zero (never one leg);
//! each database's balances equal its initial total plus its ledger; what clients were
//! told matches (committed ⇒ present, aborted ⇒ absent); no prepared transaction with our
//! GID prefix remains.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("database {db}: {source}")]
    Db {
        db: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

pub const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS acct (id int PRIMARY KEY, bal bigint NOT NULL CHECK (bal >= 0));
CREATE TABLE IF NOT EXISTS ledger (
    txn_id text NOT NULL,
    acct int NOT NULL,
    delta bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (txn_id, acct)
);";

async fn connect(db: &str, url: &str) -> Result<tokio_postgres::Client, BankError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|source| BankError::Db {
            db: db.to_owned(),
            source,
        })?;
    tokio::spawn(conn);
    Ok(client)
}

/// Creates the schema and (re)fills accounts `1..=accounts` with `initial_balance`, with
/// an empty ledger.
pub async fn setup_bank(url: &str, accounts: u32, initial_balance: i64) -> Result<(), BankError> {
    let client = connect(url, url).await?;
    let err = |source| BankError::Db {
        db: url.to_owned(),
        source,
    };
    client.batch_execute(SCHEMA_SQL).await.map_err(err)?;
    client
        .batch_execute("TRUNCATE acct, ledger")
        .await
        .map_err(err)?;
    client
        .execute(
            "INSERT INTO acct (id, bal) SELECT g, $2 FROM generate_series(1, $1) g",
            &[&(accounts as i32), &initial_balance],
        )
        .await
        .map_err(err)?;
    Ok(())
}

/// Debit leg of transfer `txn_id`: `(sql, params)` pairs for the HTTP API.
pub fn debit_statements(txn_id: &str, acct: i32, amount: i64) -> Vec<(String, Vec<Value>)> {
    leg(txn_id, acct, -amount)
}

/// Credit leg of transfer `txn_id`.
pub fn credit_statements(txn_id: &str, acct: i32, amount: i64) -> Vec<(String, Vec<Value>)> {
    leg(txn_id, acct, amount)
}

fn leg(txn_id: &str, acct: i32, delta: i64) -> Vec<(String, Vec<Value>)> {
    vec![
        (
            "UPDATE acct SET bal = bal + $1 WHERE id = $2".to_owned(),
            vec![json!(delta), json!(acct)],
        ),
        (
            "INSERT INTO ledger (txn_id, acct, delta) VALUES ($1, $2, $3)".to_owned(),
            vec![json!(txn_id), json!(acct), json!(delta)],
        ),
    ]
}

/// What clients were told, by txn id.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    pub committed: HashSet<String>,
    pub aborted: HashSet<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub total: i64,
    pub expected_total: i64,
    pub per_db_total: Vec<(String, i64)>,
    /// Distinct txn ids in the ledgers.
    pub ledger_txns: usize,
    pub one_legged: Vec<String>,
    pub unbalanced: Vec<String>,
    pub balance_ledger_mismatch: Vec<String>,
    pub missing_committed: Vec<String>,
    pub present_aborted: Vec<String>,
    pub leftover_prepared: Vec<(String, String)>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.violations().is_empty()
    }

    /// One line per broken rule.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.total != self.expected_total {
            v.push(format!(
                "total {} != expected {}",
                self.total, self.expected_total
            ));
        }
        let list = |name: &str, items: &[String], v: &mut Vec<String>| {
            if !items.is_empty() {
                let shown: Vec<&str> = items.iter().take(10).map(String::as_str).collect();
                v.push(format!("{name}: {} ({})", items.len(), shown.join(", ")));
            }
        };
        list("one-legged transfers", &self.one_legged, &mut v);
        list("unbalanced transfers", &self.unbalanced, &mut v);
        list(
            "balance/ledger mismatch",
            &self.balance_ledger_mismatch,
            &mut v,
        );
        list(
            "acknowledged commits missing",
            &self.missing_committed,
            &mut v,
        );
        list("aborted transfers present", &self.present_aborted, &mut v);
        if !self.leftover_prepared.is_empty() {
            let shown: Vec<String> = self
                .leftover_prepared
                .iter()
                .take(10)
                .map(|(db, gid)| format!("{db}:{gid}"))
                .collect();
            v.push(format!(
                "prepared transactions left: {} ({})",
                self.leftover_prepared.len(),
                shown.join(", ")
            ));
        }
        v
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_db: Vec<String> = self
            .per_db_total
            .iter()
            .map(|(db, t)| format!("{db}={t}"))
            .collect();
        writeln!(
            f,
            "audit: total {} (expected {}; {}), {} transfers in the ledgers",
            self.total,
            self.expected_total,
            per_db.join(", "),
            self.ledger_txns
        )?;
        let v = self.violations();
        if v.is_empty() {
            write!(f, "audit: every rule holds")
        } else {
            write!(f, "audit: VIOLATIONS: {}", v.join("; "))
        }
    }
}

/// The prepared transactions whose GID starts with `gid_prefix`, on every database of
/// `dbs` (`(name, url)`), as `name:gid`.
pub async fn prepared_gids(
    dbs: &[(String, String)],
    gid_prefix: &str,
) -> Result<Vec<String>, BankError> {
    let mut out = Vec::new();
    for (name, url) in dbs {
        let client = connect(name, url).await?;
        let rows = client
            .query(
                "SELECT gid FROM pg_prepared_xacts \
                 WHERE database = current_database() AND starts_with(gid, $1)",
                &[&gid_prefix],
            )
            .await
            .map_err(|source| BankError::Db {
                db: name.clone(),
                source,
            })?;
        out.extend(
            rows.iter()
                .map(|r| format!("{name}:{}", r.get::<_, String>(0))),
        );
    }
    Ok(out)
}

/// Checks every rule over `dbs` (`(name, url)`).
pub async fn audit(
    dbs: &[(String, String)],
    expected_total: i64,
    initial_per_db: &[(String, i64)],
    gid_prefix: &str,
    expect: Option<&Expectation>,
) -> Result<AuditReport, BankError> {
    let mut report = AuditReport {
        expected_total,
        ..AuditReport::default()
    };
    // txn id -> (ledger rows, sum of deltas). A transfer writes one row per leg, on one
    // database or several (a single-database transfer has both legs on one).
    let mut legs: HashMap<String, (i64, i64)> = HashMap::new();
    for (name, url) in dbs {
        let client = connect(name, url).await?;
        let err = |source| BankError::Db {
            db: name.clone(),
            source,
        };
        let total: i64 = client
            .query_one("SELECT COALESCE(sum(bal), 0)::bigint FROM acct", &[])
            .await
            .map_err(err)?
            .get(0);
        report.total += total;
        report.per_db_total.push((name.clone(), total));
        let rows = client
            .query(
                "SELECT txn_id, sum(delta)::bigint, count(*) FROM ledger GROUP BY txn_id",
                &[],
            )
            .await
            .map_err(err)?;
        let mut ledger_sum = 0i64;
        for r in rows {
            let id: String = r.get(0);
            let delta: i64 = r.get(1);
            let rows: i64 = r.get(2);
            ledger_sum += delta;
            let e = legs.entry(id).or_default();
            e.0 += rows;
            e.1 += delta;
        }
        let initial = initial_per_db
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .unwrap_or(0);
        if total != initial + ledger_sum {
            report.balance_ledger_mismatch.push(format!(
                "{name}: balances {total} != initial {initial} + ledger {ledger_sum}"
            ));
        }
        let prepared = client
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .map_err(err)?;
        for r in prepared {
            let gid: String = r.get(0);
            if gid.starts_with(gid_prefix) {
                report.leftover_prepared.push((name.clone(), gid));
            }
        }
    }
    report.ledger_txns = legs.len();
    for (id, (rows, sum)) in &legs {
        if *rows < 2 {
            report.one_legged.push(id.clone());
        } else if *sum != 0 {
            report.unbalanced.push(id.clone());
        }
    }
    if let Some(expect) = expect {
        for id in &expect.committed {
            if !legs.contains_key(id) {
                report.missing_committed.push(id.clone());
            }
        }
        for id in &expect.aborted {
            if legs.contains_key(id) {
                report.present_aborted.push(id.clone());
            }
        }
    }
    for v in [
        &mut report.one_legged,
        &mut report.unbalanced,
        &mut report.missing_committed,
        &mut report.present_aborted,
    ] {
        v.sort();
    }
    Ok(report)
}
