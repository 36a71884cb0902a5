//! The README's walk-through, run as written: its marked shell block in a temp dir against
//! `ifc dev` (on a free port), each command's exit code checked (issue 16: the README is where a
//! newcomer starts, and nothing checked that its commands work).

use std::process::Command;

use crate::text;

const README: &str = include_str!("../../../../README.md");
const MARKER: &str = "<!-- walkthrough: checked by crates/ifc/tests/cli/readme.rs -->";

/// The lines of the shell block after the marker.
fn walkthrough() -> Vec<&'static str> {
    let after = README
        .split_once(MARKER)
        .expect("the README marks its walk-through")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a shell block after the marker")
        .1;
    let block = block.split_once("```").expect("the block ends").0;
    block.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// The exit code a line's comment expects (`# exit 1: …`), 0 otherwise.
fn expected_exit(line: &str) -> u8 {
    line.split_once('#')
        .and_then(|(_, comment)| comment.trim().strip_prefix("exit "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let lines = walkthrough();
    assert!(lines.len() >= 5, "a walk-through: {lines:?}");
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_ifc"))
        .parent()
        .expect("the binary's directory")
        .to_owned();
    // `ifc dev` takes the port and the next one (etcd's peer port): both must be free. Another
    // test may take one between this check and etcd's start: then the run is tried again on
    // other ports (only for that).
    for _ in 0..3 {
        let out = walk(&lines, free_pair(), &dir, &bin);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if !out.status.success() && said.contains("is in use") {
            continue;
        }
        assert!(
            out.status.success(),
            "the README walk-through failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        // `delete` tidied up what the walk-through made.
        let stdout = text(&out.stdout);
        assert!(stdout.contains("deleted T1"), "{stdout}");
        return;
    }
    panic!("no free pair of ports for `ifc dev` in three tries");
}

/// A port whose next one is free too, both free a moment ago.
fn free_pair() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = l.local_addr().expect("addr").port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// Runs the walk-through's `lines` in `dir` with `ifc dev` on `port`.
fn walk(
    lines: &[&str],
    port: u16,
    dir: &tempfile::TempDir,
    bin: &std::path::Path,
) -> std::process::Output {
    // What a person does between the lines: `ifc` is the one just built (the install line is
    // what puts it on PATH), `ifc dev` runs on a free port, and the next line waits until it
    // answers (a person reads the output first).
    let mut script = String::from("set -u\ntrap 'kill %1 2>/dev/null; wait' EXIT\n");
    for (n, line) in lines.iter().enumerate() {
        let command = line.split_once('#').map_or(*line, |(c, _)| c).trim();
        if command.starts_with("cargo install") {
            continue;
        }
        let command = command.replace("ifc dev", &format!("ifc dev --port {port}"));
        if command.ends_with('&') {
            script.push_str(&format!(
                "{command}\nfor _ in $(seq 200); do IFC_PREFIX= ifc status >/dev/null 2>&1 && break; sleep 0.1; done\n"
            ));
            continue;
        }
        let want = expected_exit(line);
        script.push_str(&format!(
            "{command}\nrc=$?; if [ $rc -ne {want} ]; then echo \"README walk-through line {}: exit $rc, expected {want}: {}\" >&2; exit 1; fi\n",
            n + 1,
            command.replace('"', "'")
        ));
    }
    Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("IFC_ENDPOINTS", format!("http://127.0.0.1:{port}"))
        .env_remove("IFC_PREFIX")
        .env_remove("IFC_MODE")
        .env_remove("IFC_FLEET")
        .output()
        .expect("bash runs")
}

#[test]
fn a_line_says_the_exit_code_it_expects() {
    assert_eq!(
        expected_exit("ifc claim T2 --session me   # exit 1: not claimable"),
        1
    );
    assert_eq!(expected_exit("ifc status   # every task"), 0);
    assert_eq!(expected_exit("ifc status"), 0);
}
