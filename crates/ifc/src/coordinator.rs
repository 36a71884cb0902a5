//! The coordinator store a command works on directly, without the router (`migrate`, `verify`,
//! `export`, `delete`): etcd or NATS, with what only those two do (importing board rows,
//! deleting tasks).

use agent_core::{Backend, BackendResult, Task, TaskId};
use backend_etcd::EtcdBackend;
use backend_nats::NatsBackend;
use task_record::{Deleted, Imported};

/// An opened coordinator store.
#[derive(Debug)]
pub enum Coordinator {
    Etcd(EtcdBackend),
    Nats(NatsBackend),
}

impl Coordinator {
    /// The store, through the contract every store keeps.
    pub fn backend(&self) -> &dyn Backend {
        match self {
            Coordinator::Etcd(b) => b,
            Coordinator::Nats(b) => b,
        }
    }

    /// `etcd` or `NATS`, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Coordinator::Etcd(_) => "etcd",
            Coordinator::Nats(_) => "NATS",
        }
    }

    /// The key JSON output names this store's side by (`etcd`, `nats`).
    pub fn key(&self) -> &'static str {
        match self {
            Coordinator::Etcd(_) => "etcd",
            Coordinator::Nats(_) => "nats",
        }
    }

    /// Writes a board row (never backwards unless `force`; a dry run only says what it would do).
    pub async fn import(&self, task: &Task, force: bool, dry_run: bool) -> BackendResult<Imported> {
        match self {
            Coordinator::Etcd(b) => b.import(task, force, dry_run).await,
            Coordinator::Nats(b) => b.import(task, force, dry_run).await,
        }
    }

    /// Deletes a task (never a claimed one or one that tasks not complete wait for, unless
    /// `force`).
    pub async fn delete(&self, task: &TaskId, force: bool) -> BackendResult<Deleted> {
        match self {
            Coordinator::Etcd(b) => b.delete(task, force).await,
            Coordinator::Nats(b) => b.delete(task, force).await,
        }
    }

    /// Whether a task may name `blockers` and still be claimed (etcd compares every blocker in
    /// the claim's one transaction, so it takes at most 100; NATS has no such limit).
    pub fn claimable_with(&self, id: &TaskId, blockers: &[TaskId]) -> BackendResult<()> {
        match self {
            Coordinator::Etcd(b) => b.claimable_with(id, blockers),
            Coordinator::Nats(_) => Ok(()),
        }
    }
}
