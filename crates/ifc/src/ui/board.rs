//! What `ifc ui` shows, kept in step with the store by one subscription: every task, the live
//! sessions, the recent transitions and a chart's points, and the JSON messages the page is sent
//! (a snapshot when it connects, then one message per change). Pure: no IO, time is an argument.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_core::{Listing, Presence, Task, TaskEvent, TaskId, TaskStatus};
use serde_json::{json, Value};

/// How many transitions the strip keeps.
const TRANSITIONS: usize = 60;
/// One chart point per this long.
pub const POINT_EVERY: Duration = Duration::from_secs(5);
/// How many points the chart keeps (10 minutes).
const POINTS: usize = 120;

/// The board as the page shows it.
#[derive(Debug, Default)]
pub struct Board {
    store: String,
    tasks: BTreeMap<TaskId, Task>,
    sessions: Vec<Presence>,
    transitions: VecDeque<Value>,
    /// When each claim of the current chart point was seen.
    claims_since_point: u64,
    points: VecDeque<Value>,
    corrupt: Vec<String>,
    /// Tasks whose record became unreadable while the board ran (the watch reads them as gone).
    corrupt_since: BTreeMap<TaskId, String>,
    /// Why the store does not answer, while it does not.
    unreachable: Option<String>,
}

/// Milliseconds since the epoch, for the page's clock.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The workstream a task belongs to on the board: its id without the last `.`-part (`P0.2.6` is
/// in `P0.2`); an id without one is its own.
pub fn group_of(id: &str) -> &str {
    id.rsplit_once('.').map_or(id, |(g, _)| g)
}

/// Board order: ids compared part by part, numbers by value (`P0.1.9` before `P0.1.10`).
pub fn board_order(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<Result<u64, &str>> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest
                .find(|x: char| x.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (part, tail) = rest.split_at(end);
            out.push(if digit {
                part.parse::<u64>().map_err(|_| part)
            } else {
                Err(part)
            });
            rest = tail;
        }
        out
    }
    fn key<'a>(p: &Result<u64, &'a str>) -> (u8, u64, &'a str) {
        match p {
            Ok(n) => (0, *n, ""),
            Err(s) => (1, 0, *s),
        }
    }
    let (pa, pb) = (parts(a), parts(b));
    pa.iter()
        .map(key)
        .cmp(pb.iter().map(key))
        .then_with(|| a.cmp(b))
}

fn task_json(t: &Task) -> Value {
    json!({
        "id": t.id.as_str(),
        "group": group_of(t.id.as_str()),
        "title": t.title,
        "status": t.status.as_str(),
        "holder": t.claimed_by.as_ref().map(|s| s.as_str()),
        "claimed_at": t.claimed_at.map(|c| c.timestamp_millis()),
        "blocked_by": t.blocked_by.iter().map(TaskId::as_str).collect::<Vec<_>>(),
        "copied": t.copied,
    })
}

fn session_json(p: &Presence) -> Value {
    json!({
        "session": p.session_id.as_str(),
        "state": p.state,
        "task": p.current_task.as_ref().map(TaskId::as_str),
        "store": p.backend,
        "started_at": p.started_at.timestamp_millis(),
        "heartbeat": p.heartbeat.map(|h| h.timestamp_millis()),
        "claim_p95_ms": p.claim_p95_us.map(|us| us as f64 / 1000.0),
        "host": p.host,
        "pid": p.pid,
    })
}

impl Board {
    /// An empty board of the store named `store` (`etcd`, `git`, `router`).
    pub fn new(store: &str) -> Board {
        Board {
            store: store.to_owned(),
            ..Board::default()
        }
    }

    /// Every task as `listing` says, served by `store` (at the start, and when the store
    /// serving the board changed); returns the snapshot message.
    pub fn reset(&mut self, listing: &Listing, store: &str, now: SystemTime) -> Value {
        store.clone_into(&mut self.store);
        self.tasks = listing
            .tasks
            .iter()
            .map(|t| (t.id.clone(), t.clone()))
            .collect();
        self.corrupt = listing
            .corrupt
            .iter()
            .map(|c| format!("{}: {}", c.key, c.reason))
            .collect();
        self.corrupt_since.clear();
        self.snapshot(now)
    }

    /// Whether the board has `task` (a task the board has not seen needs its title read).
    pub fn has(&self, task: &TaskId) -> bool {
        self.tasks.contains_key(task)
    }

    /// One change; `full` is the task as read after it when the board did not have it yet (its
    /// title). Returns the message for the page.
    pub fn apply(&mut self, e: &TaskEvent, full: Option<Task>) -> Value {
        let transition = json!({
            "time": millis(e.time),
            "task": e.task.as_str(),
            "from": e.old_status.map(TaskStatus::as_str),
            "to": e.new_status.map(TaskStatus::as_str),
            "holder": e.holder.as_ref().map(|h| h.as_str()),
        });
        self.transitions.push_front(transition.clone());
        self.transitions.truncate(TRANSITIONS);
        let Some(status) = e.new_status else {
            self.tasks.remove(&e.task);
            return json!({"kind": "task", "id": e.task.as_str(), "task": null, "transition": transition});
        };
        let claimed_now = status == TaskStatus::Claimed
            && (e.old_status != Some(TaskStatus::Claimed)
                || self.tasks.get(&e.task).and_then(|t| t.claimed_by.as_ref())
                    != e.holder.as_ref());
        if claimed_now {
            self.claims_since_point += 1;
        }
        let t = self
            .tasks
            .entry(e.task.clone())
            .or_insert_with(|| full.unwrap_or_else(|| Task::new(e.task.clone(), status)));
        t.status = status;
        t.claimed_by = e.holder.clone();
        t.blocked_by = e.blocked_by.clone();
        if claimed_now {
            t.claimed_at = Some(e.time.into());
        } else if matches!(status, TaskStatus::Available | TaskStatus::Blocked) {
            t.claimed_at = None;
        }
        if status != TaskStatus::Claimed {
            t.copied = false;
        }
        json!({"kind": "task", "id": e.task.as_str(), "task": task_json(t), "transition": transition})
    }

    /// How many stored records are unreadable.
    pub fn unreadable(&self) -> usize {
        self.corrupt.len() + self.corrupt_since.len()
    }

    fn corrupt_list(&self) -> Vec<String> {
        let mut all = self.corrupt.clone();
        all.extend(self.corrupt_since.values().cloned());
        all
    }

    /// `task`'s record is unreadable (`why`), or readable again (`None`); the message, when that
    /// changed what the page says.
    pub fn set_corrupt(&mut self, task: &TaskId, why: Option<String>) -> Option<Value> {
        let changed = match why {
            Some(why) => self.corrupt_since.insert(task.clone(), why.clone()) != Some(why),
            None => self.corrupt_since.remove(task).is_some(),
        };
        changed.then(|| json!({"kind": "corrupt", "corrupt": self.corrupt_list()}))
    }

    /// Whether the store answers (`why` not): the page says so next to the board.
    pub fn set_reachable(&mut self, why: Option<&str>) -> Option<Value> {
        self.unreachable = why.map(str::to_owned);
        Some(json!({"kind": "store", "unreachable": self.unreachable}))
    }

    /// The live sessions, as the store lists them now; the message, when they changed.
    pub fn set_sessions(&mut self, mut sessions: Vec<Presence>) -> Option<Value> {
        sessions.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        if sessions == self.sessions {
            return None;
        }
        self.sessions = sessions;
        Some(json!({"kind": "sessions", "sessions": self.sessions_json()}))
    }

    fn sessions_json(&self) -> Vec<Value> {
        self.sessions.iter().map(session_json).collect()
    }

    /// Closes the chart's current point (claims per second since the last one, and the worst
    /// claim p95 the live sessions last published); returns its message.
    pub fn point(&mut self, now: SystemTime, over: Duration) -> Value {
        let per_s = self.claims_since_point as f64 / over.as_secs_f64().max(0.001);
        self.claims_since_point = 0;
        let p95 = self
            .sessions
            .iter()
            .filter_map(|s| s.claim_p95_us)
            .max()
            .map(|us| us as f64 / 1000.0);
        let point = json!({"time": millis(now), "claims_per_s": per_s, "claim_p95_ms": p95});
        self.points.push_back(point.clone());
        while self.points.len() > POINTS {
            self.points.pop_front();
        }
        json!({"kind": "point", "point": point})
    }

    /// Everything, for a page that (re)connects.
    pub fn snapshot(&self, now: SystemTime) -> Value {
        let mut tasks: Vec<&Task> = self.tasks.values().collect();
        tasks.sort_by(|a, b| board_order(a.id.as_str(), b.id.as_str()));
        json!({
            "kind": "snapshot",
            "store": self.store,
            "now": millis(now),
            "tasks": tasks.into_iter().map(task_json).collect::<Vec<_>>(),
            "sessions": self.sessions_json(),
            "transitions": self.transitions,
            "points": self.points,
            "corrupt": self.corrupt_list(),
            "unreachable": self.unreachable,
        })
    }

    /// Tasks by status (the board's own words: available, blocked, claimed, complete).
    pub fn tasks_by_status(&self) -> BTreeMap<&'static str, i64> {
        let mut by: BTreeMap<&'static str, i64> =
            TaskStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for t in self.tasks.values() {
            *by.entry(t.status.as_str()).or_default() += 1;
        }
        by
    }

    /// Live sessions by the store serving them.
    pub fn sessions_by_store(&self) -> BTreeMap<String, i64> {
        let mut by: BTreeMap<String, i64> = ["etcd", "git"].map(|s| (s.to_owned(), 0)).into();
        for s in &self.sessions {
            *by.entry(s.backend.clone()).or_default() += 1;
        }
        by
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn event(
        task: &str,
        old: Option<TaskStatus>,
        new: Option<TaskStatus>,
        holder: Option<&str>,
    ) -> TaskEvent {
        TaskEvent {
            task: id(task),
            old_status: old,
            new_status: new,
            holder: holder.map(|h| agent_core::SessionId::parse(h).expect("session")),
            blocked_by: vec![],
            revision: 1,
            time: UNIX_EPOCH + Duration::from_secs(100),
        }
    }

    #[test]
    fn ids_are_in_board_order_and_grouped_by_workstream() {
        let mut ids = vec!["P0.1.10", "P0.2.1", "P0.1.9", "P0.1.1", "A", "P0.10.1"];
        ids.sort_by(|a, b| board_order(a, b));
        assert_eq!(
            ids,
            ["A", "P0.1.1", "P0.1.9", "P0.1.10", "P0.2.1", "P0.10.1"]
        );
        assert_eq!(group_of("P0.2.6"), "P0.2");
        assert_eq!(group_of("solo"), "solo");
    }

    #[test]
    fn a_claim_sets_holder_and_time_and_counts_for_the_chart_and_a_release_clears_them() {
        let mut b = Board::new("etcd");
        let mut listing = Listing::default();
        let mut t = Task::new(id("A"), TaskStatus::Available);
        t.title = Some("the title".into());
        listing.tasks.push(t);
        b.reset(&listing, "etcd", UNIX_EPOCH);
        let now = UNIX_EPOCH + Duration::from_secs(100);

        let m = b.apply(
            &event(
                "A",
                Some(TaskStatus::Available),
                Some(TaskStatus::Claimed),
                Some("s1"),
            ),
            None,
        );
        assert_eq!(m["task"]["holder"], "s1");
        assert_eq!(m["task"]["title"], "the title", "kept from the listing");
        assert_eq!(m["task"]["claimed_at"], 100_000);
        assert_eq!(m["transition"]["to"], "claimed");
        assert_eq!(b.tasks_by_status()["claimed"], 1);

        let p = b.point(now, Duration::from_secs(5));
        assert_eq!(p["point"]["claims_per_s"], 0.2);
        assert_eq!(
            b.point(now, Duration::from_secs(5))["point"]["claims_per_s"],
            0.0
        );

        let m = b.apply(
            &event(
                "A",
                Some(TaskStatus::Claimed),
                Some(TaskStatus::Available),
                None,
            ),
            None,
        );
        assert_eq!(m["task"]["holder"], Value::Null);
        assert_eq!(m["task"]["claimed_at"], Value::Null);

        let m = b.apply(&event("A", Some(TaskStatus::Available), None, None), None);
        assert_eq!(m["task"], Value::Null);
        assert!(!b.has(&id("A")));
        assert_eq!(
            b.snapshot(now)["transitions"].as_array().map(Vec::len),
            Some(3)
        );
    }

    #[test]
    fn a_new_task_takes_its_title_from_the_read_and_sessions_are_sent_only_when_they_change() {
        let mut b = Board::new("etcd");
        let mut full = Task::new(id("N"), TaskStatus::Available);
        full.title = Some("new".into());
        let m = b.apply(
            &event("N", None, Some(TaskStatus::Available), None),
            Some(full),
        );
        assert_eq!(m["task"]["title"], "new");
        assert_eq!(m["task"]["group"], "N");
        assert!(b.set_sessions(vec![]).is_none());
        let m = b.set_corrupt(&id("N"), Some("tasks/N: bad".into()));
        assert_eq!(
            m.map(|m| m["corrupt"].clone()),
            Some(json!(["tasks/N: bad"]))
        );
        assert!(
            b.set_corrupt(&id("N"), Some("tasks/N: bad".into()))
                .is_none(),
            "unchanged"
        );
        assert_eq!(b.snapshot(UNIX_EPOCH)["corrupt"], json!(["tasks/N: bad"]));
        assert!(b.set_corrupt(&id("N"), None).is_some());
        assert!(b.set_corrupt(&id("N"), None).is_none());
        assert_eq!(b.sessions_by_store()["etcd"], 0);
    }
}
