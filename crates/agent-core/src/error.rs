//! Typed errors of the Backend contract. They separate what a caller does about them:
//! *unavailable* (retry, fall back), *corrupt data* (report, skip), *invalid input* (fix the call).
//! Normal outcomes (a lost race, a task not claimable) are values, never errors.

use std::time::Duration;

use crate::ids::InvalidId;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store could not be reached or answered with a transport error. Retryable.
    #[error("{endpoint}: unavailable: {reason}")]
    Unavailable {
        /// The endpoint(s) or remote that was tried.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The store did not answer within the deadline. Retryable.
    #[error("{endpoint}: {operation} timed out after {after:?}")]
    Timeout {
        /// The endpoint(s) or remote that was tried.
        endpoint: String,
        /// The operation that timed out.
        operation: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// A stored record is not a valid task. Not retryable until someone fixes the record.
    #[error("corrupt record at {key}: {reason}")]
    Corrupt {
        /// Where the record is stored.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller asked for something impossible (bad id, bad status, bad setting).
    #[error("{0}")]
    InvalidInput(String),
    /// The store refused the request for a reason that retrying will not fix (permission denied,
    /// authentication failed).
    #[error("{endpoint}: rejected: {reason}")]
    Rejected {
        /// The endpoint(s) or remote that refused.
        endpoint: String,
        /// What it said.
        reason: String,
    },
    /// The session id is live in another process (a second agent with the same session file, or
    /// this one was taken over). Not retryable while that process runs.
    #[error("session {session} is running in another process: {elsewhere}")]
    SessionElsewhere {
        /// The session id.
        session: String,
        /// Where it runs (pid, host, since when) and what to do about it.
        elsewhere: String,
    },
}

impl BackendError {
    /// Whether the same call may succeed later without anything being fixed (unavailable, timeout).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable { .. } | BackendError::Timeout { .. }
        )
    }
}

impl From<InvalidId> for BackendError {
    fn from(e: InvalidId) -> Self {
        BackendError::InvalidInput(e.to_string())
    }
}

/// The result of a backend operation.
pub type BackendResult<T> = Result<T, BackendError>;
