//! The `twopc` schema in the agent's database: the decision table, the epoch table, and
//! the one door client transactions have into them.
//!
//! Client statements run as the agent's client role (`AgentConfig::database_url`). The
//! schema belongs to the system role (`AgentConfig::system_database_url`): the agent
//! reads and writes the tables on the system role's own sessions, and a branch writes
//! its decision row, inside its own transaction, only through
//! `twopc.record_commit_v1`, a `SECURITY DEFINER` function that demands a secret kept in
//! `twopc.secret` (which only the system role can read). The client role gets USAGE on
//! the schema and EXECUTE on that function, nothing else: a client statement that reads,
//! forges or deletes a decision row, or calls the function without the secret, fails
//! with a permission error.
//!
//! With one role for both (no system URL given, or the same role), or a client role
//! that is a superuser or a member of the system role, nothing here is protected from
//! client statements: the agent says so at start ([`Schema::unprotected`]).

use tracing::warn;

/// The function a branch calls to write its decision row; versioned, so a changed body
/// is a new function rather than a replacement another role would have to own.
const RECORD_COMMIT: &str = "twopc.record_commit_v1";
/// The call a branch pipelines right before COMMIT: `$1` the secret, `$2` the GID, `$3`
/// the txn id, `$4` the participants, `$5` true to write the row only if the transaction
/// wrote something (a one-phase commit). Answers whether the row went in.
pub(super) const RECORD_COMMIT_CALL: &str = "SELECT twopc.record_commit_v1($1::pg_catalog.text, \
     $2::pg_catalog.text, $3::pg_catalog.text, $4::pg_catalog.text[], $5::pg_catalog.bool)";

const SCHEMA_DDL: &str = "CREATE SCHEMA IF NOT EXISTS twopc; \
    CREATE TABLE IF NOT EXISTS twopc.decisions ( \
        gid text PRIMARY KEY, \
        committed boolean NOT NULL, \
        txn_id text NOT NULL DEFAULT '', \
        participants text[] NOT NULL DEFAULT '{}', \
        decided_at timestamptz NOT NULL DEFAULT now()); \
    CREATE TABLE IF NOT EXISTS twopc.secret ( \
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), \
        token text NOT NULL); \
    INSERT INTO twopc.secret (token) \
        SELECT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '') \
        ON CONFLICT DO NOTHING";

/// Every name in the body is schema-qualified, operators included: the function runs
/// with the system role's rights but under the caller's `search_path`, which a client
/// statement may have pointed at its own operators. (A `SET search_path` clause would
/// do too, at the price of a setting saved and restored on every commit.)
const RECORD_COMMIT_DDL: &str = "CREATE FUNCTION twopc.record_commit_v1( \
        p_token text, p_gid text, p_txn_id text, p_participants text[], p_only_if_wrote boolean) \
    RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER AS $body$ \
    BEGIN \
        IF NOT EXISTS (SELECT 1 FROM twopc.secret s \
                       WHERE s.token OPERATOR(pg_catalog.=) p_token) THEN \
            RAISE EXCEPTION 'twopc.record_commit_v1 is for the twopc agent only' \
                USING ERRCODE = 'insufficient_privilege'; \
        END IF; \
        IF p_only_if_wrote AND pg_catalog.txid_current_if_assigned() IS NULL THEN \
            RETURN false; \
        END IF; \
        INSERT INTO twopc.decisions (gid, committed, txn_id, participants) \
            VALUES (p_gid, true, p_txn_id, p_participants); \
        RETURN true; \
    END $body$; \
    REVOKE ALL ON FUNCTION twopc.record_commit_v1(text, text, text, text[], boolean) FROM PUBLIC";

/// Tries of [`set_up`].
const SET_UP_ATTEMPTS: u64 = 5;
const FUNCTION_EXISTS: &str =
    "SELECT to_regprocedure('twopc.record_commit_v1(text,text,text,text[],boolean)') IS NOT NULL";
const READ_SECRET: &str = "SELECT token FROM twopc.secret";

/// Why client statements can reach the schema, if they can. `$1` is the client role;
/// runs as the system role.
const PROTECTION: &str = "SELECT \
    CASE WHEN $1 = current_user THEN 'the client role is the system role' \
         WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = $1) THEN 'the client role is a superuser' \
         WHEN pg_has_role($1, current_user, 'MEMBER') THEN 'the client role is a member of the system role' \
         WHEN (SELECT rolcreaterole FROM pg_roles WHERE rolname = $1) \
           THEN 'the client role has CREATEROLE (it can make itself a member of the system role)' \
         WHEN (SELECT d.datdba = r.oid FROM pg_database d, pg_roles r \
               WHERE d.datname = current_database() AND r.rolname = $1) \
           THEN 'the client role owns the database (it can change the system role''s settings there)' \
         WHEN has_schema_privilege($1, 'twopc', 'CREATE') THEN 'the client role may create objects in schema twopc' \
         WHEN has_table_privilege($1, 'twopc.decisions', 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') \
           OR has_table_privilege($1, 'twopc.epochs', 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') \
           OR has_table_privilege($1, 'twopc.secret', 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') \
           THEN 'the client role has privileges on the twopc tables (does it own them? \
                 ALTER TABLE ... OWNER TO the system role)' \
         ELSE NULL END";

/// What the agent found (and set up) at start.
pub(super) struct Schema {
    /// The decision table and its function are usable: the agent can commit last.
    pub decisions: bool,
    /// The secret `twopc.record_commit_v1` demands (empty when `decisions` is false).
    pub token: String,
    /// Why client statements can read or write the schema; None when they cannot.
    pub unprotected: Option<String>,
}

impl Schema {
    /// No decision table (`AgentConfig::decision_table` is off).
    pub fn none() -> Schema {
        Schema {
            decisions: false,
            token: String::new(),
            unprotected: None,
        }
    }
}

/// The server's message for a database error (tokio-postgres's Display says only "db
/// error").
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}

/// Quotes a role name as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates what is missing (as the system role, on `system`), grants the client role
/// its door, and reads the secret. Failures leave the agent without a decision table,
/// with a warning: it then never commits last.
pub(super) async fn set_up(system: &tokio_postgres::Client, client_role: &str) -> Schema {
    // Agents starting at once on one database race on the catalog (a unique key, "tuple
    // concurrently updated" on a GRANT): a few tries, a little apart.
    let mut outcome = try_set_up(system, client_role).await;
    for attempt in 1..SET_UP_ATTEMPTS {
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
        outcome = try_set_up(system, client_role).await;
    }
    match outcome {
        Ok(token) => Schema {
            decisions: true,
            token,
            unprotected: protection(system, client_role).await,
        },
        Err(e) => {
            warn!(
                error = %e,
                "no usable decision table (twopc.decisions): this agent cannot commit last; \
                 give it a system role that may create schema twopc (see README, Security)"
            );
            Schema::none()
        }
    }
}

async fn try_set_up(
    system: &tokio_postgres::Client,
    client_role: &str,
) -> Result<String, tokio_postgres::Error> {
    create_missing(system).await?;
    let system_role: String = system
        .query_one("SELECT current_user::text", &[])
        .await?
        .try_get(0)?;
    if system_role != client_role {
        let role = quote_ident(client_role);
        system
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA twopc TO {role}; \
                 GRANT EXECUTE ON FUNCTION {RECORD_COMMIT}(text, text, text, text[], boolean) TO {role}"
            ))
            .await?;
    }
    system.query_one(READ_SECRET, &[]).await?.try_get(0)
}

async fn create_missing(system: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    system.batch_execute(SCHEMA_DDL).await?;
    system.batch_execute(super::epochs::EPOCH_DDL).await?;
    let exists: bool = system.query_one(FUNCTION_EXISTS, &[]).await?.try_get(0)?;
    if !exists {
        system.batch_execute(RECORD_COMMIT_DDL).await?;
    }
    Ok(())
}

/// Why client statements can reach the schema (see [`PROTECTION`]), warned once here.
async fn protection(system: &tokio_postgres::Client, client_role: &str) -> Option<String> {
    let reason = match system.query_one(PROTECTION, &[&client_role]).await {
        Ok(row) => row
            .try_get::<_, Option<String>>(0)
            .unwrap_or_else(|e| Some(e.to_string())),
        Err(e) => Some(format!("the check failed: {}", db_message(&e))),
    };
    if let Some(r) = &reason {
        warn!(
            reason = %r,
            "client statements can read and write the decision and epoch tables: a client \
             could forge or delete a decision row; give the agent a separate system role \
             (--system-database, see README, Security)"
        );
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_quoted_as_identifiers() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"; DROP"), "\"a\"\"; DROP\"");
    }
}
