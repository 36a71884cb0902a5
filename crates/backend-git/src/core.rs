//! The git backend's state behind one lock: the clone, what subscribers were last told, the claims
//! this backend holds. Every operation starts by moving the clone to the remote head; the commits
//! that arrived are turned into events, one board diff per commit.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use agent_core::mirror::{self, Decision};
use agent_core::{
    BackendError, BackendEvent, BackendResult, Claim, ClaimOutcome, Claimability, FencingToken,
    Listing, Mirrored, Patched, PutOutcome, RecordOutcome, ReleaseOutcome, ReleaseTo, SessionId,
    Task, TaskEvent, TaskId, TaskPatch, TaskStatus,
};
use git2::Oid;
use tokio::sync::mpsc;

use crate::board::{Board, BoardTask};
use crate::config::GitConfig;
use crate::repo::{Clone, Pushed};
use crate::status::{self, ClaimRecord, SessionState, StatusIn};

/// What subscribers are told of a task: status, holder and blockers (a waiting session must hear
/// of a blocker edit, whose status may not change: issue 15 #4).
type Face = Option<(TaskStatus, Option<SessionId>, Vec<TaskId>)>;

/// A claim this backend won and has not released.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    session: SessionId,
    token: u64,
    at: String,
    /// Held until released, whatever the heartbeat (see `ClaimRecord::until_released`).
    until_released: bool,
}

/// The board and STATUS files at the head, with what readers see of each task.
pub(crate) struct Snapshot {
    /// The board at the head or, while the head's does not parse, the last one that did.
    board: std::sync::Arc<Board>,
    /// Why the head's board does not parse (`file:line: problem`): nothing is written to it
    /// until someone fixes it.
    broken: Option<String>,
    statuses: HashMap<SessionId, StatusIn>,
    depth: u64,
}

impl Snapshot {
    /// A claim whose owner's heartbeat is older than `stale_after` reads available.
    fn effective(&self, t: &BoardTask, stale_after: Duration) -> Task {
        let mut task = Task::new(t.id.clone(), t.status);
        task.title = t.title.clone();
        task.claimed_by = t.owner.clone();
        task.blocked_by = t.blocked_by.clone();
        if t.status == TaskStatus::Claimed {
            let status = t.owner.as_ref().and_then(|o| self.statuses.get(o));
            task.claimed_at = status.and_then(|s| s.claimed_at(&t.id));
            let claim = status.and_then(|s| s.claim(&t.id));
            let lasting = claim.is_some_and(|c| c.until_released);
            task.copied = claim.is_some_and(|c| c.copied);
            let stale = !lasting && status.is_some_and(|s| s.stale(stale_after));
            // Free when the owner's heartbeat is stale, or when the owner's (ifc-written) STATUS
            // no longer lists the claim: it gave the task up (fenced itself) without a release.
            if stale || status.is_some_and(|s| s.disowns(&t.id)) {
                task.status = TaskStatus::Available;
                task.claimed_by = None;
                task.claimed_at = None;
                task.copied = false;
            }
        }
        task
    }

    fn tasks(&self, stale_after: Duration) -> Vec<Task> {
        self.board
            .tasks()
            .iter()
            .map(|t| self.effective(t, stale_after))
            .collect()
    }

    fn find(&self, id: &TaskId) -> Option<&BoardTask> {
        self.board.tasks().iter().find(|t| &t.id == id)
    }

    fn token(&self, session: &SessionId, task: &TaskId) -> Option<u64> {
        self.statuses.get(session).and_then(|s| s.token(task))
    }

    /// Whether `session`'s STATUS file says nothing readable: missing or unreadable (a person
    /// deleted or garbled it). Its claims are then neither confirmed nor given up by it.
    fn status_unknown(&self, session: &SessionId) -> bool {
        self.statuses
            .get(session)
            .is_none_or(|s| s.unreadable.is_some())
    }
}

pub(crate) struct Core {
    clone: Clone,
    config: GitConfig,
    /// The head subscribers were last told about, and what they were told of each task.
    told_head: Option<Oid>,
    told: BTreeMap<TaskId, Face>,
    seen_instructions: std::collections::BTreeSet<String>,
    subscribers: Vec<mpsc::UnboundedSender<BackendEvent>>,
    held: HashMap<TaskId, Held>,
    /// Sessions that announced themselves: their STATUS files are kept fresh.
    announced: HashMap<SessionId, agent_core::Presence>,
    /// When each session's STATUS `updated_at` was last written by a push that landed.
    heartbeats: HashMap<SessionId, Instant>,
    /// Claims (task, token) this process gave up without a release (fenced itself): its STATUS
    /// writes stop listing them, whoever else of the session wrote them there.
    relinquished: std::collections::HashSet<(TaskId, u64)>,
    /// Claims (session, task, token) of a gone process of a session this one registered: its
    /// own until `end_inherited` relinquishes them (after the runs that process finished are
    /// reported under their tokens).
    inherited: Vec<(SessionId, TaskId, u64)>,
    /// Sessions another process took over from this one, and who took them.
    evicted: HashMap<SessionId, agent_core::Presence>,
    /// Set while a registration writes this process's presence over another's.
    taking_over: bool,
    /// The last board that parsed, by blob id: reused while the head's board is that blob, and
    /// served while the head's does not parse.
    good_board: Option<(Option<Oid>, std::sync::Arc<Board>)>,
    /// The board blob that did not parse, and why (reported once per blob).
    broken_board: Option<(Option<Oid>, String)>,
    /// STATUS files that did not parse, with why (reported once per problem).
    unreadable_statuses: HashMap<String, String>,
    /// The last fencing token this process issued.
    last_token: u64,
    /// Since when the remote has not answered (the first failed sync since the last good one).
    cut_off: Option<Instant>,
    /// When the remote answered again after being away (see `leave_stale_claims_a_while`).
    back_in_touch: Option<Instant>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("clone", &self.clone).finish()
    }
}

/// The trailers every commit ifc makes carries (`none` where one does not apply).
fn trailers(task: Option<&TaskId>, session: Option<&SessionId>, token: Option<u64>) -> String {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    format!(
        "Ifc-Task: {}\nIfc-Session: {}\nIfc-Fencing-Token: {}\n",
        or_none(task.map(ToString::to_string)),
        or_none(session.map(ToString::to_string)),
        or_none(token.map(|t| t.to_string())),
    )
}

fn face(t: &Task) -> Face {
    Some((t.status, t.claimed_by.clone(), t.blocked_by.clone()))
}

impl Core {
    pub fn open(config: GitConfig) -> BackendResult<Core> {
        let clone = Clone::open_or_clone(&config)?;
        let mut core = Core {
            clone,
            config,
            told_head: None,
            told: BTreeMap::new(),
            seen_instructions: Default::default(),
            subscribers: Vec::new(),
            held: HashMap::new(),
            heartbeats: HashMap::new(),
            announced: HashMap::new(),
            relinquished: Default::default(),
            inherited: Vec::new(),
            evicted: HashMap::new(),
            taking_over: false,
            good_board: None,
            broken_board: None,
            unreadable_statuses: HashMap::new(),
            cut_off: None,
            back_in_touch: None,
            last_token: 0,
        };
        // Start from the current head: subscribers get it as their snapshot.
        let snap = core.snapshot()?;
        core.told = snap
            .tasks(core.config.stale_after)
            .iter()
            .map(|t| (t.id.clone(), face(t)))
            .collect();
        core.told_head = Some(core.clone.head()?);
        core.seen_instructions = core.instruction_files()?.into_iter().collect();
        Ok(core)
    }

    fn board_error(&self, e: crate::board::BoardError) -> BackendError {
        BackendError::InvalidInput(e.to_string())
    }

    /// The board at `head`: parsed once per blob. While it does not parse (a person's mistake,
    /// pushed while agents run), the last board that did is served, and the problem is logged
    /// once per broken blob; `broken` says why. With no good board known, the newest one in
    /// the history that parses; none at all is an error.
    fn board_at(&mut self, head: Oid) -> BackendResult<(std::sync::Arc<Board>, Option<String>)> {
        let blob = self.clone.blob_id_at(head, &self.config.board)?;
        if let Some((id, board)) = &self.good_board {
            if *id == blob {
                return Ok((board.clone(), None));
            }
            // The same broken blob as the last poll: not read and parsed again.
            if let Some((_, why)) = self.broken_board.as_ref().filter(|(b, _)| *b == blob) {
                return Ok((board.clone(), Some(why.clone())));
            }
        }
        let text = self
            .clone
            .read_at(head, &self.config.board)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let error = match Board::parse(&self.config.board, &text) {
            Ok(board) => {
                if self.broken_board.take().is_some() {
                    tracing::info!(board = %self.config.board, "the board parses again: writing to it again");
                }
                let board = std::sync::Arc::new(board);
                self.good_board = Some((blob, board.clone()));
                return Ok((board, None));
            }
            Err(e) => e,
        };
        if self.good_board.is_none() {
            self.good_board = self.last_good_board(head)?;
        }
        let Some((_, good)) = &self.good_board else {
            return Err(self.board_error(error));
        };
        let good = good.clone();
        let why = error.to_string();
        if self.broken_board.as_ref().is_none_or(|(id, _)| *id != blob) {
            tracing::warn!(problem = %why, "the board does not parse: serving its last good state, and writing nothing to it until it is fixed");
            self.broken_board = Some((blob, why.clone()));
        }
        Ok((good, Some(why)))
    }

    /// The newest board before `head` (up to 200 commits back) that parses, with its blob id.
    fn last_good_board(
        &mut self,
        head: Oid,
    ) -> BackendResult<Option<(Option<Oid>, std::sync::Arc<Board>)>> {
        let mut at = self.clone.parent(head)?;
        for _ in 0..200 {
            let Some(oid) = at else { break };
            if let Some(bytes) = self.clone.read_at(oid, &self.config.board)? {
                if let Ok(board) =
                    Board::parse(&self.config.board, &String::from_utf8_lossy(&bytes))
                {
                    let blob = self.clone.blob_id_at(oid, &self.config.board)?;
                    return Ok(Some((blob, std::sync::Arc::new(board))));
                }
            }
            at = self.clone.parent(oid)?;
        }
        Ok(None)
    }

    /// Refuses a write that would render the board while the head's does not parse: it would
    /// write the last good board over the person's edit.
    fn board_writable(&self, snap: &Snapshot) -> BackendResult<()> {
        match &snap.broken {
            None => Ok(()),
            Some(why) => Err(BackendError::Corrupt {
                key: self.config.board.clone(),
                reason: format!(
                    "{why} (claims, releases and puts of the board wait until it is fixed)"
                ),
            }),
        }
    }

    /// The board and STATUS files at the clone's head.
    fn snapshot(&mut self) -> BackendResult<Snapshot> {
        let head = self.clone.head()?;
        let depth = self.clone.depth(head)?;
        let (board, broken) = self.board_at(head)?;
        let mut statuses = HashMap::new();
        let owners: std::collections::BTreeSet<SessionId> = board
            .tasks()
            .iter()
            .filter_map(|t| t.owner.clone())
            .collect();
        for owner in owners {
            let path = self.config.status_path(&owner);
            if let Some(status) = self.status_at(&path)? {
                self.report_unreadable(&path, &owner, &status);
                // A STATUS file of another session that shares the number is not this one's.
                if status
                    .session_id
                    .as_deref()
                    .is_none_or(|s| s == owner.as_str())
                {
                    statuses.insert(owner, status);
                }
            }
        }
        Ok(Snapshot {
            board,
            broken,
            statuses,
            depth,
        })
    }

    /// Says once per problem that a session's STATUS file does not parse (a person's edit): its
    /// claims stay held (nothing in it says they were given up), and a session of this process
    /// writes the file again at its next heartbeat.
    fn report_unreadable(&mut self, path: &str, owner: &SessionId, status: &StatusIn) {
        match &status.unreadable {
            None => {
                if self.unreadable_statuses.remove(path).is_some() {
                    tracing::info!(file = path, "the STATUS file parses again");
                }
            }
            Some(why) => {
                if self.unreadable_statuses.get(path) != Some(why) {
                    let ours = self.held.values().any(|h| &h.session == owner)
                        || self.announced.contains_key(owner);
                    let next = if ours {
                        "this process writes it again at its next heartbeat"
                    } else {
                        "its claims stay held until its session writes it again"
                    };
                    tracing::warn!(file = path, session = %owner, problem = %why, "a STATUS file does not parse: {next}");
                    self.unreadable_statuses
                        .insert(path.to_owned(), why.clone());
                }
            }
        }
    }

    /// Fetches, moves to the remote head, and tells subscribers what changed.
    pub fn sync(&mut self) -> BackendResult<Snapshot> {
        if let Err(e) = self.clone.sync() {
            self.cut_off.get_or_insert_with(Instant::now);
            return Err(e);
        }
        if self.cut_off.take().is_some() {
            self.back_in_touch = Some(Instant::now());
        }
        let snap = self.snapshot()?;
        self.emit(&snap)?;
        Ok(snap)
    }

    fn emit(&mut self, snap: &Snapshot) -> BackendResult<()> {
        let head = self.clone.head()?;
        if let Some(told) = self
            .told_head
            .filter(|t| !self.clone.descends_from(head, *t))
        {
            tracing::warn!(branch = %self.config.branch, was = %told, now = %head, "the branch's history was rewritten (a force-push): what the lost commits recorded (claims, completions) is gone from the board, and tasks they completed may be run again");
        }
        if self.told_head != Some(head) {
            // One board diff per commit that changed the board, oldest first.
            // Commits that did not touch the board (heartbeats, STATUS files) are skipped unread.
            let mut last_board = self
                .told_head
                .map(|h| self.clone.blob_id_at(h, &self.config.board))
                .transpose()?
                .flatten();
            for (oid, depth) in self.commits_since(head)? {
                let board_id = self.clone.blob_id_at(oid, &self.config.board)?;
                if board_id == last_board {
                    continue;
                }
                last_board = board_id;
                let Some(bytes) = self.clone.read_at(oid, &self.config.board)? else {
                    continue;
                };
                let Ok(board) = Board::parse(&self.config.board, &String::from_utf8_lossy(&bytes))
                else {
                    continue;
                };
                for t in board.tasks() {
                    self.tell(
                        &t.id,
                        Some((t.status, t.owner.clone(), t.blocked_by.clone())),
                        depth,
                    );
                }
            }
            self.told_head = Some(head);
            for path in self.instruction_files()? {
                if self.seen_instructions.insert(path.clone()) {
                    if let Some(session) = self.config.session.clone() {
                        self.broadcast(BackendEvent::Instructions { session, path });
                    }
                }
            }
        }
        // Then what time changed (stale claims) and deletions, at the head's revision.
        let tasks = snap.tasks(self.config.stale_after);
        let present: std::collections::BTreeSet<TaskId> =
            tasks.iter().map(|t| t.id.clone()).collect();
        for t in &tasks {
            self.tell(&t.id, face(t), snap.depth);
        }
        let gone: Vec<TaskId> = self
            .told
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.tell(&id, None, snap.depth);
            self.told.remove(&id);
        }
        self.check_held(snap);
        Ok(())
    }

    fn tell(&mut self, id: &TaskId, new: Face, revision: u64) {
        let old = self.told.get(id).cloned().flatten();
        if old == new {
            return;
        }
        let event = TaskEvent {
            task: id.clone(),
            old_status: old.as_ref().map(|(s, _, _)| *s),
            new_status: new.as_ref().map(|(s, _, _)| *s),
            holder: new.as_ref().and_then(|(_, h, _)| h.clone()),
            blocked_by: new.as_ref().map(|(_, _, b)| b.clone()).unwrap_or_default(),
            revision,
            time: SystemTime::now(),
        };
        self.told.insert(id.clone(), new);
        self.broadcast(BackendEvent::Task(event));
    }

    /// Commits after the last head told about, up to `head`, oldest first, with their depths.
    fn commits_since(&mut self, head: Oid) -> BackendResult<Vec<(Oid, u64)>> {
        let mut chain = Vec::new();
        let mut at = head;
        while Some(at) != self.told_head && chain.len() < 1000 {
            let depth = self.clone.depth(at)?;
            chain.push((at, depth));
            match self.clone.parent(at)? {
                Some(p) => at = p,
                None => break,
            }
        }
        chain.reverse();
        Ok(chain)
    }

    fn instruction_files(&self) -> BackendResult<Vec<String>> {
        let Some(session) = &self.config.session else {
            return Ok(Vec::new());
        };
        let prefix = self.config.instructions_prefix(session);
        Ok(self
            .clone
            .list(&prefix)?
            .into_iter()
            .filter(|p| p.ends_with(".md"))
            .collect())
    }

    fn broadcast(&mut self, event: BackendEvent) {
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Tells holders whose claims the head no longer shows.
    fn check_held(&mut self, snap: &Snapshot) {
        let lost: Vec<TaskId> = self
            .held
            .iter()
            .filter(|(id, held)| {
                let still = snap
                    .find(id)
                    .map(|t| snap.effective(t, self.config.stale_after))
                    .is_some_and(|t| {
                        t.status == TaskStatus::Claimed
                            && t.claimed_by.as_ref() == Some(&held.session)
                    })
                    && (snap.token(&held.session, id) == Some(held.token)
                        // Unreadable or deleted (a person's edit): nothing says the claim
                        // ended; the next heartbeat writes the file again with it.
                        || snap.status_unknown(&held.session));
                !still
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            self.lose(&id);
        }
    }

    fn lose(&mut self, id: &TaskId) {
        if let Some(held) = self.held.remove(id) {
            self.relinquished.insert((id.clone(), held.token));
            tracing::warn!(task = %id, session = %held.session, "claim lost");
            self.broadcast(BackendEvent::ClaimLost {
                task: id.clone(),
                session: held.session,
                token: FencingToken(held.token),
            });
        }
    }

    pub fn subscribe(&mut self) -> BackendResult<(Listing, mpsc::UnboundedReceiver<BackendEvent>)> {
        let snap = self.sync()?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(tx);
        Ok((self.listing(&snap), rx))
    }

    fn listing(&self, snap: &Snapshot) -> Listing {
        let mut tasks = snap.tasks(self.config.stale_after);
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        Listing {
            tasks,
            corrupt: Vec::new(),
            revision: snap.depth,
        }
    }

    pub fn list(&mut self) -> BackendResult<Listing> {
        let snap = self.sync()?;
        Ok(self.listing(&snap))
    }

    pub fn read_file(&mut self, path: &str) -> BackendResult<Option<Vec<u8>>> {
        self.clone.read(path)
    }

    pub fn board_path(&self) -> &str {
        &self.config.board
    }

    /// One attempt of `GitBackend::update_file`: `None` when the push was rejected.
    pub fn update_file(
        &mut self,
        path: &str,
        message: &str,
        update: &dyn Fn(Option<&str>) -> BackendResult<String>,
    ) -> BackendResult<Option<bool>> {
        let _turn = self.clone.write_turn();
        self.sync()?;
        let current = self
            .clone
            .read(path)?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let next = update(current.as_deref())?;
        if current.as_deref() == Some(next.as_str()) {
            return Ok(Some(false));
        }
        let message = format!(
            "{message}\n\n{}",
            trailers(None, self.config.session.as_ref(), None)
        );
        match self
            .clone
            .commit_and_push(&[(path.to_owned(), next.into_bytes())], &message)?
        {
            Pushed::Landed { .. } => {
                let snap = self.snapshot()?;
                self.emit(&snap)?;
                Ok(Some(true))
            }
            Pushed::Rejected => Ok(None),
        }
    }

    pub fn get(&mut self, id: &TaskId) -> BackendResult<Option<Task>> {
        let snap = self.sync()?;
        Ok(snap
            .find(id)
            .map(|t| snap.effective(t, self.config.stale_after)))
    }

    /// The STATUS file `session` writes next to the board `rows`: the claims the file at the head
    /// lists that the rows still show held by `session` (written by other processes of the same
    /// session: CLI commands, an agent), minus those this process gave up, plus this backend's
    /// own, `extra` added and `without` removed. Merged under the push's compare-and-swap, so no
    /// writer drops another's claim.
    fn status_file(
        &self,
        snap: &Snapshot,
        rows: &[BoardTask],
        session: &SessionId,
        current: Option<&TaskId>,
        extra: Option<(&TaskId, &ClaimRecord)>,
        without: Option<&TaskId>,
    ) -> (String, Vec<u8>) {
        let mut read = None;
        let file = self.head_status(snap, session, &mut read);
        let mut claims = held_in(file, rows, session);
        claims.retain(|t, c| !self.relinquished.contains(&(t.clone(), c.token)));
        claims.extend(
            self.held
                .iter()
                .filter(|(_, h)| &h.session == session)
                .map(|(t, h)| {
                    (
                        t.clone(),
                        ClaimRecord {
                            token: h.token,
                            at: h.at.clone(),
                            process: self.config.process.clone(),
                            until_released: h.until_released,
                            copied: false,
                        },
                    )
                }),
        );
        // Rows that name the session IN PROGRESS while its STATUS file says nothing readable
        // (a migrated or hand-edited board, a garbled file) are held by the board alone: the
        // file written now keeps them, held until released (tester helper-2: a session's first
        // write disowned its migrated claim, and another session claimed that task).
        if snap.status_unknown(session) {
            for r in rows
                .iter()
                .filter(|r| r.status == TaskStatus::Claimed && r.owner.as_ref() == Some(session))
            {
                claims.entry(r.id.clone()).or_insert_with(|| ClaimRecord {
                    until_released: true,
                    ..ClaimRecord::now(self.next_token(snap, &r.id), None)
                });
            }
        }
        if let Some((t, record)) = extra {
            claims.insert(t.clone(), record.clone());
        }
        if let Some(t) = without {
            claims.remove(t);
        }
        let state = if claims.is_empty() {
            SessionState::Idle
        } else {
            SessionState::Working
        };
        let current = current.or_else(|| claims.keys().next());
        // A one-shot command keeps what the running agent published about itself.
        let kept = file.and_then(StatusIn::presence).filter(|p| p.pid != 0);
        // Another live process's presence is not written over (it took the session over; this
        // one learns it at its next heartbeat), except by the registration that takes over.
        let own = self.announced.get(session);
        let theirs = kept.as_ref().filter(|p| {
            own.is_some_and(|me| (p.pid, p.host.as_str()) != (me.pid, me.host.as_str()))
                && self.fresh(file)
                && agent_core::process::may_be_alive(p.pid, &p.host)
        });
        let presence = match theirs {
            Some(p) if !self.taking_over => Some(p),
            _ => own.or(kept.as_ref()),
        };
        (
            self.config.status_path(session),
            status::render(
                session,
                state,
                current,
                &claims,
                presence,
                self.config.stale_after,
                None,
            ),
        )
    }

    /// `session`'s STATUS file at the head: the snapshot's (it holds those of sessions owning
    /// rows), else read into `read`.
    fn head_status<'a>(
        &self,
        snap: &'a Snapshot,
        session: &SessionId,
        read: &'a mut Option<StatusIn>,
    ) -> Option<&'a StatusIn> {
        match snap.statuses.get(session) {
            Some(f) => Some(f),
            None => {
                *read = self.status_at_head(session).ok().flatten();
                read.as_ref()
            }
        }
    }

    /// Another session's STATUS file with `added` claims recorded for it (an etcd claim this
    /// process mirrors into git): its other claims, presence, state and heartbeat as they were
    /// (writing for it must not make it look alive), the added claims held until released
    /// (etcd's lease ends them; the release is mirrored). Without them in its file the board's
    /// row would read "free" (the owner's file disowns it), and the next mirror round would
    /// carry that "release" back into etcd (seeds 30029, 70014).
    fn status_for_another(
        &self,
        snap: &Snapshot,
        rows: &[BoardTask],
        holder: &SessionId,
        added: &[(TaskId, ClaimRecord)],
    ) -> (String, Vec<u8>) {
        let mut read = None;
        let file = self.head_status(snap, holder, &mut read);
        let mut claims = held_in(file, rows, holder);
        claims.extend(added.iter().cloned());
        let state = match file.and_then(|f| f.state.as_deref()) {
            Some("idle") if claims.is_empty() => SessionState::Idle,
            Some("polling") => SessionState::Polling,
            _ if claims.is_empty() => SessionState::Idle,
            _ => SessionState::Working,
        };
        let current = file
            .and_then(|f| f.current_task.as_deref())
            .and_then(|t| TaskId::parse(t).ok());
        let presence = file.and_then(StatusIn::presence).filter(|p| p.pid != 0);
        let writer = file
            .and_then(|f| f.stale_after.as_deref())
            .and_then(|d| agent_core::duration::parse_duration(d).ok())
            .unwrap_or(self.config.stale_after);
        (
            self.config.status_path(holder),
            status::render(
                holder,
                state,
                current.as_ref(),
                &claims,
                presence.as_ref(),
                writer,
                file.and_then(|f| f.updated_at.as_deref()),
            ),
        )
    }

    /// A new claim's fencing token: the time in milliseconds, unless the branch's depth, a token
    /// the head records for the task, or the last one this process issued is as large (then
    /// one more). Tokens only grow, even across a person's force-push, which makes the depth
    /// smaller and drops the STATUS files that recorded the larger tokens (issue 14 #5: `T1`
    /// claimed under token 3 by one session, then under 3 by another).
    fn next_token(&self, snap: &Snapshot, id: &TaskId) -> u64 {
        let recorded = snap
            .statuses
            .values()
            .filter_map(|s| s.token(id))
            .max()
            .unwrap_or(0);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        now.max(
            snap.depth
                .max(recorded)
                .max(self.last_token)
                .saturating_add(1),
        )
    }

    /// One claim attempt: `None` when the push was rejected (the caller tries again).
    pub fn claim(
        &mut self,
        id: &TaskId,
        session: &SessionId,
    ) -> BackendResult<Option<ClaimOutcome>> {
        let _turn = self.clone.write_turn();
        let snap = self.sync()?;
        if let Some(other) = self.taken_over(session)? {
            return Err(BackendError::SessionElsewhere {
                session: session.to_string(),
                elsewhere: agent_core::process::describe(&other),
            });
        }
        self.status_file_is_ours(session, &snap)?;
        let Some(row) = snap.find(id) else {
            return Ok(Some(ClaimOutcome::NotFound));
        };
        snap.board
            .can_record_owner(&self.config.board, id)
            .map_err(|e| self.board_error(e))?;
        let current = snap.effective(row, self.config.stale_after);
        let status_of = |b: &TaskId| {
            snap.find(b)
                .map(|t| snap.effective(t, self.config.stale_after).status)
        };
        if current.status == TaskStatus::Available && row.status == TaskStatus::Claimed {
            self.leave_stale_claims_a_while(id, row.owner.as_ref())?;
        }
        match current.claimability(session, status_of) {
            Claimability::Held(holder) => return Ok(Some(ClaimOutcome::Lost { holder })),
            Claimability::No(status) => return Ok(Some(ClaimOutcome::NotClaimable { status })),
            Claimability::Yes => {}
        }
        // The session holds it already: only the process that holds it (or, for a one-shot
        // command's claim, any process of the session) may claim it again.
        let elsewhere = current.status == TaskStatus::Claimed
            && snap
                .statuses
                .get(session)
                .and_then(|s| s.claim(id))
                .is_some_and(|c| c.held_by_other_process(self.config.process.as_deref()))
            && !self.held.contains_key(id);
        if elsewhere {
            return Ok(Some(ClaimOutcome::Lost {
                holder: Some(session.clone()),
            }));
        }
        let token = self.next_token(&snap, id);
        self.board_writable(&snap)?;
        let mut tasks = snap.board.tasks().to_vec();
        if let Some(t) = tasks.iter_mut().find(|t| &t.id == id) {
            t.status = TaskStatus::Claimed;
            t.owner = Some(session.clone());
        }
        let mut record = ClaimRecord::now(token, self.config.process.clone());
        // A one-shot command's claim has nothing to heartbeat it: it holds until released, as
        // an etcd claim without a lease does (seed 1000000010: a CLI claim read as stale 2 s
        // later, its release was refused, and the bridge carried it into etcd for nobody).
        record.until_released = self.config.one_shot;
        let files = vec![
            (
                self.config.board.clone(),
                snap.board.render(&tasks).into_bytes(),
            ),
            self.status_file(&snap, &tasks, session, Some(id), Some((id, &record)), None),
        ];
        let message = format!(
            "claim {id} for {session}\n\n{}",
            trailers(Some(id), Some(session), Some(token))
        );
        let written = Instant::now();
        match self.clone.commit_and_push(&files, &message)? {
            Pushed::Landed { .. } => {
                self.last_token = token;
                self.held.insert(
                    id.clone(),
                    Held {
                        session: session.clone(),
                        token,
                        at: record.at,
                        until_released: record.until_released,
                    },
                );
                self.heartbeats.insert(session.clone(), written);
                let snap = self.snapshot()?;
                self.emit(&snap)?;
                Ok(Some(ClaimOutcome::Won(Claim {
                    task: id.clone(),
                    session: session.clone(),
                    token: FencingToken(token),
                    leased: true,
                })))
            }
            Pushed::Rejected => Ok(None),
        }
    }

    /// One release attempt: `None` when the push was rejected (the caller tries again).
    pub fn release(
        &mut self,
        id: &TaskId,
        session: &SessionId,
        to: ReleaseTo,
        want: Option<FencingToken>,
    ) -> BackendResult<Option<ReleaseOutcome>> {
        let _turn = self.clone.write_turn();
        let snap = self.sync()?;
        let Some(row) = snap.find(id) else {
            return Ok(Some(ReleaseOutcome::NotFound));
        };
        let current = snap.effective(row, self.config.stale_after);
        let holder = if current.status == TaskStatus::Claimed {
            current.claimed_by.clone()
        } else {
            None
        };
        let live_token = snap.token(session, id);
        // A STATUS file a person garbled or deleted says nothing about the claim: this
        // process's own record of it (its token) stands (the tester's report: the release of a
        // finished task was refused, and the task ran again).
        let own = self
            .held
            .get(id)
            .is_some_and(|h| &h.session == session && want.is_none_or(|w| w.0 == h.token));
        let token_ok =
            want.is_none_or(|w| Some(w.0) == live_token) || (own && snap.status_unknown(session));
        // A claim a live agent process of the session holds is that process's to end, as an
        // etcd claim under its lease is (the tester's report: a one-shot `release --status
        // complete` killed the agent's run and marked the task done with its work unfinished).
        let anothers = snap
            .statuses
            .get(session)
            .and_then(|s| s.claim(id))
            .is_some_and(|c| c.held_by_other_process(self.config.process.as_deref()));
        let holds = (holder.as_ref() == Some(session) && token_ok && !anothers)
            || self.lapsed_but_untouched(&snap, row, session, to, want);
        if !holds {
            if agent_core::model::already_completed_by(&current, session, to) {
                return Ok(Some(ReleaseOutcome::Released {
                    token: want.unwrap_or(FencingToken(0)),
                }));
            }
            return Ok(Some(ReleaseOutcome::NotHolder { holder }));
        }
        self.board_writable(&snap)?;
        let mut tasks = snap.board.tasks().to_vec();
        if let Some(t) = tasks.iter_mut().find(|t| &t.id == id) {
            t.status = to.status();
            if to == ReleaseTo::Available {
                t.owner = None;
            }
        }
        let files = vec![
            (
                self.config.board.clone(),
                snap.board.render(&tasks).into_bytes(),
            ),
            self.status_file(&snap, &tasks, session, None, None, Some(id)),
        ];
        let token = want.map(|w| w.0).or(live_token).unwrap_or_default();
        let verb = if to == ReleaseTo::Complete {
            "complete"
        } else {
            "release"
        };
        let message = format!(
            "{verb} {id} by {session}\n\n{}",
            trailers(Some(id), Some(session), Some(token))
        );
        let written = Instant::now();
        match self.clone.commit_and_push(&files, &message)? {
            Pushed::Landed { .. } => {
                self.heartbeats.insert(session.clone(), written);
                self.held.remove(id);
                self.relinquished.remove(&(id.clone(), token));
                // The STATUS file now says the session no longer works on it: a heartbeat
                // before the agent's next announcement writes that too, not the task back
                // (which was one commit for the heartbeat, one for the announcement).
                if let Some(p) = self
                    .announced
                    .get_mut(session)
                    .filter(|p| p.current_task.as_ref() == Some(id))
                {
                    p.current_task = None;
                    p.state = "idle".into();
                }
                let snap = self.snapshot()?;
                self.emit(&snap)?;
                Ok(Some(ReleaseOutcome::Released {
                    token: FencingToken(token),
                }))
            }
            Pushed::Rejected => Ok(None),
        }
    }

    /// Right after the remote came back from being away, a claim whose heartbeat went stale is
    /// most likely stale because its holder could not reach the remote either, not because it
    /// died: its holder gets `stale_after / 4` to re-assert it or report the run it finished,
    /// before this process takes it (else the finished work is done again).
    fn leave_stale_claims_a_while(
        &self,
        id: &TaskId,
        holder: Option<&SessionId>,
    ) -> BackendResult<()> {
        let grace = self.config.stale_after / 4;
        let Some(back) = self.back_in_touch.filter(|b| b.elapsed() < grace) else {
            return Ok(());
        };
        let holder = holder.map_or_else(|| "its holder".to_owned(), ToString::to_string);
        Err(BackendError::Unavailable {
            endpoint: self.config.remote.clone(),
            reason: format!(
                "{id}: the remote is back after being away; {holder}'s claim went stale meanwhile and is left to {holder} for {:?} more",
                grace.saturating_sub(back.elapsed())
            ),
        })
    }

    /// Whether `session`'s claim (token `want`), which this process gave up when its heartbeat
    /// could not land in time (`fence_if_silent`) or which went stale, is still the board's last
    /// word on the task: the row still names the session in progress and its STATUS lists that
    /// claim or none. Nobody claimed it since, so a completion of the run that finished lands
    /// instead of the task being run again.
    fn lapsed_but_untouched(
        &self,
        snap: &Snapshot,
        row: &BoardTask,
        session: &SessionId,
        to: ReleaseTo,
        want: Option<FencingToken>,
    ) -> bool {
        let Some(want) = want.filter(|_| to == ReleaseTo::Complete) else {
            return false;
        };
        let listed = snap.token(session, &row.id);
        row.status == TaskStatus::Claimed
            && row.owner.as_ref() == Some(session)
            && self.relinquished.contains(&(row.id.clone(), want.0))
            && (listed == Some(want.0)
                || snap
                    .statuses
                    .get(session)
                    .is_some_and(|s| s.disowns(&row.id)))
    }

    /// One put attempt: `None` when the push was rejected (the caller tries again).
    pub fn put(&mut self, id: &TaskId, patch: &TaskPatch) -> BackendResult<Option<PutOutcome>> {
        let _turn = self.clone.write_turn();
        patch.validate(id)?;
        let snap = self.sync()?;
        self.board_writable(&snap)?;
        let mut tasks = snap.board.tasks().to_vec();
        let outcome = match tasks.iter_mut().find(|t| &t.id == id) {
            None => {
                let new = patch.create(id.clone());
                tasks.push(BoardTask {
                    id: new.id,
                    title: new.title,
                    status: new.status,
                    owner: None,
                    blocked_by: new.blocked_by,
                });
                PutOutcome::Created
            }
            Some(row) => match patch.apply(&snap.effective(row, self.config.stale_after)) {
                Patched::Unchanged => return Ok(Some(PutOutcome::Unchanged)),
                Patched::Held(holder) => return Ok(Some(PutOutcome::Held { holder })),
                Patched::Changed(next) => {
                    // The row takes the effective state: a stale claim is written as free.
                    row.title = next.title;
                    row.blocked_by = next.blocked_by;
                    row.status = next.status;
                    row.owner = next.claimed_by;
                    PutOutcome::Updated
                }
            },
        };
        let files = vec![(
            self.config.board.clone(),
            snap.board.render(&tasks).into_bytes(),
        )];
        match self.clone.commit_and_push(
            &files,
            &format!(
                "put {id}\n\n{}",
                trailers(Some(id), self.config.session.as_ref(), None)
            ),
        )? {
            Pushed::Landed { .. } => {
                let snap = self.snapshot()?;
                self.emit(&snap)?;
                Ok(Some(outcome))
            }
            Pushed::Rejected => Ok(None),
        }
    }

    /// One attempt to record transitions from another store, all in one commit: `None` when the
    /// push was rejected. A recorded claim of this backend's own session is listed in its STATUS
    /// file (so it is held while the session's heartbeat is fresh, and fenced like its own).
    pub fn record(&mut self, items: &[Mirrored]) -> BackendResult<Option<Vec<RecordOutcome>>> {
        let _turn = self.clone.write_turn();
        let snap = self.sync()?;
        self.board_writable(&snap)?;
        let mut tasks = snap.board.tasks().to_vec();
        let mut out = Vec::with_capacity(items.len());
        let mut held = self.held.clone();
        let mut own = std::collections::BTreeSet::new();
        let mut others: BTreeMap<SessionId, Vec<(TaskId, ClaimRecord)>> = BTreeMap::new();
        let mut message = String::new();
        for want in items {
            let Some(row) = tasks.iter_mut().find(|t| t.id == want.task) else {
                out.push(RecordOutcome::NotFound);
                continue;
            };
            // A claim written into a table without an owner column could never be read back:
            // it would read as held by nobody while its task runs (the claim refuses it too).
            if want.status == TaskStatus::Claimed {
                snap.board
                    .can_record_owner(&self.config.board, &want.task)
                    .map_err(|e| self.board_error(e))?;
            }
            let current = snap.effective(row, self.config.stale_after);
            // A claim a live agent process holds here ends by that process's release (or its
            // heartbeat): another store's "available" is not its word (seed 100061: a hybrid
            // session's etcd lease ran out while it ran the task on git, and a bridge carried
            // etcd's reset into git, so another session ran the task too).
            let held_live = current.status == TaskStatus::Claimed
                && current.claimed_by.as_ref().is_some_and(|h| {
                    snap.statuses
                        .get(h)
                        .and_then(|s| s.claim(&want.task))
                        .is_some_and(|c| c.held_by_other_process(self.config.process.as_deref()))
                });
            if held_live && matches!(want.status, TaskStatus::Available | TaskStatus::Blocked) {
                out.push(RecordOutcome::Kept {
                    reason: "held by a live agent process in git: only its release frees it".into(),
                });
                continue;
            }
            // Nor does a claim of the same session from another process take it over (seed
            // 80011: a process being taken over claimed on etcd before it learnt it, and its
            // confirmation in git replaced the new process's claim there: both ran the task).
            if held_live && want.status == TaskStatus::Claimed {
                out.push(RecordOutcome::Conflict {
                    holder: current.claimed_by.clone(),
                });
                continue;
            }
            let mine = want
                .holder
                .as_ref()
                .filter(|h| self.config.session.as_ref() == Some(*h));
            match mirror::decide(&current, want) {
                // The board already shows this session's claim, but its STATUS file does not
                // carry it with this token: written, so the claim is held (and released) by it.
                Decision::Skip(RecordOutcome::Unchanged)
                    if want.status == TaskStatus::Claimed
                        && mine.is_some_and(|h| {
                            want.token
                                .is_some_and(|t| snap.token(h, &want.task) != Some(t.0))
                        }) => {}
                Decision::Skip(outcome) => {
                    out.push(outcome);
                    continue;
                }
                Decision::Write => {}
            }
            let next = mirror::applied(&current, want);
            row.status = next.status;
            row.owner = next.claimed_by.clone();
            let token = want.token.map(|t| t.0);
            message += &trailers(Some(&want.task), want.holder.as_ref(), token);
            if let (Some(h), None, TaskStatus::Claimed) = (&want.holder, mine, next.status) {
                let mut record = ClaimRecord::now(token.unwrap_or_default(), None);
                record.until_released = true;
                record.copied = true;
                others
                    .entry(h.clone())
                    .or_default()
                    .push((want.task.clone(), record));
            }
            if let Some(h) = want
                .holder
                .as_ref()
                .filter(|h| self.config.session.as_ref() == Some(*h))
            {
                own.insert(h.clone());
                held.remove(&want.task);
                if next.status == TaskStatus::Claimed {
                    let record =
                        ClaimRecord::now(token.unwrap_or_default(), self.config.process.clone());
                    held.insert(
                        want.task.clone(),
                        Held {
                            session: h.clone(),
                            token: record.token,
                            at: record.at,
                            // A one-shot command's claim from the coordinator: nothing will
                            // heartbeat it, and etcd holds it until it is released.
                            until_released: self.config.process.is_none(),
                        },
                    );
                }
            }
            out.push(RecordOutcome::Written);
        }
        if message.is_empty() {
            return Ok(Some(out));
        }
        let saved = std::mem::replace(&mut self.held, held);
        let mut files = vec![(
            self.config.board.clone(),
            snap.board.render(&tasks).into_bytes(),
        )];
        files.extend(
            own.iter()
                .map(|s| self.status_file(&snap, &tasks, s, None, None, None)),
        );
        files.extend(
            others
                .iter()
                .filter(|(h, _)| !own.contains(*h))
                .map(|(h, added)| self.status_for_another(&snap, &tasks, h, added)),
        );
        let written = Instant::now();
        let written_count = out.iter().filter(|o| **o == RecordOutcome::Written).count();
        let message =
            format!("record {written_count} transition(s) from the coordinator\n\n{message}");
        match self.clone.commit_and_push(&files, &message) {
            Ok(Pushed::Landed { .. }) => {
                for s in own {
                    self.heartbeats.insert(s, written);
                }
                let snap = self.snapshot()?;
                self.emit(&snap)?;
                Ok(Some(out))
            }
            Ok(Pushed::Rejected) => {
                self.held = saved;
                Ok(None)
            }
            Err(e) => {
                self.held = saved;
                Err(e)
            }
        }
    }

    /// After a poll: whether a session of this process was taken over (told at once, not at the
    /// next heartbeat, which comes only every `stale_after / 4`: the tester's take-over went
    /// unnoticed for the 28 s its victim's task still ran), and whether a heartbeat is due now
    /// because a person garbled or deleted one of this process's STATUS files.
    pub fn after_poll(&mut self, snap: &Snapshot) -> bool {
        let announced: Vec<SessionId> = self.announced.keys().cloned().collect();
        for session in announced {
            let _ = self.taken_over(&session);
        }
        self.held.values().any(|h| snap.status_unknown(&h.session))
    }

    /// Refreshes the STATUS files of the sessions that hold claims here or run here: by moving
    /// their heartbeat refs while the branch's file says what they would write (no commit), by
    /// a commit otherwise (a state to record, a file a person garbled, a remote that refuses
    /// the refs). `Ok(false)`: the push was rejected (try again soon). Claims whose heartbeat
    /// is getting old are fenced first.
    pub fn heartbeat(&mut self) -> BackendResult<bool> {
        self.fence_if_silent();
        let snap = self.sync()?;
        self.fence_if_silent();
        let announced: Vec<SessionId> = self.announced.keys().cloned().collect();
        for session in announced {
            self.taken_over(&session)?;
        }
        let sessions: std::collections::BTreeSet<SessionId> = self
            .held
            .values()
            .map(|h| h.session.clone())
            .chain(self.announced.keys().cloned())
            .collect();
        let mut to_commit = std::collections::BTreeSet::new();
        for s in sessions {
            let written = Instant::now();
            let (path, bytes) = self.heartbeat_file(&snap, &s);
            if !self.beat_if_unchanged(&s, &path, &bytes, written)? {
                to_commit.insert(s);
            }
        }
        if to_commit.is_empty() {
            return Ok(true);
        }
        // A commit: wait for the write turn (a claim whose heartbeat is getting old was fenced
        // above, on time, however slow the turn is to come).
        let _turn = self.clone.write_turn();
        let snap = self.sync()?;
        self.fence_if_silent();
        let sessions = to_commit;
        let written = Instant::now();
        let files: Vec<(String, Vec<u8>)> = sessions
            .iter()
            .map(|s| self.heartbeat_file(&snap, s))
            .collect();
        let message = sessions.iter().fold("heartbeat\n\n".to_owned(), |m, s| {
            m + &trailers(None, Some(s), None)
        });
        let landed = matches!(
            self.clone.commit_and_push(&files, &message)?,
            Pushed::Landed { .. }
        );
        if landed {
            for s in sessions {
                self.heartbeats.insert(s, written);
            }
        }
        Ok(landed)
    }

    /// `session`'s STATUS file as a heartbeat writes it: what it last announced it is working
    /// on, its claims, the time now.
    fn heartbeat_file(&self, snap: &Snapshot, session: &SessionId) -> (String, Vec<u8>) {
        let current = self
            .announced
            .get(session)
            .and_then(|p| p.current_task.as_ref());
        self.status_file(snap, snap.board.tasks(), session, current, None, None)
    }

    /// Others may take a claim once its owner's `updated_at` is `stale_after` old; the holder
    /// gives it up earlier, at three quarters of that (measured from when it wrote the time), so
    /// it has stopped before anyone else can start.
    pub fn fence_if_silent(&mut self) {
        let limit = self.config.stale_after * 3 / 4;
        let silent: Vec<TaskId> = self
            .held
            .iter()
            .filter(|(_, h)| {
                self.heartbeats
                    .get(&h.session)
                    .is_none_or(|t| t.elapsed() > limit)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.lose(&id);
        }
    }

    /// The STATUS file at `path` at the head, its `updated_at` brought up to date by its
    /// heartbeat ref (`StatusIn::refreshed_by`).
    fn status_at(&self, path: &str) -> BackendResult<Option<StatusIn>> {
        let beat = self
            .clone
            .heartbeat(path)
            .map(|b| StatusIn::parse(path, &b));
        Ok(self
            .clone
            .read(path)?
            .map(|b| StatusIn::parse(path, &b).refreshed_by(beat)))
    }

    /// The session's STATUS file at the head, if it is that session's.
    fn status_at_head(&self, session: &SessionId) -> BackendResult<Option<StatusIn>> {
        let path = self.config.status_path(session);
        Ok(self.status_at(&path)?.filter(|s| {
            s.session_id
                .as_deref()
                .is_none_or(|id| id == session.as_str())
        }))
    }

    /// Takes the clone for one operation (see `Clone::exclusive`).
    pub fn exclusive(&self) -> Option<std::fs::File> {
        self.clone.exclusive()
    }

    /// Refuses to write `session`'s STATUS file while it is another session's (a fresh
    /// heartbeat, or claims the board still shows): two guide ids with one number
    /// (`session-1-frontend`, `session-1-backend`) would each drop the other's claims.
    fn status_file_is_ours(&self, session: &SessionId, snap: &Snapshot) -> BackendResult<()> {
        let path = self.config.status_path(session);
        let Some(file) = self.status_at(&path)? else {
            return Ok(());
        };
        let Some(other) = file
            .session_id
            .as_deref()
            .filter(|other| *other != session.as_str())
        else {
            return Ok(());
        };
        let holds = snap.board.tasks().iter().any(|r| {
            r.status == TaskStatus::Claimed && r.owner.as_ref().is_some_and(|o| o.as_str() == other)
        });
        let fresh = self.fresh(Some(&file));
        if !fresh && !holds {
            return Ok(());
        }
        let why = if fresh {
            "its heartbeat is fresh"
        } else {
            "the board shows its claims"
        };
        Err(BackendError::InvalidInput(format!(
            "{path} is session {other}'s ({why}): {session} would share it (ids of the form session-<n>-<name> share the STATUS file of their number): give {session} another number"
        )))
    }

    /// Whether a STATUS file has a heartbeat that is not stale (`StatusIn::stale`).
    fn fresh(&self, file: Option<&StatusIn>) -> bool {
        file.is_some_and(|f| f.age().is_some() && !f.stale(self.config.stale_after))
    }

    /// Another live process that runs `session`, as its STATUS file says: a fresh heartbeat
    /// written by an agent (pid and host) that is not `me` and may be alive.
    fn other_process(
        &self,
        session: &SessionId,
        me: &agent_core::Presence,
    ) -> BackendResult<Option<agent_core::Presence>> {
        let Some(file) = self.status_at_head(session)? else {
            return Ok(None);
        };
        let fresh = self.fresh(Some(&file));
        Ok(file.presence().filter(|p| {
            fresh
                && p.pid != 0
                && (p.pid, p.host.as_str()) != (me.pid, me.host.as_str())
                && agent_core::process::may_be_alive(p.pid, &p.host)
        }))
    }

    /// Whether another process took `session` over from this one (which announced it): if so,
    /// this process stops writing its STATUS file and its claims of the session are lost.
    fn taken_over(&mut self, session: &SessionId) -> BackendResult<Option<agent_core::Presence>> {
        if let Some(other) = self.evicted.get(session) {
            return Ok(Some(other.clone()));
        }
        // This process is taking the session over: the other process in the file is the one
        // being replaced (a registration whose push lost a race and is retried found its own
        // announcement and the old process's file, and took itself for the evicted one: seed
        // 100032).
        if self.taking_over {
            return Ok(None);
        }
        let Some(me) = self.announced.get(session).cloned() else {
            return Ok(None);
        };
        let Some(other) = self.other_process(session, &me)? else {
            return Ok(None);
        };
        tracing::error!(%session, pid = other.pid, host = %other.host, "another process took this session over: this one claims nothing more and stops");
        // Its claims stay its own until it releases them (or its heartbeat goes stale): the
        // process that took over does not take them, so it can finish what it runs.
        self.announced.remove(session);
        self.evicted.insert(session.clone(), other.clone());
        self.broadcast(BackendEvent::SessionTaken {
            session: session.clone(),
            by: Box::new(other.clone()),
        });
        Ok(Some(other))
    }

    /// One registration attempt (see `Backend::register`): `None` when the push was rejected.
    pub fn register(
        &mut self,
        presence: &agent_core::Presence,
        take_over: bool,
    ) -> BackendResult<Option<Option<agent_core::Presence>>> {
        let _turn = self.clone.write_turn();
        self.sync()?;
        let session = &presence.session_id;
        if let Some(other) = self.other_process(session, presence)? {
            if !take_over {
                return Ok(Some(Some(other)));
            }
            tracing::warn!(%session, pid = other.pid, host = %other.host, "taking the session over from a running process: it is told to stop");
        }
        // The claims of an agent process of this session that is gone end at `end_inherited`
        // (they would otherwise wait for the heartbeat to go stale), once the runs it finished
        // are reported; a live one's stay its own.
        let mine = self.config.process.clone();
        if let Some(claims) = self.status_at_head(session)?.and_then(|f| f.claims) {
            for (task, c) in claims {
                let gone = c.process.as_ref().is_some_and(|p| {
                    Some(p) != mine.as_ref() && !agent_core::process::id_may_be_alive(p)
                });
                if let (true, Ok(task)) = (gone, TaskId::parse(&task)) {
                    let claim = (session.clone(), task, c.token);
                    if !self.inherited.contains(&claim) {
                        self.inherited.push(claim);
                    }
                }
            }
        }
        self.taking_over = true;
        let announced = self.announce_in_turn(presence);
        self.taking_over = false;
        Ok(announced?.map(|()| None))
    }

    /// One attempt to end the claims taken on at registration (see `Backend::end_inherited`):
    /// each session's STATUS file stops listing them; `None` when a push was rejected.
    pub fn end_inherited(&mut self) -> BackendResult<Option<()>> {
        let _turn = self.clone.write_turn();
        let sessions: std::collections::BTreeSet<SessionId> =
            self.inherited.iter().map(|(s, _, _)| s.clone()).collect();
        for session in sessions {
            for (_, task, token) in self.inherited.iter().filter(|(s, _, _)| *s == session) {
                self.relinquished.insert((task.clone(), *token));
            }
            if let Some(presence) = self.announced.get(&session).cloned() {
                if self.announce_in_turn(&presence)?.is_none() {
                    return Ok(None);
                }
            }
            self.inherited.retain(|(s, _, _)| *s != session);
        }
        Ok(Some(()))
    }

    /// One announce attempt (writes the session's STATUS file): `None` when the push was rejected.
    /// Once another process has taken the session over, its claims here are lost and the answer
    /// is `SessionElsewhere`.
    pub fn announce(&mut self, presence: &agent_core::Presence) -> BackendResult<Option<()>> {
        let _turn = self.clone.write_turn();
        self.announce_in_turn(presence)
    }

    /// `announce`, by a caller that holds the write turn.
    fn announce_in_turn(&mut self, presence: &agent_core::Presence) -> BackendResult<Option<()>> {
        let snap = self.sync()?;
        let session = &presence.session_id;
        if let Some(other) = self.taken_over(session)? {
            return Err(BackendError::SessionElsewhere {
                session: session.to_string(),
                elsewhere: agent_core::process::describe(&other),
            });
        }
        self.status_file_is_ours(session, &snap)?;
        let first = self
            .announced
            .insert(presence.session_id.clone(), presence.clone())
            .is_none();
        let files = vec![self.status_file(
            &snap,
            snap.board.tasks(),
            &presence.session_id,
            presence.current_task.as_ref(),
            None,
            None,
        )];
        let written = Instant::now();
        // The claim or release just before already wrote this state (working on the task, idle):
        // a heartbeat, not a commit (issue 14 #7: four commits per task were two).
        if !first && !self.taking_over {
            let (path, bytes) = &files[0];
            if self.beat_if_unchanged(session, path, bytes, written)? {
                return Ok(Some(()));
            }
        }
        let pushed = self.clone.commit_and_push(
            &files,
            &format!(
                "status of {}\n\n{}",
                presence.session_id,
                trailers(
                    presence.current_task.as_ref(),
                    Some(&presence.session_id),
                    None
                )
            ),
        );
        match pushed {
            Ok(Pushed::Landed { .. }) => {
                self.heartbeats.insert(presence.session_id.clone(), written);
                Ok(Some(()))
            }
            // A first announcement that did not land is not this process's yet: until it does,
            // the file still names the process being taken over, and a heartbeat in between
            // would take that for a take-over of this one (seeds 100032, 30000005).
            rejected => {
                if first {
                    self.announced.remove(session);
                }
                rejected.map(|_| None)
            }
        }
    }

    /// While the branch's STATUS file at `path` says what `bytes` says but for the time, moves
    /// its heartbeat ref instead of committing (begun at `written`). `Ok(false)`: a commit is
    /// needed (the state changed, or the remote refuses the ref).
    fn beat_if_unchanged(
        &mut self,
        session: &SessionId,
        path: &str,
        bytes: &[u8],
        written: Instant,
    ) -> BackendResult<bool> {
        let unchanged = self
            .clone
            .read(path)?
            .is_some_and(|on_branch| same_but_time(&on_branch, bytes));
        if !unchanged || !self.clone.push_heartbeat(path, bytes)? {
            return Ok(false);
        }
        // A ref is no compare-and-swap with the branch: a claimant that read the last beat as
        // stale just before this one landed may take the claim. It can only if this beat took
        // longer than `stale_after / 4` to land (the holder fences at three quarters of
        // `stale_after` after its last counted beat): such a beat is not counted, and the claim
        // is given up on time.
        if written.elapsed() < self.config.stale_after / 4 {
            self.heartbeats.insert(session.clone(), written);
        }
        Ok(true)
    }

    /// Sessions whose STATUS heartbeat is fresh, written by an agent process that may be alive.
    pub fn sessions(&mut self) -> BackendResult<Vec<agent_core::Presence>> {
        self.sync()?;
        let (prefix, suffix) = self
            .config
            .status_pattern
            .split_once('{')
            .map_or(("", ""), |(p, rest)| {
                (p, rest.split_once('}').map_or("", |(_, s)| s))
            });
        let dir_prefix = if self.config.status_dir.is_empty() {
            String::new()
        } else {
            format!("{}/", self.config.status_dir.trim_end_matches('/'))
        };
        let mut out = Vec::new();
        for path in self.clone.list(&format!("{dir_prefix}{prefix}"))? {
            if !path.ends_with(suffix) || path[dir_prefix.len()..].contains('/') {
                continue;
            }
            let Some(status) = self.status_at(&path)? else {
                continue;
            };
            let fresh = self.fresh(Some(&status));
            // A live session is an agent process: not one-shot commands' files (pid 0), not an
            // agent that has exited (its heartbeat is fresh for a while yet).
            let live = status.presence().filter(|p| {
                fresh && p.pid != 0 && agent_core::process::may_be_alive(p.pid, &p.host)
            });
            if let Some(p) = live {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        Ok(out)
    }
}

/// Whether two STATUS files say the same but for the time they were written.
fn same_but_time(a: &[u8], b: &[u8]) -> bool {
    let lines = |t: &[u8]| -> Vec<Vec<u8>> {
        t.split(|c| *c == b'\n')
            .filter(|l| !l.starts_with(b"updated_at:"))
            .map(<[u8]>::to_vec)
            .collect()
    };
    lines(a) == lines(b)
}

/// The claims `file` lists that the board `rows` still show held by `session`.
fn held_in(
    file: Option<&StatusIn>,
    rows: &[BoardTask],
    session: &SessionId,
) -> BTreeMap<TaskId, ClaimRecord> {
    let still_held = |t: &TaskId| {
        rows.iter().any(|r| {
            &r.id == t && r.status == TaskStatus::Claimed && r.owner.as_ref() == Some(session)
        })
    };
    file.and_then(|f| f.claims.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|(t, c)| Some((TaskId::parse(t).ok()?, c.clone())))
        .filter(|(t, _)| still_held(t))
        .collect()
}
