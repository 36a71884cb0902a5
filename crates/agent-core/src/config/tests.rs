//! The example files parse with no unknown keys; every kind of bad file names file, line and key.

use std::path::Path;
use std::time::Duration;

use super::*;

const SESSION_EXAMPLE: &str = include_str!("../../../../agents/session-1-ndi.yaml");
const FLEET_EXAMPLE: &str = include_str!("../../../../config/coordinator.yaml");

fn session(text: &str) -> Result<SessionFile, ConfigError> {
    SessionFile::parse(Path::new("agents/s.yaml"), text)
}

#[test]
fn the_example_files_parse() {
    let s = SessionFile::parse(Path::new("agents/session-1-ndi.yaml"), SESSION_EXAMPLE)
        .expect("example session file");
    assert_eq!(s.session_id.as_str(), "session-1-ndi");
    assert!(!s.command.is_empty());
    assert!(
        s.tasks.iter().any(|p| p.as_str().contains('*')),
        "the example shows a glob"
    );
    let f = FleetFile::parse(Path::new("config/coordinator.yaml"), FLEET_EXAMPLE)
        .expect("example fleet file");
    assert_eq!(f.mode, Some(Mode::Coordinator));
    assert_eq!(
        f.etcd.endpoints.as_deref(),
        Some(&["http://127.0.0.1:2379".to_owned()][..])
    );
    assert_eq!(
        f.git.poll_interval.map(|d| d.0),
        Some(Duration::from_secs(30))
    );
}

#[test]
fn patterns_match_ids_and_globs() {
    let exact = TaskPattern::parse("P0.5.4").expect("valid");
    let glob = TaskPattern::parse("P0.5.*").expect("valid");
    let id = |s: &str| TaskId::parse(s).expect("valid");
    assert!(exact.matches(&id("P0.5.4")) && !exact.matches(&id("P0.5.40")));
    assert!(glob.matches(&id("P0.5.40")) && !glob.matches(&id("P0.6.1")));
    assert!(TaskPattern::parse("P0 5").is_err());
    assert!(TaskPattern::parse("$(touch pwned)").is_err());
}

#[test]
fn errors_name_file_line_and_key() {
    let base = "session_id: s1\ntasks: [A]\ncommand: [/bin/true]\n";
    let cases = [
        (
            format!("{base}tsak_timeout: 10s\n"),
            "agents/s.yaml:4",
            "tsak_timeout",
        ),
        (
            format!("{base}task_timeout: 10 parsecs\n"),
            "agents/s.yaml:4",
            "task_timeout",
        ),
        (
            format!("{base}max_attempts: many\n"),
            "agents/s.yaml:4",
            "max_attempts",
        ),
        (
            "session_id: s1\ntasks: [A]\n".to_owned(),
            "agents/s.yaml",
            "command",
        ),
        (
            "session_id: s1\ntasks: [A]\ncommand: []\n".to_owned(),
            "agents/s.yaml",
            "command",
        ),
        (
            "session_id: 'bad id'\ntasks: [A]\ncommand: [x]\n".to_owned(),
            "agents/s.yaml:1",
            "invalid session id",
        ),
        (
            "session_id: s1\ntasks: ['$(touch pwned)']\ncommand: [x]\n".to_owned(),
            "agents/s.yaml:2",
            "invalid task id",
        ),
        (
            format!("{base}lease_ttl: 10\n"),
            "agents/s.yaml:4",
            "give its unit, e.g. 10s",
        ),
        (
            "session_id: s1\nsession_id: s2\ntasks: [A]\ncommand: [x]\n".to_owned(),
            "agents/s.yaml:2",
            "duplicate field `session_id`",
        ),
        (
            // Tester helper-2: a nested map's duplicate key was taken silently (the last won).
            format!("{base}env:\n  FOO: '1'\n  BAR: '2'\n  FOO: '3'\n"),
            "agents/s.yaml:7",
            "duplicate field `FOO`",
        ),
        (String::new(), "agents/s.yaml", ""),
        ("session_id: [\n".to_owned(), "agents/s.yaml", ""),
    ];
    for (text, place, key) in cases {
        let err = session(&text).expect_err(&text).to_string();
        assert!(err.starts_with(place), "{err:?} should start with {place}");
        assert!(err.contains(key), "{err:?} should name {key}");
    }
    let err = FleetFile::parse(Path::new("config/c.yaml"), "etcd:\n  endpoint: [x]\n")
        .expect_err("unknown key")
        .to_string();
    assert!(
        err.starts_with("config/c.yaml:2") && err.contains("endpoint"),
        "{err}"
    );
    let err = FleetFile::parse(Path::new("config/c.yaml"), "mode: sideways\n")
        .expect_err("bad mode")
        .to_string();
    assert!(
        err.starts_with("config/c.yaml:1") && err.contains("sideways"),
        "{err}"
    );
}

#[test]
fn durations_read_with_their_units() {
    let s = session("session_id: s1\ntasks: [A]\ncommand: [x]\ntask_timeout: 30m\nlease_ttl: 5s\n")
        .expect("valid");
    assert_eq!(s.task_timeout.map(|d| d.0), Some(Duration::from_secs(1800)));
    assert_eq!(s.lease_ttl.map(|d| d.0), Some(Duration::from_secs(5)));
}

#[test]
fn a_huge_file_is_refused_before_parsing() {
    let dir = std::env::temp_dir().join(format!("ifc-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("big.yaml");
    std::fs::write(&path, "#".repeat(10 << 20)).expect("write");
    let err = SessionFile::load(&path).expect_err("too large").to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("too large"), "{err}");
}

fn fleet(text: &str) -> FleetFile {
    FleetFile::parse(Path::new("config/coordinator.yaml"), text).expect("valid fleet file")
}

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid id")
}

#[test]
fn mode_precedence_rollback_flag_session_rollout_default() {
    let f = fleet(
        "mode: coordinator\nrollout:\n  default: hybrid\n  git: [s-git]\n  sessions: {s-map: coordinator}\n",
    );
    let own = session("session_id: s1\ntasks: [A]\ncommand: [x]\nmode: git\n").expect("valid");
    let none = session("session_id: s1\ntasks: [A]\ncommand: [x]\n").expect("valid");
    let id = sid("s1");
    assert_eq!(
        mode_for(Some(&id), Some(Mode::Hybrid), Some(&own), Some(&f)),
        (Mode::Hybrid, ModeSource::Flag)
    );
    assert_eq!(
        mode_for(Some(&id), None, Some(&own), Some(&f)),
        (Mode::Git, ModeSource::SessionFile)
    );
    assert_eq!(
        mode_for(Some(&id), None, Some(&none), Some(&f)),
        (Mode::Hybrid, ModeSource::Rollout)
    );
    assert_eq!(
        mode_for(Some(&sid("s-git")), None, Some(&none), Some(&f)),
        (Mode::Git, ModeSource::Rollout)
    );
    assert_eq!(
        mode_for(Some(&sid("s-map")), None, None, Some(&f)),
        (Mode::Coordinator, ModeSource::Rollout)
    );
    let plain = fleet("mode: git\n");
    assert_eq!(
        mode_for(Some(&id), None, Some(&none), Some(&plain)),
        (Mode::Git, ModeSource::FleetDefault)
    );
    assert_eq!(
        mode_for(Some(&id), None, None, None),
        (Mode::Coordinator, ModeSource::BuiltIn)
    );
    let rollback = fleet("mode: coordinator\nrollback: true\n");
    assert_eq!(
        mode_for(
            Some(&id),
            Some(Mode::Coordinator),
            Some(&own),
            Some(&rollback)
        ),
        (Mode::Git, ModeSource::Rollback),
        "rollback wins over everything"
    );
}

#[test]
fn a_percent_rollout_is_a_stable_share() {
    let f = fleet("mode: coordinator\nrollout:\n  percent: 30\n  percent_mode: hybrid\n");
    let ids: Vec<SessionId> = (0..1000).map(|i| sid(&format!("session-{i}"))).collect();
    let hybrid = ids
        .iter()
        .filter(|id| mode_for(Some(id), None, None, Some(&f)).0 == Mode::Hybrid)
        .count();
    assert!(
        (230..=370).contains(&hybrid),
        "30 % of 1000 by hash, got {hybrid}"
    );
    for id in &ids {
        assert_eq!(
            mode_for(Some(id), None, None, Some(&f)),
            mode_for(Some(id), None, None, Some(&f))
        );
    }
    // The share must not move between versions or machines: FNV-1a("session-1") % 100 (computed
    // independently with Python).
    assert_eq!(stable_bucket(&sid("session-1")), 61);
    let err = FleetFile::parse(Path::new("c.yaml"), "rollout:\n  percent: 120\n")
        .expect_err("over 100")
        .to_string();
    assert!(err.contains("rollout.percent"), "{err}");
}

#[test]
fn the_demo_sessions_parse() {
    for (name, text) in [
        (
            "session-1-ndi",
            include_str!("../../../../agents/demo/session-1-ndi.yaml"),
        ),
        (
            "session-2-webrtc",
            include_str!("../../../../agents/demo/session-2-webrtc.yaml"),
        ),
        (
            "session-3-bus",
            include_str!("../../../../agents/demo/session-3-bus.yaml"),
        ),
        (
            "session-4-sip",
            include_str!("../../../../agents/demo/session-4-sip.yaml"),
        ),
    ] {
        let s = session(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.session_id.as_str(), name);
    }
}

#[test]
fn the_keys_a_running_agent_does_not_take_up_are_named() {
    let base = "session_id: s1\ntasks: [A]\ncommand: [x]\n";
    let old = session(base).expect("valid");
    let same_but_mode = session(&format!("{base}mode: git\n")).expect("valid");
    assert!(old.changes_needing_restart(&same_but_mode).is_empty());
    let edited = session("session_id: s1\ntasks: [A, B]\ncommand: [y]\n").expect("valid");
    assert_eq!(old.changes_needing_restart(&edited), ["tasks", "command"]);
}

#[test]
fn the_slo_section_is_checked_when_the_file_is_read() {
    let parse = |text: &str| FleetFile::parse(Path::new("config/c.yaml"), text);
    let f = parse("slo:\n  claim_p95: 10ms\n  success_rate: 0.99\n").expect("valid");
    let o = f.slo.expect("slo").objective().expect("objective");
    assert_eq!(o.claim_p95, Some(std::time::Duration::from_millis(10)));
    assert_eq!(
        o.window,
        std::time::Duration::from_secs(60),
        "default window"
    );
    assert_eq!(o.recover_after, o.window, "default: the window");
    assert_eq!(o.min_claims, 20);
    for (text, says) in [
        (
            "slo:\n  window: 30s\n",
            "c.yaml:1: slo: needs claim_p95, success_rate or both",
        ),
        (
            "slo:\n  success_rate: 99\n",
            "c.yaml:2: slo.success_rate: 99 is not a share",
        ),
        (
            "slo:\n  claim_p95: 10ms\n  window: 10ms\n",
            "c.yaml:3: slo.window",
        ),
        ("slo:\n  claim_p95: 10\n", "unit"),
        ("slo:\n  claim_p95: 10ms\n  p99: 1ms\n", "p99"),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(says), "{text}: {err}");
        assert!(err.contains("config/c.yaml"), "{err}");
    }
}
