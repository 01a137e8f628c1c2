"""A real local 3-master Redis Cluster for the tests, started from Debian's redis-server.

`LocalCluster.start(dir)` runs three `redis-server --cluster-enabled yes` on free local ports (no
persistence, in a temporary directory), joins them with `redis-cli --cluster create ... --cluster-yes`,
and waits until every node reports cluster_state:ok. `stop()` terminates them. conftest.py starts one
per test session, on the first test that asks for it. The class lives in scripts/benchlib.py, so that
`scripts/bench_fleet.py --cluster` runs on the same cluster the tests use.
"""

from __future__ import annotations

from scripts.benchlib import LocalCluster

__all__ = ["LocalCluster"]
