//! Which process runs a session: an id (`pid@host/started-ms`) that a store keeps next to a
//! session's presence and claims, and whether the process it names can still be alive. A session
//! id is live in one process at a time; a claim made by a live process is re-claimed only by it.

use std::sync::OnceLock;

/// This machine's host name (empty if it cannot be read).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// This process's id: `pid@host/started-ms`, the same for the whole life of the process.
pub fn this_process() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let started = chrono::Utc::now().timestamp_millis();
        format!("{}@{}/{started}", std::process::id(), hostname())
    })
}

/// The pid and host a process id names (`None`: not one of ours).
pub fn parse(id: &str) -> Option<(u32, &str)> {
    let (pid, rest) = id.split_once('@')?;
    let host = rest.rsplit_once('/').map_or(rest, |(h, _)| h);
    Some((pid.parse().ok()?, host))
}

/// Whether the process `pid` on `host` may be alive: `false` only when it ran on this machine
/// and no such process exists now. A process on another machine is taken to be alive (its
/// lease or heartbeat tells when it is not).
pub fn may_be_alive(pid: u32, host: &str) -> bool {
    if host != hostname() || pid == 0 {
        return true;
    }
    if pid == std::process::id() {
        return true;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Whether the process with id `id` may be alive (see [`may_be_alive`]); an id that is not one
/// of ours is taken to be alive.
pub fn id_may_be_alive(id: &str) -> bool {
    parse(id).is_none_or(|(pid, host)| may_be_alive(pid, host))
}

/// Where a session's presence says it runs, for messages: `pid 123 on host "h" since …`.
pub fn describe(p: &crate::Presence) -> String {
    format!(
        "pid {} on host {:?} since {}",
        p.pid,
        p.host,
        p.started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_one_is_not() {
        let me = this_process();
        let (pid, host) = parse(me).expect("our own id parses");
        assert_eq!(pid, std::process::id());
        assert!(id_may_be_alive(me));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let dead = child.id();
        child.wait().expect("wait");
        assert!(!may_be_alive(dead, host), "a reaped child is not alive");
        assert!(
            may_be_alive(dead, "another-host.example"),
            "a process elsewhere is taken to be alive"
        );
        assert!(id_may_be_alive("not an id"));
    }
}
