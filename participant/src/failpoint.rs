//! Failpoints for crash tests.
//!
//! Built only with the cargo feature `failpoints`; without it every failpoint compiles to
//! nothing. Configured by the environment variable `TWOPC_FAILPOINTS`, read once:
//! `name=action;name=action`, where action is
//! - `crash`: exit at once (status 137, no destructors, no flushing: like kill -9),
//! - `sleep(MS)`: pause this task for MS milliseconds,
//! - `error`: make the step fail as an I/O error would,
//! - `skip`: leave the step out (only where a failpoint says so: it builds a deliberately
//!   broken binary, e.g. `coordinator.skip_decision_log`, to show the chaos audit can tell),
//!
//! optionally followed by `@N` to act only on the N-th hit (earlier hits pass), so a
//! crash can land in the middle of a running workload, or by `%N` to act on every N-th
//! hit (a broken build that misbehaves now and then, among correct answers).
//!
//! The coordinator's failpoints use this module too (the coordinator depends on the
//! participant crate).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Crash,
    Sleep(u64),
    Error,
    Skip,
}

/// Which hits of a failpoint act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
enum When {
    Always,
    /// Only on this hit (1-based).
    OnHit(u64),
    /// On every hit whose number is a multiple of this.
    Every(u64),
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
impl When {
    fn acts_on(self, hit: u64) -> bool {
        match self {
            When::Always => true,
            When::OnHit(n) => hit == n,
            When::Every(n) => hit.is_multiple_of(n),
        }
    }
}

/// `crash@3` → (`crash`, only the 3rd hit); `skip%20` → (`skip`, every 20th hit);
/// `error` → (`error`, every hit). `None`: a count that is not a positive number.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn split_when(action: &str) -> Option<(&str, When)> {
    let count = |n: &str| n.parse::<u64>().ok().filter(|n| *n > 0);
    if let Some((a, n)) = action.split_once('@') {
        Some((a, When::OnHit(count(n)?)))
    } else if let Some((a, n)) = action.split_once('%') {
        Some((a, When::Every(count(n)?)))
    } else {
        Some((action, When::Always))
    }
}

#[cfg(feature = "failpoints")]
mod imp {
    use super::{Action, When};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Point {
        action: Action,
        when: When,
        hits: AtomicU64,
    }

    fn table() -> &'static HashMap<String, Point> {
        static TABLE: OnceLock<HashMap<String, Point>> = OnceLock::new();
        TABLE.get_or_init(|| {
            let spec = std::env::var("TWOPC_FAILPOINTS").unwrap_or_default();
            parse(&spec)
        })
    }

    fn parse(spec: &str) -> HashMap<String, Point> {
        let mut out = HashMap::new();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((name, action)) = item.split_once('=') else {
                eprintln!("TWOPC_FAILPOINTS: ignoring {item:?} (want name=action)");
                continue;
            };
            let Some((action, when)) = super::split_when(action) else {
                eprintln!("TWOPC_FAILPOINTS: bad @N or %N in {item:?}");
                continue;
            };
            let action = match action {
                "crash" => Action::Crash,
                "error" => Action::Error,
                "skip" => Action::Skip,
                a if a.starts_with("sleep(") && a.ends_with(')') => {
                    match a[6..a.len() - 1].parse() {
                        Ok(ms) => Action::Sleep(ms),
                        Err(_) => {
                            eprintln!("TWOPC_FAILPOINTS: bad sleep in {item:?}");
                            continue;
                        }
                    }
                }
                _ => {
                    eprintln!("TWOPC_FAILPOINTS: unknown action in {item:?}");
                    continue;
                }
            };
            out.insert(
                name.trim().to_owned(),
                Point {
                    action,
                    when,
                    hits: AtomicU64::new(0),
                },
            );
        }
        out
    }

    pub fn check(name: &str) -> Option<Action> {
        let p = table().get(name)?;
        let hit = p.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if !p.when.acts_on(hit) {
            return None;
        }
        if p.action == Action::Crash {
            eprintln!("failpoint {name}: crash");
            // Like kill -9: no unwinding, no destructors, no buffered output.
            unsafe { libc_exit(137) }
        }
        Some(p.action)
    }

    extern "C" {
        #[link_name = "_exit"]
        fn libc_exit(status: i32) -> !;
    }
}

/// Evaluates the failpoint `name`: `None` to carry on, or the action to take (`Crash`
/// never returns).
#[inline]
pub fn check(name: &str) -> Option<Action> {
    #[cfg(feature = "failpoints")]
    {
        imp::check(name)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

/// In an async fn: `failpoint!("name", error_expr)` sleeps, crashes, or returns
/// `Err(error_expr)` as configured; `failpoint!("name")` only sleeps or crashes.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        match $crate::failpoint::check($name) {
            Some($crate::failpoint::Action::Sleep(ms)) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await
            }
            _ => {}
        }
    };
    ($name:expr, $err:expr) => {
        match $crate::failpoint::check($name) {
            Some($crate::failpoint::Action::Sleep(ms)) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await
            }
            Some($crate::failpoint::Action::Error) => return Err($err),
            _ => {}
        }
    };
}

/// Synchronous contexts (the log writer thread, sync code under tokio): sleeps the
/// thread, crashes, or returns true if the step should fail. On a multi-threaded tokio
/// worker the sleep hands the worker's other tasks to another thread first: they
/// would otherwise wait out the sleep with it (the task in a worker's LIFO slot cannot
/// be stolen), hiding the very window a test opens.
pub fn check_sync(name: &str) -> bool {
    match check(name) {
        Some(Action::Sleep(ms)) => {
            let sleep = || std::thread::sleep(std::time::Duration::from_millis(ms));
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if multi_thread {
                tokio::task::block_in_place(sleep);
            } else {
                sleep();
            }
            false
        }
        Some(Action::Error) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_counts_choose_which_hits_act() {
        let acting = |spec: &str| {
            let (_, when) = split_when(spec).unwrap();
            (1..=9).filter(|h| when.acts_on(*h)).collect::<Vec<u64>>()
        };
        assert_eq!(acting("skip"), (1..=9).collect::<Vec<_>>());
        assert_eq!(acting("crash@3"), vec![3]);
        assert_eq!(acting("skip%4"), vec![4, 8]);
        assert_eq!(split_when("skip%4").unwrap().0, "skip");
        for bad in ["skip%0", "crash@0", "crash@x", "skip%-1"] {
            assert!(split_when(bad).is_none(), "{bad}");
        }
    }
}
