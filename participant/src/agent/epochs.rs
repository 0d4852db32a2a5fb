//! Durable fencing: the newest epoch per coordinator id, kept in the agent's database
//! (`twopc.epochs`) so that a restart of the agent does not let a stale incarnation of a
//! coordinator back in, and bounded so that no handshake can push an id's epoch out of
//! reach of its real coordinator.

use std::collections::HashMap;
use std::time::Duration;

use tracing::warn;
use twopc_shared::msg::{AgentError, ErrorKind};

use super::{agent_error, Agent};

/// The epoch table, created by the agent if it may (see [`load`]).
pub const EPOCH_TABLE: &str = "twopc.epochs";
/// An epoch is accepted only if it is at most this far ahead of the newest seen for its
/// coordinator id (0 for an id never seen). A coordinator's epoch grows by one per
/// start, so this is a million restarts between two handshakes with this agent.
pub const MAX_EPOCH_STEP: u64 = 1_000_000;

pub(super) const EPOCH_DDL: &str = "CREATE SCHEMA IF NOT EXISTS twopc; \
    CREATE TABLE IF NOT EXISTS twopc.epochs ( \
        coordinator_id text PRIMARY KEY, \
        epoch bigint NOT NULL, \
        updated_at timestamptz NOT NULL DEFAULT now())";
const EPOCH_USABLE: &str = "SELECT CASE WHEN to_regclass('twopc.epochs') IS NULL THEN false \
     ELSE has_table_privilege('twopc.epochs', 'SELECT, INSERT, UPDATE') END";
const EPOCH_LOAD: &str = "SELECT coordinator_id, epoch FROM twopc.epochs";
/// Never lowers an epoch; answers the newest on record (another agent process on the
/// same database may have recorded a newer one).
const EPOCH_RECORD: &str = "INSERT INTO twopc.epochs (coordinator_id, epoch) VALUES ($1, $2) \
     ON CONFLICT (coordinator_id) DO UPDATE \
     SET epoch = GREATEST(twopc.epochs.epoch, EXCLUDED.epoch), updated_at = now() \
     RETURNING epoch";

/// Makes sure the epoch table exists and this role may use it, and reads it. `None`
/// (with a warning) if it cannot: fencing then lives in memory only.
pub(super) async fn load(client: &tokio_postgres::Client) -> Option<HashMap<String, u64>> {
    async fn usable(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
        client
            .query_one(EPOCH_USABLE, &[])
            .await
            .and_then(|r| r.try_get::<_, bool>(0))
    }
    let mut create_error = None;
    if !matches!(usable(client).await, Ok(true)) {
        // Two agents starting at once may race on the catalog's unique keys: try twice.
        for _ in 0..2 {
            match client.batch_execute(EPOCH_DDL).await {
                Ok(()) => break,
                Err(e) => create_error = Some(e),
            }
        }
    }
    let loaded = match usable(client).await {
        Ok(true) => client.query(EPOCH_LOAD, &[]).await.and_then(|rows| {
            rows.iter()
                .map(|r| {
                    let epoch: i64 = r.try_get(1)?;
                    Ok((r.try_get::<_, String>(0)?, epoch.max(0) as u64))
                })
                .collect::<Result<HashMap<_, _>, tokio_postgres::Error>>()
        }),
        Ok(false) => {
            warn!(
                create_error = ?create_error.map(|e| e.to_string()),
                "no usable epoch table ({EPOCH_TABLE}): fencing is kept in memory only, so after \
                 a restart of this agent a stale coordinator incarnation that connects first is \
                 not fenced; create the table (see README) or grant this role CREATE on the database"
            );
            return None;
        }
        Err(e) => Err(e),
    };
    match loaded {
        Ok(epochs) => Some(epochs),
        Err(e) => {
            warn!(error = %e, "reading {EPOCH_TABLE} failed: fencing is kept in memory only");
            None
        }
    }
}

impl Agent {
    /// Admits `epoch` for `coordinator_id` at a handshake: refused if older than the
    /// newest seen (`Fenced`) or more than [`MAX_EPOCH_STEP`] ahead of it
    /// (`EpochOutOfRange`); a newer one is written to [`EPOCH_TABLE`] before it is
    /// accepted, so it survives a restart. Then [`Agent::check_epoch`] records it (and
    /// rolls back the older incarnations' open branches).
    pub(super) async fn admit_epoch(
        &self,
        coordinator_id: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let newest = self.tables().epochs.get(coordinator_id).copied();
        if newest.is_some_and(|n| epoch <= n) {
            // The same epoch (another connection of it), or a stale one: memory decides.
            return self.check_epoch(coordinator_id, epoch);
        }
        let base = newest.unwrap_or(0);
        let limit = base.saturating_add(MAX_EPOCH_STEP).min(i64::MAX as u64);
        if epoch > limit {
            return Err(AgentError::new(
                ErrorKind::EpochOutOfRange,
                format!(
                    "coordinator {coordinator_id} epoch {epoch} is more than {MAX_EPOCH_STEP} \
                     ahead of the newest seen ({base}); refused"
                ),
            ));
        }
        if self.inner.epochs_durable {
            let record = async {
                let session = self.system_session().await?;
                let row = session
                    .query_one(EPOCH_RECORD, &[&coordinator_id, &(epoch as i64)])
                    .await
                    .map_err(|e| agent_error(&e, None))?;
                row.try_get::<_, i64>(0).map_err(|e| agent_error(&e, None))
            };
            let recorded = tokio::time::timeout(timeout, record).await.map_err(|_| {
                AgentError::new(ErrorKind::Timeout, "recording the epoch timed out")
            })??;
            let recorded = recorded.max(0) as u64;
            if recorded > epoch {
                // Another process on this database saw a newer incarnation: learn it,
                // and refuse this one.
                self.check_epoch(coordinator_id, recorded)?;
            }
        }
        self.check_epoch(coordinator_id, epoch)
    }

    /// The newest epoch per coordinator id survives a restart of the agent.
    pub fn epochs_durable(&self) -> bool {
        self.inner.epochs_durable
    }
}
