//! backend-git: the markdown task board and STATUS files over git pull/commit/push. A claim is a
//! compare-and-swap on the branch (commit, then a push that only lands on the head it was made
//! on); a dedicated clone per session, never the user's working tree.

pub mod board;
