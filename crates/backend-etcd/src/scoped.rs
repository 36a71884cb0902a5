//! Reads of what an interest covers, at one revision: the watch cache's list when it mirrors a
//! list of patterns (their prefix ranges, then what they wait for), and the read of tasks that
//! join its scope later. An agent's start reads its list, not the board.

use std::collections::{BTreeSet, HashMap};

use agent_core::{BackendResult, Interest, TaskId};
use etcd_client::{GetOptions, GetResponse, Txn, TxnOp};

use crate::inner::Inner;
use crate::ops::{compacted, RawListing};
use crate::record::{StoredClaim, StoredRecord};
use crate::view::{next_kv, stored_claim, stored_record};

/// Records and claim keys by task.
pub(crate) type Stored = (HashMap<TaskId, StoredRecord>, HashMap<TaskId, StoredClaim>);

/// Tasks read in one transaction (two keys each): etcd refuses a transaction of more than
/// `--max-txn-ops` operations, 128 by default (tester helper-9: an agent whose list waited for
/// 70 tasks outside it never started: "too many operations in txn request").
pub(crate) const TASKS_PER_READ: usize = 60;

/// How many times a read compacted away under it is started again.
const ROUNDS: usize = 16;

/// What a list of patterns reads: key prefixes (a glob's literal prefix) and exact ids, none
/// inside another. `None`: a glob with no literal prefix (`*`), which is every task.
fn ranges(interest: &Interest) -> Option<(Vec<String>, Vec<String>)> {
    let patterns = interest.patterns()?;
    let mut prefixes: BTreeSet<String> = BTreeSet::new();
    let mut exact: BTreeSet<String> = BTreeSet::new();
    for p in patterns {
        match p.literal_prefix() {
            Some("") => return None,
            Some(prefix) => prefixes.insert(prefix.to_owned()),
            None => exact.insert(p.as_str().to_owned()),
        };
    }
    let inside = |key: &str, except: &str| {
        prefixes
            .iter()
            .any(|p| p != except && key.starts_with(p.as_str()))
    };
    let kept_prefixes: Vec<String> = prefixes.iter().filter(|p| !inside(p, p)).cloned().collect();
    let kept_exact: Vec<String> = exact.into_iter().filter(|e| !inside(e, "")).collect();
    Some((kept_prefixes, kept_exact))
}

impl Inner {
    /// What `interest` covers, as stored at one revision: for a list of patterns, the ranges
    /// of `tasks/` and `claims/` they start with, then, round by round, the tasks those wait
    /// for; for every task, the whole list.
    pub(crate) async fn list_in(&self, interest: &Interest) -> BackendResult<RawListing> {
        let Some((prefixes, exact)) = ranges(interest) else {
            return self.list_raw().await;
        };
        'again: for _ in 0..ROUNDS {
            let mut revision = None;
            let mut responses: Vec<GetResponse> = Vec::new();
            let reads = prefixes
                .iter()
                .map(|p| (p, true))
                .chain(exact.iter().map(|e| (e, false)));
            for (key, prefix) in reads {
                for base in [self.keys.tasks_prefix(), self.keys.claims_prefix()] {
                    let mut options = GetOptions::new();
                    if prefix {
                        options = options.with_prefix();
                    }
                    if let Some(r) = revision {
                        options = options.with_revision(r);
                    }
                    match self
                        .conn
                        .get("list", &format!("{base}{key}"), Some(options))
                        .await
                    {
                        Ok(resp) => {
                            revision.get_or_insert(resp.header().map_or(0, |h| h.revision()));
                            responses.push(resp);
                        }
                        Err(e) if compacted(&e) => continue 'again,
                        Err(e) => return Err(e),
                    }
                }
            }
            let (records, claims, bad_keys) = self.split_kvs(responses.iter().map(|r| r.kvs()));
            drop(responses);
            let revision = revision.unwrap_or_default();
            let mut raw = RawListing {
                revision,
                records,
                claims,
                bad_keys,
            };
            // What they wait for, at any depth, at the same revision.
            let mut asked: BTreeSet<TaskId> = raw.records.keys().cloned().collect();
            loop {
                let wanted: Vec<TaskId> = raw
                    .records
                    .values()
                    .filter_map(|s| s.record.as_ref().ok())
                    .flat_map(|r| r.task.blocked_by.iter())
                    .filter(|b| !asked.contains(*b))
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if wanted.is_empty() {
                    break;
                }
                asked.extend(wanted.iter().cloned());
                match self.read_tasks_at(&wanted, revision).await {
                    Ok((r, c)) => {
                        raw.records.extend(r);
                        raw.claims.extend(c);
                    }
                    Err(e) if compacted(&e) => continue 'again,
                    Err(e) => return Err(e),
                }
            }
            return Ok(raw);
        }
        Err(self.compacted_under_every_read())
    }

    /// The records and claim keys of `ids` at `revision`: one read per [`TASKS_PER_READ`].
    pub(crate) async fn read_tasks_at(
        &self,
        ids: &[TaskId],
        revision: i64,
    ) -> BackendResult<Stored> {
        let at = GetOptions::new().with_revision(revision);
        let (mut records, mut claims) = (HashMap::new(), HashMap::new());
        for chunk in ids.chunks(TASKS_PER_READ) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .flat_map(|id| {
                    [
                        TxnOp::get(self.keys.task(id), Some(at.clone())),
                        TxnOp::get(self.keys.claim(id), Some(at.clone())),
                    ]
                })
                .collect();
            let resp = self.conn.read_txn("read", Txn::new().and_then(ops)).await?;
            let mut responses = resp.op_responses().into_iter();
            for id in chunk {
                if let Some(kv) = next_kv(&mut responses) {
                    records.insert(id.clone(), stored_record(id, &kv));
                }
                if let Some(kv) = next_kv(&mut responses) {
                    claims.insert(id.clone(), stored_claim(&kv));
                }
            }
        }
        Ok((records, claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_core::config::TaskPattern;

    fn interest(ps: &[&str]) -> Interest {
        Interest::tasks(
            ps.iter()
                .map(|p| TaskPattern::parse(p).expect("valid"))
                .collect(),
        )
    }

    #[test]
    fn a_list_of_patterns_reads_the_ranges_they_start_with_and_none_twice() {
        let (prefixes, exact) =
            ranges(&interest(&["P0.5.*", "P0.*", "P1.?", "X.1", "P0.7", "Q"])).expect("ranges");
        assert_eq!(prefixes, ["P0.", "P1."]);
        assert_eq!(exact, ["Q", "X.1"], "P0.7 is in P0.'s range");
        assert!(ranges(&interest(&["A.1", "*"])).is_none(), "every task");
        assert!(ranges(&Interest::all()).is_none());
    }
}
