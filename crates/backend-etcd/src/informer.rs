//! List-then-watch: keeps the cache a mirror of etcd and feeds subscribers. Lists once, watches
//! from the next revision, resumes from the last revision seen after a disconnect, re-lists after
//! a compaction, and treats a stream that answers no progress request as dead.
//!
//! The watch covers the whole namespace (one stream keeps etcd's order across every key), but
//! only the keys in the cache's scope are decoded and kept. Tasks that join the scope are read
//! at the cache's revision between two watch responses, so nothing of them is missed or seen
//! twice; the scope widened to every task is a new list.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use agent_core::retry::Backoff;
use agent_core::BackendResult;
use etcd_client::{EventType, WatchOptions};
use tokio::time::Instant;

use crate::cache::Change;
use crate::inner::Inner;
use crate::keys::KeyKind;
use crate::view::{stored_claim, stored_record};

enum WatchEnd {
    /// The start revision was compacted away: list again.
    Compacted,
    /// The stream broke; resume from the last revision seen.
    Broken(String),
    /// The scope widened, or tasks that joined it could not be read: list again.
    Rescope,
}

impl Inner {
    /// Runs forever (until aborted with the backend).
    pub(crate) async fn inform(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut need_list = true;
        // Consecutive failures: the first is a warning, the rest are quiet until it recovers.
        let mut failures = 0u32;
        loop {
            if need_list {
                if let Err(e) = self.relist().await {
                    tracing::warn!(error = %e, "listing tasks failed; retrying");
                    *self.list_failure() = Some(e.to_string());
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                *self.list_failure() = None;
                need_list = false;
            }
            let start = self.cache().revision + 1;
            let end = self.watch_from(start, &mut backoff, &mut failures).await;
            self.watching.store(false, Ordering::Relaxed);
            match end {
                WatchEnd::Compacted => {
                    tracing::info!(start, "watch start revision compacted; listing again");
                    need_list = true;
                }
                WatchEnd::Rescope => need_list = true,
                WatchEnd::Broken(reason) => {
                    let resume_from = self.cache().revision + 1;
                    if failures == 0 {
                        tracing::warn!(%reason, resume_from, "watch stream broke; resuming");
                        self.reconnects
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        tracing::debug!(%reason, resume_from, failures, "watch still down; retrying");
                    }
                    failures += 1;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Lists what the cache's scope covers (again if the scope widened meanwhile) and replaces
    /// the mirror with it.
    async fn relist(&self) -> BackendResult<()> {
        loop {
            let interest = self.cache().scope().clone();
            let raw = self.list_in(&interest).await?;
            let mut cache = self.cache();
            if *cache.scope() != interest {
                continue;
            }
            let repairs = cache.replace(raw.revision, raw.records, raw.claims);
            drop(cache);
            self.queue_repairs(repairs);
            self.synced.notify_waiters();
            return Ok(());
        }
    }

    /// Reads the tasks that joined the scope at the cache's revision, and their claim keys, until
    /// none is pending (what they wait for joins too). Runs between two watch responses: the
    /// cache's revision does not move meanwhile.
    async fn read_pending(&self) -> BackendResult<()> {
        loop {
            let (revision, pending) = {
                let cache = self.cache();
                (cache.revision, cache.pending())
            };
            if pending.is_empty() {
                return Ok(());
            }
            let fetched = self.read_tasks_at(&pending, revision).await?;
            let repairs = self.cache().adopt(revision, fetched);
            self.queue_repairs(repairs);
        }
    }

    fn queue_repairs(&self, repairs: Vec<crate::cache::Repair>) {
        for r in repairs {
            let _ = self.repairs.send(r);
        }
    }

    async fn watch_from(&self, start: i64, backoff: &mut Backoff, failures: &mut u32) -> WatchEnd {
        let (from, to) = self.keys.watch_range();
        let options = WatchOptions::new()
            .with_range(to)
            .with_start_revision(start)
            .with_progress_notify();
        let watch = |c: etcd_client::Client| {
            let (from, options) = (from.clone(), options.clone());
            async move {
                let mut w = c
                    .watch_client()
                    .max_decoding_message_size(crate::conn::MAX_RESPONSE);
                w.watch(from, Some(options)).await
            }
        };
        let mut passed_over = self.conn.passed_over();
        let member = self.conn.serving_member();
        let stream = match self.conn.call("watch", watch).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Broken(e.to_string()),
        };
        let (mut requests, mut responses) = stream.split();
        let interval = self.config.watch_progress_interval;
        let silence_limit = interval * 2 + self.conn.request_timeout();
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
        loop {
            tokio::select! {
                message = responses.message() => {
                    let resp = match message {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return WatchEnd::Broken("stream closed by the server".into()),
                        Err(e) => return WatchEnd::Broken(self.conn.error(e).to_string()),
                    };
                    last_heard = Instant::now();
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            return WatchEnd::Compacted;
                        }
                        return WatchEnd::Broken(format!("watch cancelled: {}", resp.cancel_reason()));
                    }
                    if resp.created() {
                        self.watching.store(true, Ordering::Relaxed);
                        backoff.reset();
                        if *failures > 0 {
                            tracing::info!(start, "watch resumed");
                            *failures = 0;
                        }
                    }
                    self.apply_events(&resp);
                    if let Some(end) = self.follow_scope().await {
                        return end;
                    }
                }
                () = self.scope_changed.notified() => {
                    if let Some(end) = self.follow_scope().await {
                        return end;
                    }
                }
                Ok(()) = passed_over.changed() => {
                    if *passed_over.borrow_and_update() == Some(member) {
                        return WatchEnd::Broken("its etcd member stopped answering other calls".into());
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        self.conn.serving_member_silent();
                        return WatchEnd::Broken(format!("no answer to progress requests for {silence_limit:?}"));
                    }
                    if let Err(e) = requests.request_progress().await {
                        return WatchEnd::Broken(e.to_string());
                    }
                }
            }
        }
    }

    /// After a watch response, or when told the scope changed: a widened scope ends the watch
    /// for a new list; tasks that joined it are read.
    async fn follow_scope(&self) -> Option<WatchEnd> {
        if !self.cache().synced {
            return Some(WatchEnd::Rescope);
        }
        match self.read_pending().await {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the tasks that joined this watch; listing again");
                Some(WatchEnd::Rescope)
            }
        }
    }

    fn apply_events(&self, resp: &etcd_client::WatchResponse) {
        let events = resp.events();
        if events.is_empty() {
            // A progress report: every event up to the header's revision has been delivered.
            if !resp.created() {
                if let Some(h) = resp.header() {
                    let mut cache = self.cache();
                    cache.revision = cache.revision.max(h.revision());
                }
            }
            return;
        }
        // The keys in scope, decoded outside the cache's lock (`apply` checks again under it).
        let keyed: Vec<(KeyKind, &etcd_client::KeyValue, bool)> = events
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                let kind = self.keys.parse(kv.key())?;
                Some((kind, kv, event.event_type() == EventType::Put))
            })
            .collect();
        let keyed: Vec<_> = {
            let cache = self.cache();
            keyed
                .into_iter()
                .filter(|(kind, _, _)| cache.tracks(kind.task()))
                .collect()
        };
        // Group by revision so one transaction's keys become one event.
        let mut groups: BTreeMap<i64, Vec<Change>> = BTreeMap::new();
        for (kind, kv, put) in keyed {
            let change = match kind {
                KeyKind::Task(id) => {
                    let stored = put.then(|| stored_record(&id, kv));
                    Change::Record(id, stored)
                }
                KeyKind::Claim(id) => Change::Claim(id, put.then(|| stored_claim(kv))),
            };
            groups.entry(kv.mod_revision()).or_default().push(change);
        }
        // Every event up to the response's last one has been delivered, in scope or not: the
        // cache is at that revision (tasks that join the scope are read there). Not the header's
        // revision: a watch catching up sends the current revision with a part of the events.
        let last = events
            .iter()
            .filter_map(|e| e.kv().map(|kv| kv.mod_revision()))
            .max()
            .unwrap_or_default();
        let mut repairs = Vec::new();
        {
            let mut cache = self.cache();
            for (revision, changes) in groups {
                repairs.extend(cache.apply(revision, changes));
            }
            cache.revision = cache.revision.max(last);
        }
        self.queue_repairs(repairs);
    }
}
