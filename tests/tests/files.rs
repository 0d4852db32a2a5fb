//! Secrets and files: the coordinator's data directory says what committed, so nobody
//! else on the machine may read or change it.

use std::os::unix::fs::PermissionsExt;

use twopc_testkit::{AgentMode, Harness};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_the_log_are_private() {
    let h = Harness::start(1, AgentMode::InProcess).await.unwrap();
    let dir = h.data_dir.clone();
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&dir.join("log")), 0o700);
    let mut files = vec![dir.join("coordinator.meta")];
    for entry in std::fs::read_dir(dir.join("log")).unwrap() {
        files.push(entry.unwrap().path());
    }
    assert!(files
        .iter()
        .any(|f| f.extension().is_some_and(|e| e == "seg")));
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // A directory made readable by someone is made private again at the next start.
    let mut h = h;
    h.stop_coordinator().await.unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.start_coordinator(|_| {}).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    h.shutdown().await.unwrap();
}
