//! Hot reload on file changes: the policy directory, the JWKS files and the config file are
//! watched; a burst of changes (an editor's save, a `git pull`) becomes one reload after a
//! quiet `debounce_ms`. Parent directories are watched, so files replaced by rename are seen.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::Gateway;

/// Keeps watching while alive.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

impl Gateway {
    /// Starts watching; `None` when watching is off in the config.
    #[allow(clippy::too_many_lines)] // start-up, not the request path
    pub fn watch_files(self: &Arc<Self>) -> Result<Option<FileWatch>, String> {
        if !self.config.reload.watch {
            tracing::info!(
                "reload.watch is off: changes take effect on POST /admin/reload or SIGHUP"
            );
            return Ok(None);
        }
        let policy_dir = canonical(&self.policy_dir);
        let mut files: HashSet<PathBuf> = self
            .config
            .inbound
            .jwt
            .iter()
            .filter_map(|j| j.jwks_file.as_deref())
            .flat_map(watched_forms)
            .collect();
        files.extend(
            self.config_path
                .as_deref()
                .into_iter()
                .chain(self.config.tool_pins.as_deref())
                .flat_map(watched_forms),
        );
        files.extend(
            self.config
                .upstreams
                .iter()
                .flat_map(|u| u.files())
                .flat_map(watched_forms),
        );
        let dirs: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .chain([policy_dir.clone()])
            .collect();

        let (tx, rx) = mpsc::channel::<()>(64);
        let swapped = dirs.clone();
        let relevant = move |path: &Path| {
            files.contains(path)
                || (path.parent() == Some(policy_dir.as_path())
                    && path
                        .extension()
                        .is_some_and(|e| e == "cedar" || e == "cedarschema" || e == "json"))
                || is_atomic_swap(path, &swapped)
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    if event.kind.is_access() {
                        return;
                    }
                    if event.paths.iter().any(|p| relevant(p)) {
                        // A full channel already holds a pending reload.
                        let _ = tx.try_send(());
                    }
                }
            })
            .map_err(|e| format!("file watch: {e}"))?;
        for dir in &dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| format!("file watch {}: {e}", dir.display()))?;
        }
        tracing::info!(
            folders = dirs.len(),
            "watching the config, policies, keys and secrets for changes"
        );
        tokio::spawn(reload_on_change(
            self.clone(),
            rx,
            Duration::from_millis(self.config.reload.debounce_ms),
        ));
        Ok(Some(FileWatch { _watcher: watcher }))
    }
}

async fn reload_on_change(gateway: Arc<Gateway>, mut changes: mpsc::Receiver<()>, quiet: Duration) {
    while changes.recv().await.is_some() {
        // Wait until the files have been quiet for `quiet`.
        while let Ok(Some(())) = tokio::time::timeout(quiet, changes.recv()).await {}
        let report = gateway.reload_all().await;
        tracing::info!(ok = report.ok(), "reload after file change");
    }
}

/// The canonical form of a path, or of its parent joined with its name when it does not exist.
/// The path with its directory resolved, its own name kept: a file that is a symbolic link
/// (a Kubernetes ConfigMap or Secret volume) is watched where it is mounted, not where its
/// link points today (a directory the kubelet removes on the next update).
fn canonical(path: &Path) -> PathBuf {
    // A bare name (`toolgate.yaml`) has an empty parent: the current folder.
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent).ok(), path.file_name()) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => path.to_path_buf(),
    }
}

/// Where a file's changes show: where it is named (a link rewritten or swapped there), and,
/// when it is a link, where it points now (the target rewritten in place).
fn watched_forms(path: &Path) -> Vec<PathBuf> {
    let mut forms = vec![canonical(path)];
    forms.extend(std::fs::canonicalize(path).ok().filter(|p| *p != forms[0]));
    forms
}

/// Kubernetes updates a mounted ConfigMap or Secret by writing a new hidden directory and
/// renaming a `..data` link onto it: every file in the volume changes at that moment.
fn is_atomic_swap(path: &Path, watched: &HashSet<PathBuf>) -> bool {
    path.file_name().is_some_and(|n| n == "..data")
        && path.parent().is_some_and(|dir| watched.contains(dir))
}
