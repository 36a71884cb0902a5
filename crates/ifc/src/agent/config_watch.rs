//! Watches the agent's session and fleet files and says when either changed, so a new mode (or
//! `rollback:`) takes effect without a restart. Watches their directories: editors and `mv`
//! replace a file rather than write into it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use notify::Watcher;
use tokio::sync::mpsc;

/// A live watch; dropping it stops watching.
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
}

impl ConfigWatch {
    /// Starts watching `files`.
    pub fn start(files: &[&Path]) -> Result<ConfigWatch> {
        let files: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.to_path_buf()))
            .collect();
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let wanted = files.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reading a file is an event too (and moves its access time): only writes count.
                let Ok(event) = event else { return };
                let write = matches!(
                    event.kind,
                    notify::EventKind::Create(_)
                        | notify::EventKind::Remove(_)
                        | notify::EventKind::Modify(
                            notify::event::ModifyKind::Data(_)
                                | notify::event::ModifyKind::Name(_)
                                | notify::event::ModifyKind::Any
                        )
                );
                if write && event.paths.iter().any(|p| wanted.contains(p)) {
                    let _ = tx.send(());
                }
            })
            .context("cannot watch the config files")?;
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
        Ok(ConfigWatch {
            _watcher: watcher,
            rx,
        })
    }

    /// Waits for a change (a burst of events counts once). Cancel-safe: nothing is consumed
    /// unless it returns, so it can sit in a `select!` with busier branches.
    pub async fn changed(&mut self) {
        if self.rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        while self.rx.try_recv().is_ok() {}
    }
}
