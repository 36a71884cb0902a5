//! What the bench reads about the processes involved: etcd's own `/metrics` (resident memory,
//! leases, watchers; on its client URL, plain HTTP only) and this process's resident memory.

use std::time::Duration;

/// etcd's figures at one moment; `None` where etcd did not say.
#[derive(Debug, Default, Clone, Copy)]
pub struct EtcdFigures {
    pub rss_bytes: Option<f64>,
    pub watchers: Option<f64>,
}

/// Reads `endpoint/metrics`. Errors are reported as absent figures: memory is a side note of the
/// bench, not a reason to fail it.
pub async fn etcd(endpoint: &str) -> EtcdFigures {
    if !endpoint.starts_with("http://") {
        return EtcdFigures::default();
    }
    let url = format!("{}/metrics", endpoint.trim_end_matches('/'));
    let fetch = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    };
    let text = match fetch.await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%url, error = %e, "cannot read etcd's metrics; its memory is not reported");
            return EtcdFigures::default();
        }
    };
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        tracing::warn!(%url, "etcd's metrics did not parse");
        return EtcdFigures::default();
    };
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .and_then(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    };
    EtcdFigures {
        rss_bytes: value("process_resident_memory_bytes"),
        watchers: value("etcd_debugging_mvcc_watcher_total"),
    }
}

/// This process's resident set size in bytes (Linux; `None` elsewhere).
pub fn own_rss() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}
