//! Hot reload: watches every plugin file and the config file (through their
//! directories, so replacing a file by rename is seen) and asks the host to
//! reload after changes settle.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::PluginHost;
use crate::config::Config;

/// Quiet time after the last change before reloading (editors and `cp` write in bursts).
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

pub fn spawn(host: Arc<PluginHost>, config: &Config) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<notify::Event>(256);
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let _ = tx.try_send(event);
            }
        }) {
            Ok(watcher) => watcher,
            Err(err) => {
                tracing::error!(%err, "cannot watch plugin files; hot reload is off");
                return;
            }
        };
    let source = config.source.clone();
    let mut files = watched_files(
        source.as_deref(),
        config.plugins.iter().map(|p| p.path.clone()),
    );
    let mut dirs = HashSet::new();
    watch_dirs(&files, &mut dirs, &mut watcher);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if !event.paths.iter().any(|p| files.contains(&absolute(p))) {
                continue;
            }
            // Let the burst of writes finish.
            while let Ok(Some(_)) = tokio::time::timeout(SETTLE, rx.recv()).await {}
            host.reload().await;
            let chain = host.chain();
            let plugins = chain.plugins.iter().map(|p| p.config.path.clone());
            files = watched_files(source.as_deref(), plugins);
            if let Some(path) = &source
                && let Ok(config) = Config::load(Some(path))
            {
                files.extend(watched_files(
                    None,
                    config.plugins.into_iter().map(|p| p.path),
                ));
            }
            watch_dirs(&files, &mut dirs, &mut watcher);
        }
    });
}

/// Watches the directories of `files` not watched yet.
fn watch_dirs(
    files: &HashSet<PathBuf>,
    dirs: &mut HashSet<PathBuf>,
    watcher: &mut notify::RecommendedWatcher,
) {
    for dir in files.iter().filter_map(|f| f.parent()) {
        if dirs.insert(dir.to_path_buf())
            && let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive)
        {
            tracing::warn!(dir = %dir.display(), %err, "cannot watch directory");
        }
    }
}
