//! Hot reload: watches every plugin file and the config file (through their
//! directories, so replacing a file by rename is seen) and asks the host to
//! reload once a changed file has been quiet for a moment. Debouncing is per
//! file (`notify-debouncer-full`), so writes to other files in the same
//! directory (a SQLite journal beside `gateway.toml`) never hold a reload
//! back, and only changes count: the reload's own reads of the files do not
//! start another.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};

use super::{PluginConfig, PluginHost, PluginSource};

/// Quiet time after a file's last change before reloading (editors and `cp` write in bursts).
const SETTLE: Duration = Duration::from_millis(200);

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The files whose changes matter: plugin files and the config file.
fn watched_files(
    config_path: Option<&Path>,
    plugins: impl Iterator<Item = PathBuf>,
) -> HashSet<PathBuf> {
    plugins
        .chain(config_path.map(Path::to_path_buf))
        .map(|p| absolute(&p))
        .collect()
}

/// Whether an event changes a file's contents or presence (not a read).
fn is_change(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

pub fn spawn(host: Arc<PluginHost>, source: PluginSource, plugins: &[PluginConfig]) {
    let files = Arc::new(Mutex::new(watched_files(
        Some(&source.path),
        plugins.iter().map(|p| p.path.clone()),
    )));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let matching = files.clone();
    let debouncer = new_debouncer(SETTLE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let files = matching.lock().unwrap_or_else(PoisonError::into_inner);
        let relevant = events.iter().any(|event| {
            is_change(&event.kind) && event.paths.iter().any(|p| files.contains(&absolute(p)))
        });
        if relevant {
            // A reload already pending covers this change too.
            let _ = tx.try_send(());
        }
    });
    let mut debouncer = match debouncer {
        Ok(debouncer) => debouncer,
        Err(err) => {
            tracing::error!(%err, "cannot watch plugin files; hot reload is off");
            return;
        }
    };
    let mut dirs = HashSet::new();
    let mut watch_dirs = move |files: &HashSet<PathBuf>| {
        for dir in files.iter().filter_map(|f| f.parent()) {
            if dirs.insert(dir.to_path_buf())
                && let Err(err) = debouncer.watch(dir, RecursiveMode::NonRecursive)
            {
                tracing::warn!(dir = %dir.display(), %err, "cannot watch directory");
            }
        }
    };
    watch_dirs(&files.lock().unwrap_or_else(PoisonError::into_inner));
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            host.reload().await;
            let chain = host.chain();
            let mut now_watched = watched_files(
                Some(&source.path),
                chain.plugins.iter().map(|p| p.config.path.clone()),
            );
            // Plugins that failed to load are watched too, so fixing them is seen.
            if let Ok(plugins) = (source.load)() {
                now_watched.extend(watched_files(None, plugins.into_iter().map(|p| p.path)));
            }
            watch_dirs(&now_watched);
            *files.lock().unwrap_or_else(PoisonError::into_inner) = now_watched;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    #[test]
    fn reads_are_not_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
    }
}
