//! Exit codes, decided in one place from the error's type.

use agent_core::{BackendError, InvalidId};

/// A normal "no" (lost, not claimable, not found, not the holder).
pub const NO: u8 = 1;
/// Bad input.
pub const USAGE: u8 = 2;
/// etcd unreachable, timed out or refusing.
pub const INFRA: u8 = 3;
/// A stored record is corrupt.
pub const CORRUPT: u8 = 4;
/// The session id is live in another process.
pub const ELSEWHERE: u8 = 5;

/// The exit code for a failed command.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<BackendError>() {
            return match e {
                BackendError::Unavailable { .. }
                | BackendError::Timeout { .. }
                | BackendError::Rejected { .. } => INFRA,
                BackendError::Corrupt { .. } => CORRUPT,
                BackendError::InvalidInput(_) => USAGE,
                BackendError::SessionElsewhere { .. } => ELSEWHERE,
            };
        }
        if cause.downcast_ref::<InvalidId>().is_some() {
            return USAGE;
        }
    }
    USAGE
}
