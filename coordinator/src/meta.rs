//! The coordinator's identity file: its id and its epoch, bumped durably on every start
//! before any transaction of the new incarnation can begin.
//!
//! Format: `b"TWOPCMETA1" | epoch u64 LE | id_len u16 LE | id | crc32c(all before) u32 LE`,
//! written with the write-fsync-rename-fsync(dir) dance so a crash leaves either the old
//! file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use twopc_shared::gid::validate_coordinator_id;

const MAGIC: &[u8; 10] = b"TWOPCMETA1";
const FILE_NAME: &str = "coordinator.meta";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "data directory belongs to coordinator {found:?}, not {configured:?}; \
         use the same --coordinator-id or another --data-dir"
    )]
    IdMismatch { found: String, configured: String },
    #[error(transparent)]
    Id(#[from] twopc_shared::gid::IdError),
    #[error(
        "data directory {dir} is in use by another coordinator process; stop it first, \
         or use another --data-dir"
    )]
    Locked { dir: PathBuf },
}

/// Name of the lock file that keeps two coordinators off one data directory.
const LOCK_FILE_NAME: &str = "LOCK";

/// Held while a coordinator uses its data directory (an exclusive `flock`, released
/// when dropped or when the process dies). Taken before anything in the directory
/// changes: a second `serve` on a directory in use must leave it exactly as it was.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Creates `dir` (and its parents) if missing, and makes it private (0700): the data
/// directory holds the decision log, which says what committed.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Opens `path` for writing, created with mode 0600 (never readable by others, not
/// even for a moment).
pub(crate) fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Takes an exclusive `flock` on `path` (created if missing) without waiting:
/// `Ok(None)` if another process holds it. Shared by the data directory and the log.
pub(crate) fn try_lock_file(path: &Path) -> std::io::Result<Option<File>> {
    let file = private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Locks `dir` (creating it if needed) for this process, or says who has it.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, MetaError> {
    create_private_dir(dir).map_err(io(dir))?;
    let path = dir.join(LOCK_FILE_NAME);
    match try_lock_file(&path).map_err(io(&path))? {
        Some(file) => Ok(DataDirLock { _file: file }),
        None => Err(MetaError::Locked {
            dir: dir.to_path_buf(),
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub coordinator_id: String,
    pub epoch: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MetaError + '_ {
    move |source| MetaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the identity file, if there is one.
pub fn read(dir: &Path) -> Result<Option<Meta>, MetaError> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| MetaError::Corrupt { path, reason })
}

fn decode(b: &[u8]) -> Result<Meta, String> {
    let min = MAGIC.len() + 8 + 2 + 4;
    if b.len() < min {
        return Err(format!("{} bytes, need at least {min}", b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    if &body[..MAGIC.len()] != MAGIC {
        return Err("bad magic".into());
    }
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&body[MAGIC.len()..MAGIC.len() + 8]);
    let at = MAGIC.len() + 8;
    let id_len = u16::from_le_bytes([body[at], body[at + 1]]) as usize;
    let id = body
        .get(at + 2..)
        .filter(|rest| rest.len() == id_len)
        .ok_or("id length does not match the file")?;
    let id = std::str::from_utf8(id).map_err(|_| "id is not UTF-8")?;
    Ok(Meta {
        coordinator_id: id.to_owned(),
        epoch: u64::from_le_bytes(epoch),
    })
}

fn encode(m: &Meta) -> Vec<u8> {
    let mut b = Vec::with_capacity(MAGIC.len() + 14 + m.coordinator_id.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&m.epoch.to_le_bytes());
    b.extend_from_slice(&(m.coordinator_id.len() as u16).to_le_bytes());
    b.extend_from_slice(m.coordinator_id.as_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Starts a new incarnation: reads the file (creating the directory and file on first
/// start), checks the id, writes `epoch + 1` durably and returns it.
pub fn bump_epoch(dir: &Path, coordinator_id: &str) -> Result<Meta, MetaError> {
    validate_coordinator_id(coordinator_id)?;
    create_private_dir(dir).map_err(io(dir))?;
    let previous = read(dir)?;
    if let Some(p) = &previous {
        if p.coordinator_id != coordinator_id {
            return Err(MetaError::IdMismatch {
                found: p.coordinator_id.clone(),
                configured: coordinator_id.to_owned(),
            });
        }
    }
    let next = Meta {
        coordinator_id: coordinator_id.to_owned(),
        epoch: previous.map_or(1, |p| p.epoch + 1),
    };
    write_durably(dir, FILE_NAME, &encode(&next))?;
    // Read back what is on disk: the epoch we hand out must be the one that survives.
    let back = read(dir)?;
    assert_eq!(back.as_ref(), Some(&next), "meta file read back differs");
    Ok(next)
}

/// write tmp, fsync, rename over `name`, fsync the directory.
pub(crate) fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), MetaError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let mut f = private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &dst).map_err(io(&dst))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_increases_and_survives() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(bump_epoch(d.path(), "c1").unwrap().epoch, 1);
        assert_eq!(bump_epoch(d.path(), "c1").unwrap().epoch, 2);
        assert_eq!(read(d.path()).unwrap().unwrap().epoch, 2);
    }

    #[test]
    fn other_id_is_refused() {
        let d = tempfile::tempdir().unwrap();
        bump_epoch(d.path(), "c1").unwrap();
        assert!(matches!(
            bump_epoch(d.path(), "c2"),
            Err(MetaError::IdMismatch { .. })
        ));
    }

    #[test]
    fn flipped_bit_is_corruption_not_a_reset() {
        let d = tempfile::tempdir().unwrap();
        bump_epoch(d.path(), "c1").unwrap();
        let p = d.path().join(FILE_NAME);
        let mut b = fs::read(&p).unwrap();
        b[MAGIC.len()] ^= 0x01;
        fs::write(&p, &b).unwrap();
        assert!(matches!(
            bump_epoch(d.path(), "c1"),
            Err(MetaError::Corrupt { .. })
        ));
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err());
        }
    }
}
