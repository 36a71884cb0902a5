//! agent-core: the task model, the `Backend` contract, an in-memory backend and (behind the
//! `testing` feature) the conformance suite every backend runs.
//!
//! Architecture invariant: nothing here talks to etcd or git; everything is tested against any
//! `Backend`.

pub mod backend;
pub mod blockers;
pub mod bridge;
pub mod claim_loop;
pub mod config;
pub mod duration;
pub mod error;
pub mod ids;
pub mod interest;
pub mod memory;
pub mod mirror;
pub mod model;
pub mod process;
pub mod retry;
pub mod router;
pub mod yaml;

#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{Backend, BackendEvent, Health, Subscription};
pub use error::{BackendError, BackendResult};
pub use ids::{InvalidId, SessionId, TaskId};
pub use interest::Interest;
pub use mirror::{Mirrored, RecordOutcome};
pub use model::{
    Claim, ClaimOutcome, Claimability, CorruptRecord, FencingToken, Listing, Patched, Presence,
    PutOutcome, ReleaseOutcome, ReleaseTo, Task, TaskEvent, TaskPatch, TaskStatus,
};
