#!/usr/bin/env python3
"""The migration guide's claim and watch, done with its own Python stack (etcd3 0.12, grpcio,
protobuf 3.20), timed against the etcd `ifc bench --peer` measures.

A claim is what the guide's `coordinator.claim_task(task_id, session_id)` has to do: read the task
(`bus.get`), and if it is available, one transaction comparing the task key's mod revision and
putting the claimed record. A watch sample is a bare put timed until a prefix watch delivers it.
Prints one JSON object: every figure in milliseconds.

    claim.py --endpoint 127.0.0.1:2379 --prefix /scratch/ --samples 1000
"""

import argparse
import json
import os
import queue
import statistics
import sys
import time

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

try:
    import etcd3
except ImportError as e:  # pragma: no cover - explained to the user
    sys.exit(f"claim.py: {e}; run benches/peer/run (it installs requirements.txt in a venv)")


def percentile(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else 0.0


def spread(name, samples):
    return {
        f"{name}_p50_ms": round(percentile(samples, 0.50), 3),
        f"{name}_p95_ms": round(percentile(samples, 0.95), 3),
        f"{name}_p99_ms": round(percentile(samples, 0.99), 3),
        f"{name}_mean_ms": round(statistics.fmean(samples), 3) if samples else 0.0,
    }


def claim_task(client, key, session):
    """The guide's claim: get, check, compare-and-swap. True when won."""
    value, meta = client.get(key)
    if value is None or json.loads(value).get("status") != "available":
        return False
    record = json.loads(value)
    record.update(status="claimed", claimed_by=session, claimed_at=time.time())
    won, _ = client.transaction(
        compare=[client.transactions.mod(key) == meta.mod_revision],
        success=[client.transactions.put(key, json.dumps(record))],
        failure=[],
    )
    return won


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="HOST:PORT of etcd's client URL")
    ap.add_argument("--prefix", required=True, help="scratch key prefix (deleted afterwards)")
    ap.add_argument("--samples", type=int, default=1000)
    a = ap.parse_args()
    host, _, port = a.endpoint.rpartition(":")
    client = etcd3.client(host=host or "127.0.0.1", port=int(port), timeout=10)
    base = a.prefix + "peer/"
    try:
        keys = [f"{base}tasks/T{i:07}" for i in range(a.samples)]
        for k in keys:
            client.put(k, json.dumps({"status": "available", "claimed_by": None}))
        claims, txns, wins = [], [], 0
        for k in keys:
            start = time.perf_counter()
            won = claim_task(client, k, "peer-session")
            claims.append((time.perf_counter() - start) * 1e3)
            wins += won
        # The transaction alone (no read first), for comparison with a bare transaction.
        for i in range(a.samples):
            k = f"{base}txn/{i}"
            start = time.perf_counter()
            client.transaction(
                compare=[client.transactions.version(k) == 0],
                success=[client.transactions.put(k, '{"status":"claimed","claimed_by":"peer"}')],
                failure=[],
            )
            txns.append((time.perf_counter() - start) * 1e3)
        heard = queue.Queue()
        watch_id = client.add_watch_prefix_callback(base + "watch/", lambda r: heard.put(time.perf_counter()))
        watches = []
        for i in range(a.samples):
            start = time.perf_counter()
            client.put(f"{base}watch/{i}", "x")
            watches.append((heard.get(timeout=10) - start) * 1e3)
        client.cancel_watch(watch_id)
        out = {"stack": f"python {sys.version.split()[0]}, etcd3 {etcd3.__version__}", "samples": a.samples, "claims_won": wins}
        out.update(spread("claim", claims))
        out.update(spread("txn", txns))
        out.update(spread("watch", watches))
        print(json.dumps(out))
    finally:
        client.delete_prefix(base)
        client.close()


if __name__ == "__main__":
    main()
