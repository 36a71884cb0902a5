//! The members of the endpoint list, each with its own client: which one serves calls, and which
//! are avoided for a while after they stopped answering (a silent member is treated like a dead
//! one, not waited for on every call).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tokio::sync::OnceCell;

/// How long a member that did not answer is passed over while another one answers.
const AVOID: Duration = Duration::from_secs(30);

/// One endpoint and its client (connected on first use).
struct Member {
    endpoint: String,
    client: OnceCell<Client>,
    avoided_until: Mutex<Option<Instant>>,
}

impl Member {
    fn avoided_until(&self) -> Option<Instant> {
        *self.avoided_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_avoided_until(&self, until: Option<Instant>) {
        *self.avoided_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }
}

/// The endpoint list. Calls go to one member (the last that answered) until it stops
/// answering; then to the next member not avoided.
pub(crate) struct Members {
    list: Vec<Member>,
    options: ConnectOptions,
    current: AtomicUsize,
}

impl Members {
    pub fn new(endpoints: &[String], options: ConnectOptions) -> Members {
        Members {
            list: endpoints
                .iter()
                .map(|e| Member {
                    endpoint: e.clone(),
                    client: OnceCell::new(),
                    avoided_until: Mutex::new(None),
                })
                .collect(),
            options,
            current: AtomicUsize::new(0),
        }
    }

    pub fn endpoint(&self, member: usize) -> &str {
        &self.list[member].endpoint
    }

    /// The member the next call goes to: the serving one unless it is avoided, else the next
    /// one that is not; if every member is avoided, the one whose avoidance ends first.
    pub fn pick(&self) -> usize {
        let n = self.list.len();
        let now = Instant::now();
        let current = self.current.load(Ordering::Relaxed) % n;
        let free = (0..n)
            .map(|k| (current + k) % n)
            .find(|&i| self.list[i].avoided_until().is_none_or(|t| t <= now));
        let chosen = free.unwrap_or_else(|| {
            (0..n)
                .min_by_key(|&i| self.list[i].avoided_until())
                .unwrap_or(current)
        });
        self.current.store(chosen, Ordering::Relaxed);
        chosen
    }

    /// `member` answered: it serves the calls that follow.
    pub fn answered(&self, member: usize) {
        self.list[member].set_avoided_until(None);
        self.current.store(member, Ordering::Relaxed);
    }

    /// `member` did not answer (or could not be reached): it is passed over for a while.
    /// Whether it was serving until now (so the switch is worth a log line).
    pub fn avoid(&self, member: usize) -> bool {
        let first = self.list[member].avoided_until().is_none();
        self.list[member].set_avoided_until(Some(Instant::now() + AVOID));
        let n = self.list.len();
        let _ = self.current.compare_exchange(
            member,
            (member + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        first
    }

    /// The client of `member`, connected on first use (with a user, connecting logs in, which
    /// is a call like any other: the caller bounds it).
    pub async fn client(&self, member: usize) -> Result<Client, etcd_client::Error> {
        let m = &self.list[member];
        m.client
            .get_or_try_init(|| {
                Client::connect(
                    std::slice::from_ref(&m.endpoint),
                    Some(self.options.clone()),
                )
            })
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Members {
        let endpoints: Vec<String> = (0..n).map(|i| format!("http://127.0.0.1:{i}")).collect();
        Members::new(&endpoints, ConnectOptions::new())
    }

    #[test]
    fn calls_stay_on_the_member_that_answers_and_pass_over_a_silent_one() {
        let m = members(3);
        assert_eq!(m.pick(), 0);
        assert!(m.avoid(0), "the first silence is news");
        assert_eq!(m.pick(), 1);
        m.answered(1);
        assert_eq!(m.pick(), 1);
        assert_eq!(m.pick(), 1, "sticky while it answers");
        // The silent member is not tried again while another answers, even once the serving
        // one fails: the next one is.
        assert!(m.avoid(1));
        assert_eq!(m.pick(), 2);
        assert!(!m.avoid(0), "still avoided: not news");
    }

    #[test]
    fn with_every_member_avoided_the_one_avoided_longest_ago_is_tried() {
        let m = members(3);
        m.avoid(1);
        std::thread::sleep(Duration::from_millis(2));
        m.avoid(2);
        std::thread::sleep(Duration::from_millis(2));
        m.avoid(0);
        assert_eq!(m.pick(), 1);
        m.answered(1);
        assert_eq!(m.pick(), 1);
    }
}
