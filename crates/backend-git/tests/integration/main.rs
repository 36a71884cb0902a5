//! Integration tests of the git backend on real repositories: a bare remote in a temp dir and one
//! clone per session.

mod conformance;
mod git;
mod one_session;

use backend_git::testing::BareRemote;
use backend_git::GitBackend;

/// An empty board with the guide's header.
pub const EMPTY_BOARD: &str = "# Board\n\n| ID | Task | Status | Owner | Blocked by |\n|----|------|--------|-------|------------|\n";

/// A backend with its own clone named `name`.
pub async fn open(remote: &BareRemote, name: &str) -> GitBackend {
    GitBackend::open(remote.config(name))
        .await
        .expect("open the clone")
}
