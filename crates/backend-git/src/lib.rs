//! backend-git: the markdown task board and STATUS files over git pull/commit/push. Filled in by the git-backend issue; nothing here yet.
