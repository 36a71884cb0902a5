//! `ifc bench --peer`: runs the guide's own Python stack (`benches/peer/run`, etcd3 0.12) against
//! the same etcd in the same run, and reads its JSON figures.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Runs `runner --endpoint HOST:PORT --prefix PREFIX --samples N`; its JSON line.
pub async fn run(runner: &Path, endpoint: &str, prefix: &str, samples: usize) -> Result<Value> {
    let Some(host_port) = endpoint.strip_prefix("http://") else {
        bail!("--peer needs a plain http:// endpoint (the Python client is run without TLS), got {endpoint}");
    };
    let out = tokio::process::Command::new(runner)
        .args(["--endpoint", host_port.trim_end_matches('/')])
        .args(["--prefix", prefix])
        .args(["--samples", &samples.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run the peer benchmark {} (run ifc bench from the repository's root, or give --peer-cmd)",
                runner.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "the peer benchmark {} failed ({}): {}",
            runner.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("the peer benchmark printed no JSON figures: {line:?}"))
}
