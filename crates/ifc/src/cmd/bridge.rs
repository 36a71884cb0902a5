//! `ifc bridge` (keeps etcd and the git board in step while sessions run on both) and `ifc audit`
//! (prints how they differ). The decisions are `agent_core::bridge`'s; this runs the rounds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use agent_core::bridge::{self, Difference, Face, Live};
use agent_core::config::FleetFile;
use agent_core::{
    Backend, BackendError, Mirrored, RecordOutcome, SessionId, Task, TaskId, TaskPatch, TaskStatus,
};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{BridgeArgs, Global, Output};
use crate::exit;
use crate::output::printable;
use crate::settings;

/// The two stores, opened from the flags and the fleet file; the git clone is named `clone` (the
/// bridge and `audit` keep their own, so they can run side by side).
async fn open(
    g: &Global,
    fleet: Option<&FleetFile>,
    clone: &str,
) -> Result<(Arc<dyn Backend>, Arc<dyn Backend>)> {
    // The bridge writes to the coordinator; `audit` only reads.
    let writes = clone == "ifc-bridge";
    let etcd = settings::open_coordinator(g, fleet, None, writes).await?;
    let name = SessionId::parse(clone).context("the clone's name")?;
    let git: Arc<dyn Backend> = settings::open_git(g, fleet, Some(&name)).await?;
    Ok((etcd, git))
}

fn describe(face: Option<&Face>) -> String {
    match face {
        None => "missing".into(),
        Some(f) => match &f.holder {
            Some(h) => format!("{} by {h}", f.status),
            None => f.status.to_string(),
        },
    }
}

fn difference_json(d: &Difference) -> serde_json::Value {
    json!({
        "task_id": d.task.as_str(),
        "etcd": describe(d.etcd.as_ref()),
        "git": describe(d.git.as_ref()),
        "conflict": d.conflict,
    })
}

/// `ifc audit`: 0 when etcd and the board agree, 1 otherwise.
pub async fn audit(g: &Global, output: Output, out: &mut impl Write) -> Result<u8> {
    let fleet = settings::fleet(g)?;
    let (etcd, git) = open(g, fleet.as_ref(), "ifc-audit").await?;
    let (e, b) = (etcd.list().await?, git.list().await?);
    // What the table calls the coordinator (JSON keeps its `etcd` keys for either).
    let coordinator = if etcd.name() == "nats" {
        "NATS"
    } else {
        "etcd"
    };
    let diffs = bridge::compare(&e.tasks, &b.tasks);
    let blockers = bridge::blocker_differences(&e.tasks, &b.tasks);
    let conflicts = diffs.iter().filter(|d| d.conflict).count();
    let agree = diffs.is_empty() && blockers.is_empty();
    let list = |v: &[TaskId]| {
        let ids: Vec<&str> = v.iter().map(TaskId::as_str).collect();
        format!("blocked by [{}]", ids.join(", "))
    };
    match output {
        Output::Json => writeln!(
            out,
            "{}",
            json!({
                "agree": agree,
                "tasks_etcd": e.tasks.len(),
                "tasks_git": b.tasks.len(),
                "differences": diffs.iter().filter(|d| !d.conflict).map(difference_json).collect::<Vec<_>>(),
                "conflicts": diffs.iter().filter(|d| d.conflict).map(difference_json).collect::<Vec<_>>(),
                "blocker_differences": blockers,
            })
        )?,
        Output::Table => {
            if !agree {
                let column = coordinator.to_uppercase();
                writeln!(out, "{:<24} {:<28} {:<28} KIND", "TASK", column, "GIT")?;
                for d in &diffs {
                    writeln!(
                        out,
                        "{:<24} {:<28} {:<28} {}",
                        printable(d.task.as_str()),
                        describe(d.etcd.as_ref()),
                        describe(d.git.as_ref()),
                        if d.conflict { "CONFLICT" } else { "differs" }
                    )?;
                }
                for d in &blockers {
                    writeln!(
                        out,
                        "{:<24} {:<28} {:<28} blockers differ",
                        printable(d.task.as_str()),
                        printable(&list(&d.etcd)),
                        printable(&list(&d.git)),
                    )?;
                }
            }
            writeln!(
                out,
                "{} tasks in {coordinator}, {} on the board: {} differ, {conflicts} conflict(s)",
                e.tasks.len(),
                b.tasks.len(),
                diffs.len() - conflicts + blockers.len()
            )?;
        }
    }
    Ok(if agree { 0 } else { exit::NO })
}

/// The bridge's memory between rounds.
#[derive(Default)]
struct Bridge {
    /// What both stores last said alike, per task.
    base: BTreeMap<TaskId, Face>,
    /// Conflicts already counted (counted again only after they cleared).
    reported: BTreeSet<TaskId>,
    conflicts_total: u64,
    /// The blockers both stores last listed alike, per task.
    blockers_base: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// Blocker differences nothing decides, already logged.
    blockers_reported: BTreeSet<TaskId>,
    /// Reopens made in one store that the other keeps complete, already logged.
    reopens_reported: BTreeSet<TaskId>,
}

/// What a bridge keeps across restarts (`--state`): the common past, for the pair of stores it
/// was learned from.
#[derive(Default, Serialize, Deserialize, PartialEq)]
struct Remembered {
    /// The two stores (etcd endpoints and prefix, git remote, branch and board).
    stores: String,
    base: BTreeMap<TaskId, Face>,
    blockers_base: BTreeMap<TaskId, BTreeSet<TaskId>>,
}

impl Bridge {
    /// A bridge that remembers what the state file at `path` says of `stores` (nothing if
    /// the file is missing, unreadable or of other stores: it learns again).
    fn remembering(path: &Path, stores: &str) -> Bridge {
        let read = std::fs::read(path)
            .map_err(|e| (e.kind() != std::io::ErrorKind::NotFound).then(|| e.to_string()))
            .and_then(|bytes| {
                serde_json::from_slice::<Remembered>(&bytes).map_err(|e| Some(e.to_string()))
            });
        if let Err(Some(e)) = &read {
            tracing::warn!(state = %path.display(), error = %e, "cannot read the bridge's state file: starting without a common past");
        }
        if let Some(r) = read.as_ref().ok().filter(|r| r.stores != stores) {
            tracing::warn!(state = %path.display(), file_is_for = %r.stores, stores, "the bridge's state file is another pair of stores': starting without a common past (and it will be written over)");
        }
        match read {
            Ok(r) if r.stores == stores => Bridge {
                base: r.base,
                blockers_base: r.blockers_base,
                ..Bridge::default()
            },
            _ => Bridge::default(),
        }
    }

    /// Writes the common past to `path` (beside it, then moved into place) if it changed since
    /// `last`; a failure is logged, and the bridge goes on.
    fn remember(&self, path: &Path, stores: &str, last: &mut Option<Remembered>) {
        let unchanged = last.as_ref().is_some_and(|l| {
            l.stores == stores && l.base == self.base && l.blockers_base == self.blockers_base
        });
        if unchanged {
            return;
        }
        let now = Remembered {
            stores: stores.to_owned(),
            base: self.base.clone(),
            blockers_base: self.blockers_base.clone(),
        };
        let tmp = path.with_extension("json.tmp");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&now).unwrap_or_default()))
            .and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => *last = Some(now),
            Err(e) => {
                tracing::warn!(state = %path.display(), error = %e, "cannot write the bridge's state file: a restart will start without a common past")
            }
        }
    }
}

/// A new task for the other store: same title and blockers; free unless complete.
fn creation(t: &Task) -> TaskPatch {
    TaskPatch {
        title: t.title.clone(),
        status: Some(match t.status {
            TaskStatus::Complete => TaskStatus::Complete,
            TaskStatus::Blocked => TaskStatus::Blocked,
            _ => TaskStatus::Available,
        }),
        blocked_by: Some(t.blocked_by.clone()),
    }
}

impl Bridge {
    /// One round; returns how many transitions were written.
    async fn round(&mut self, etcd: &dyn Backend, git: &dyn Backend) -> Result<usize> {
        let (e, b) = (etcd.list().await?, git.list().await?);
        // A reopen is said again once it was settled and happens again.
        let complete_somewhere: BTreeSet<TaskId> = e
            .tasks
            .iter()
            .chain(&b.tasks)
            .filter(|t| t.status == TaskStatus::Complete)
            .map(|t| t.id.clone())
            .collect();
        self.reopens_reported
            .retain(|t| complete_somewhere.contains(t));
        let (in_etcd, in_git): (BTreeSet<&TaskId>, BTreeSet<&TaskId>) = (
            e.tasks.iter().map(|t| &t.id).collect(),
            b.tasks.iter().map(|t| &t.id).collect(),
        );
        let mut written = 0;
        for t in e.tasks.iter().filter(|t| !in_git.contains(&t.id)) {
            git.put(&t.id, &creation(t)).await?;
            written += 1;
        }
        for t in b.tasks.iter().filter(|t| !in_etcd.contains(&t.id)) {
            etcd.put(&t.id, &creation(t)).await?;
            written += 1;
        }
        let faces: BTreeMap<&TaskId, Face> = b.tasks.iter().map(|t| (&t.id, Face::of(t))).collect();
        for t in &e.tasks {
            let f = Face::of(t);
            if faces.get(&t.id) == Some(&f) {
                self.base.insert(t.id.clone(), f);
            }
        }
        // Who is live decides only differences without a common past (the bridge just started,
        // or a task neither store had agreed on): ask only then, it costs a fetch.
        let needs_live = e.tasks.iter().any(|t| {
            !self.base.contains_key(&t.id) && faces.get(&t.id).is_some_and(|f| *f != Face::of(t))
        });
        let live = if !needs_live {
            Live::default()
        } else {
            Live {
                etcd: etcd
                    .sessions()
                    .await?
                    .into_iter()
                    .map(|p| p.session_id)
                    .collect(),
                git: git
                    .sessions()
                    .await?
                    .into_iter()
                    .map(|p| p.session_id)
                    .collect(),
            }
        };
        let mut plan = bridge::plan(&e.tasks, &b.tasks, &self.base, &live);
        // What a store said a moment ago may be gone already (a claim ended, then its session
        // claimed the task again under a new token, to the board the two claims look the same;
        // seed 40000077: git's completion carried into etcd just after an operator had reopened
        // the task in both): a transition is carried only if its source still says so now.
        // Nor over what the destination says now if that is not what the plan was made from
        // (seed 352000038): each transition carries the face it was planned from
        // (`Mirrored::read_as`) and the destination checks it in the write's own
        // compare-and-swap; a change made since is the next round's to judge.
        for (source, items) in [(etcd, &mut plan.to_git), (git, &mut plan.to_etcd)] {
            if !items.is_empty() {
                let now = faces_now(source).await?;
                // A task's steps (an end, then the source's state) go by its last one.
                let last: BTreeMap<TaskId, Face> =
                    items.iter().map(|i| (i.task.clone(), landed(i))).collect();
                items.retain(|item| now.get(&item.task) == last.get(&item.task));
            }
        }
        let mut now_conflicting: BTreeSet<TaskId> = BTreeSet::new();
        for c in &plan.conflicts {
            now_conflicting.insert(c.task.clone());
            if !self.reported.contains(&c.task) {
                self.conflicts_total += 1;
                tracing::warn!(task = %c.task, etcd = %describe(c.etcd.as_ref()), git = %describe(c.git.as_ref()), conflicts_total = self.conflicts_total, "conflict: the task is held by different sessions in etcd and git; left alone");
            }
        }
        for (store, source, items, name) in [
            (git, etcd, plan.to_git, "git"),
            (etcd, git, plan.to_etcd, "etcd"),
        ] {
            if items.is_empty() {
                continue;
            }
            written += self
                .record(store, &items, name, &mut now_conflicting)
                .await?;
            // The source may have moved on while the write was under way (seed 50000068: a
            // claim carried to git landed 0.4 s after its release in etcd, and held the task for
            // nobody): what it says now is carried at once, not one round (or a restart of the
            // bridge, which forgets the common past) later.
            let landed_items: Vec<&Mirrored> = items
                .iter()
                .filter(|i| self.base.get(&i.task) == Some(&landed(i)))
                .collect();
            if landed_items.is_empty() {
                continue;
            }
            let now = faces_now(source).await?;
            let follow_ups: Vec<Mirrored> = landed_items
                .into_iter()
                .filter_map(|i| {
                    let current = now.get(&i.task)?;
                    (*current != landed(i) && !bridge::is_conflict(current, &landed(i)))
                        .then(|| bridge::transition(&i.task, current, &landed(i)))
                })
                .collect();
            if !follow_ups.is_empty() {
                written += self
                    .record(store, &follow_ups, name, &mut now_conflicting)
                    .await?;
            }
        }
        self.reported = now_conflicting;
        written += self.carry_blockers(etcd, git, &e.tasks, &b.tasks).await?;
        Ok(written)
    }

    /// Carries blocker edits (`ifc put --blocked-by` in one mode, a person's edit of the
    /// board) from the store that made them: an etcd session waited for ever for a blocker a
    /// git-side edit had removed. Returns how many were written.
    async fn carry_blockers(
        &mut self,
        etcd: &dyn Backend,
        git: &dyn Backend,
        e: &[Task],
        b: &[Task],
    ) -> Result<usize> {
        let in_git: BTreeMap<&TaskId, &Task> = b.iter().map(|t| (&t.id, t)).collect();
        for et in e {
            if in_git
                .get(&et.id)
                .is_some_and(|gt| bridge::blocker_set(gt) == bridge::blocker_set(et))
            {
                self.blockers_base
                    .insert(et.id.clone(), bridge::blocker_set(et));
            }
        }
        let plan = bridge::plan_blockers(e, b, &self.blockers_base);
        let mut written = 0;
        for (store, source, items, name) in [
            (etcd, git, plan.to_etcd, "etcd"),
            (git, etcd, plan.to_git, "git"),
        ] {
            if items.is_empty() {
                continue;
            }
            // Carried only while the source still lists them so.
            let now: BTreeMap<TaskId, BTreeSet<TaskId>> = source
                .list()
                .await?
                .tasks
                .iter()
                .map(|t| (t.id.clone(), bridge::blocker_set(t)))
                .collect();
            for (task, blockers) in items {
                let set: BTreeSet<TaskId> = blockers.iter().cloned().collect();
                if now.get(&task) != Some(&set) {
                    continue;
                }
                let patch = TaskPatch {
                    blocked_by: Some(blockers.clone()),
                    ..TaskPatch::default()
                };
                match store.put(&task, &patch).await {
                    Ok(_) => {
                        written += 1;
                        tracing::info!(%task, blocked_by = ?blockers, to = name, "bridged blockers");
                        self.blockers_base.insert(task, set);
                    }
                    Err(BackendError::InvalidInput(why)) => {
                        tracing::warn!(%task, blocked_by = ?blockers, to = name, reason = %why, "blockers not bridged")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for d in &plan.undecided {
            if self.blockers_reported.insert(d.task.clone()) {
                tracing::warn!(task = %d.task, etcd = ?d.etcd, git = ?d.git, "the stores list different blockers and neither is known to be newer: left alone (make one side match)");
            }
        }
        self.blockers_reported
            .retain(|t| plan.undecided.iter().any(|d| &d.task == t));
        Ok(written)
    }

    /// Records `items` in `store` (named `name`); returns how many were written. What landed
    /// becomes the common past; conflicts are counted once.
    async fn record(
        &mut self,
        store: &dyn Backend,
        items: &[Mirrored],
        name: &str,
        now_conflicting: &mut BTreeSet<TaskId>,
    ) -> Result<usize> {
        let mut written = 0;
        let outcomes = store.record(items).await?;
        for (item, outcome) in items.iter().zip(outcomes) {
            match outcome {
                RecordOutcome::Written | RecordOutcome::Unchanged => {
                    written += usize::from(outcome == RecordOutcome::Written);
                    self.base.insert(item.task.clone(), landed(item));
                    if outcome == RecordOutcome::Written {
                        tracing::info!(task = %item.task, status = %item.status, holder = ?item.holder, to = name, "bridged");
                    } else {
                        tracing::debug!(task = %item.task, status = %item.status, to = name, "already there");
                    }
                }
                RecordOutcome::Conflict { holder } => {
                    now_conflicting.insert(item.task.clone());
                    if !self.reported.contains(&item.task) {
                        self.conflicts_total += 1;
                        tracing::warn!(task = %item.task, wanted = ?item.holder, held_by = ?holder, store = name, conflicts_total = self.conflicts_total, "conflict: left alone");
                    }
                }
                RecordOutcome::Kept { reason } => {
                    let reopen = matches!(item.status, TaskStatus::Available | TaskStatus::Blocked)
                        && item
                            .read_as
                            .as_ref()
                            .is_some_and(|f| f.status == TaskStatus::Complete);
                    if reopen && self.reopens_reported.insert(item.task.clone()) {
                        // The bridge never moves a task backwards (tester helper-11: a reopen
                        // made in one store only stayed a difference, and nothing said why).
                        tracing::warn!(task = %item.task, complete_in = name, "reopened in one store only: the bridge does not carry a reopen over a completion; reopen it in {name} too (`ifc put {} --status available` with the fleet file writes both stores)", item.task);
                    } else {
                        tracing::debug!(task = %item.task, store = name, %reason, "not bridged: the store is ahead");
                    }
                }
                RecordOutcome::NotFound => {}
            }
        }
        Ok(written)
    }
}

/// What `store` says of each task now.
async fn faces_now(store: &dyn Backend) -> Result<BTreeMap<TaskId, Face>> {
    Ok(store
        .list()
        .await?
        .tasks
        .iter()
        .map(|t| (t.id.clone(), Face::of(t)))
        .collect())
}

/// What a store says after `item` landed.
fn landed(item: &Mirrored) -> Face {
    match item.status {
        TaskStatus::Available | TaskStatus::Blocked => Face {
            status: TaskStatus::Available,
            holder: None,
        },
        status => Face {
            status,
            holder: item.holder.clone(),
        },
    }
}

/// `ifc bridge`: rounds every interval until SIGTERM/SIGINT (or one with `--once`).
pub async fn run(
    g: &Global,
    args: &BridgeArgs,
    output: Output,
    out: &mut impl Write,
) -> Result<u8> {
    let fleet = settings::fleet(g)?;
    let interval = args
        .interval
        .or_else(|| fleet.as_ref().and_then(|f| f.bridge.interval.map(|d| d.0)))
        .unwrap_or(Duration::from_secs(1));
    let (etcd, git) = open(g, fleet.as_ref(), "ifc-bridge").await?;
    let stores = {
        let gc = settings::git_config(g, fleet.as_ref(), None)?;
        // etcd's wording is the one earlier versions hashed into the state file's name.
        let coordinator = match settings::coordinator_config(g, fleet.as_ref(), None, true)? {
            settings::CoordinatorConfig::Etcd(e) => {
                format!("etcd {} prefix {:?}", e.endpoints.join(","), e.prefix)
            }
            settings::CoordinatorConfig::Nats(n) => {
                format!("NATS {} bucket {:?}", n.endpoint(), n.bucket)
            }
        };
        format!(
            "{coordinator}; git {} branch {} board {}",
            gc.remote, gc.branch, gc.board
        )
    };
    // One file per pair of stores by default: bridges of two pairs run from one directory
    // keep their own common past (the tester's report: the second pair's replaced the first's).
    let state = args.state.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(format!(
            ".ifc/bridge/state-{:016x}.json",
            agent_core::config::stable_hash(&stores)
        ))
    });
    let mut bridge = Bridge::remembering(&state, &stores);
    let mut remembered = None;
    let conflicts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(addr) = args.metrics_addr {
        let (store, seen) = (Arc::clone(&etcd), Arc::clone(&conflicts));
        let totals: crate::metrics::Totals = Arc::new(move || {
            let conflicts = seen.load(std::sync::atomic::Ordering::Relaxed);
            let router = agent_core::router::RouterStats {
                conflicts,
                resyncs: store.resyncs(),
                ..Default::default()
            };
            (store.reconnects(), router)
        });
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let source = crate::metrics::Source::ready(Arc::clone(&etcd) as _, totals);
        crate::metrics::serve(addr, metrics, source).await?;
    }
    let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tracing::info!(
        ?interval,
        etcd = etcd.name(),
        git = git.name(),
        "bridge started"
    );
    loop {
        let started = tokio::time::Instant::now();
        match bridge.round(&*etcd, &*git).await {
            Ok(n) if n > 0 => tracing::info!(written = n, "bridge round"),
            Ok(_) => {}
            Err(e) if args.once => return Err(e),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "bridge round failed; retrying next interval")
            }
        }
        conflicts.store(bridge.conflicts_total, std::sync::atomic::Ordering::Relaxed);
        bridge.remember(&state, &stores, &mut remembered);
        if args.once {
            let (e, b) = (etcd.list().await?, git.list().await?);
            let diffs = bridge::compare(&e.tasks, &b.tasks).len()
                + bridge::blocker_differences(&e.tasks, &b.tasks).len();
            let summary = json!({
                "differences": diffs,
                "conflicts_total": bridge.conflicts_total,
            });
            match output {
                Output::Json => writeln!(out, "{summary}")?,
                Output::Table => writeln!(
                    out,
                    "{} difference(s) left, {} conflict(s)",
                    diffs, bridge.conflicts_total
                )?,
            }
            return Ok(if diffs == 0 { 0 } else { exit::NO });
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + interval) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!(conflicts_total = bridge.conflicts_total, "bridge stopped");
    Ok(0)
}

#[cfg(test)]
#[path = "bridge_tests.rs"]
mod tests;
