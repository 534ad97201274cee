//! Noticing that the config file changed, and what of a new config can apply while running.
//!
//! Three triggers, because each alone misses cases: inotify on the file's *directory* (an
//! editor's rename-over and Kubernetes' ConfigMap update both replace directory entries — the
//! kubelet writes a new timestamped directory and renames the `..data` symlink over the old
//! one, so a watch on the file itself would stay on the old inode forever); a slow poll of the
//! file's identity, for filesystems without inotify (NFS, some overlay setups) and for a
//! watch that could not be set up; and SIGHUP, which reloads even when nothing seems changed
//! (the operator asked). A trigger only leads to a reload when the file's text differs from
//! the text last loaded, so the several events of one swap make one reload, and a refused
//! file is not retried until it changes again.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::config::Config;

/// How often the file's identity is compared when no inotify event came.
pub const POLL: Duration = Duration::from_secs(2);

/// Quiet time after a filesystem event before the file is read: the kubelet's swap is
/// several directory operations, an editor's save a few.
const SETTLE: Duration = Duration::from_millis(50);

/// Why a reload is attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The file (or a link on its path) may have changed: reload if its text did.
    Changed,
    /// SIGHUP: reload.
    Signal,
}

/// What identifies a file's current content cheaply: where its path resolves to (through
/// the symlinks Kubernetes mounts ConfigMaps and Secrets with), and that file's inode, size
/// and modification time. A swap to a new version changes it even when the new file has the
/// old one's size and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    resolved: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

/// `None` when the file cannot be found.
pub fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let resolved = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&resolved).ok()?;
    Some(Stamp {
        resolved,
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Yields [`Trigger`]s for one config file until dropped.
pub struct Watch {
    path: PathBuf,
    events: mpsc::Receiver<()>,
    /// Kept alive for its inotify watch; `None` when it could not be set up (then the poll
    /// alone notices changes).
    _watcher: Option<notify::RecommendedWatcher>,
    signals: Option<tokio::signal::unix::Signal>,
    poll: tokio::time::Interval,
    stamp: Option<Stamp>,
}

impl Watch {
    pub fn new(path: &Path) -> Watch {
        let (tx, events) = mpsc::channel(1);
        let watcher = watch_directory(path, tx);
        let signals = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: the config reloads on file changes only");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Watch {
            path: path.to_path_buf(),
            events,
            _watcher: watcher,
            signals,
            poll,
            // Unknown: the first poll (at once) compares the file with the running config,
            // covering changes made between loading it and watching it.
            stamp: None,
        }
    }

    /// The next reason to look at the file again.
    pub async fn next(&mut self) -> Trigger {
        loop {
            let signal = async {
                match &mut self.signals {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signal => return Trigger::Signal,
                Some(()) = self.events.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while self.events.try_recv().is_ok() {}
                    self.stamp = stamp(&self.path);
                    return Trigger::Changed;
                }
                _ = self.poll.tick() => {
                    let now = stamp(&self.path);
                    if now != self.stamp {
                        self.stamp = now;
                        return Trigger::Changed;
                    }
                }
            }
        }
    }
}

/// An inotify watch on the directory holding `path` (not recursive: the kubelet's swap
/// renames `..data` in that directory).
fn watch_directory(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // Full means a reload is already due: one is enough.
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(error) => {
            tracing::warn!(%error, "no inotify watch; polling the config every {POLL:?}");
            return None;
        }
    };
    match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the config's directory; polling it every {POLL:?}");
            None
        }
    }
}

/// The sections of `new` that differ from `running` but only take effect at a restart: the
/// listeners are bound once, logging is set up once, and the outbox directory is locked and
/// its settings shared by every writer. `outbox_open`: whether the running process has an
/// outbox (one not yet opened takes the new settings when it opens).
pub fn needs_restart(running: &Config, new: &Config, outbox_open: bool) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if running.listen != new.listen {
        keys.push("listen");
    }
    if running.admin != new.admin {
        keys.push("admin");
    }
    if running.log != new.log {
        keys.push("log");
    }
    if outbox_open && running.outbox != new.outbox {
        keys.push("outbox");
    }
    keys
}

/// `new` with the sections that need a restart put back as they run.
pub fn effective(running: &Config, mut new: Config, outbox_open: bool) -> Config {
    new.listen = running.listen.clone();
    new.admin = running.admin.clone();
    new.log = running.log.clone();
    if outbox_open {
        new.outbox = running.outbox.clone();
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let yaml = format!(
            "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: http://127.0.0.1:3000 }}\n{extra}"
        );
        match Config::from_yaml(&yaml, "test.yaml") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn listeners_log_and_an_open_outbox_need_a_restart() {
        let running = config("");
        let same = config("");
        assert!(needs_restart(&running, &same, true).is_empty());
        let moved = config("log: { level: debug }\noutbox: { dir: /tmp/elsewhere }\n");
        assert_eq!(needs_restart(&running, &moved, true), ["log", "outbox"]);
        assert_eq!(needs_restart(&running, &moved, false), ["log"]);
        let kept = effective(&running, moved.clone(), true);
        assert_eq!(kept.log, running.log);
        assert_eq!(kept.outbox, running.outbox);
        let opened_later = effective(&running, moved.clone(), false);
        assert_eq!(
            opened_later.outbox, moved.outbox,
            "not open yet: new settings"
        );
    }

    #[test]
    fn a_stamp_follows_symlinks_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dir.path().join("..2026_11_27_1");
        let second = dir.path().join("..2026_11_27_2");
        for d in [&first, &second] {
            std::fs::create_dir(d).expect("mkdir");
            std::fs::write(d.join("ficus.yaml"), "a: 1\n").expect("write");
        }
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink(&first, &data).expect("link");
        let path = dir.path().join("ficus.yaml");
        std::os::unix::fs::symlink("..data/ficus.yaml", &path).expect("link");
        let before = stamp(&path).expect("stamp");
        // The kubelet's swap: a new link renamed over `..data`.
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&second, &tmp).expect("link");
        std::fs::rename(&tmp, &data).expect("rename");
        let after = stamp(&path).expect("stamp");
        assert_ne!(before, after, "same text, other file");
        assert_eq!(
            after.resolved,
            second.join("ficus.yaml").canonicalize().expect("canon")
        );
    }
}
