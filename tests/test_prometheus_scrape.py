"""A real Prometheus server (Debian's ``prometheus`` package; install.sh installs it, as root) scrapes the
gateway's ``/metrics`` and can query what the broker recorded, histograms included.

A missing ``prometheus`` binary fails this test: the scrape is what it proves.
"""
import json
import math
import os
import shutil
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from broker.launch import Children
from client import Client
from tests.harness import Deployment, free_port

pytestmark = pytest.mark.timeout(240)


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, expr: str):
    """The value of an instant query with one result, or None while it has none."""
    result = api(base, "/api/v1/query", query=expr)["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


class Prometheus:
    """A Prometheus server scraping one target every 0.5 s, in a temporary directory; killed by pid."""

    def __init__(self, target: str):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("no `prometheus` on PATH: install Debian's package (apt-get install prometheus; "
                        "install.sh does, as root)")
        self.children = Children(prefix="dsrv-prometheus-")
        tmp = self.children.tmp.name
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\n"
                    "scrape_configs:\n  - job_name: broker\n    metrics_path: /metrics\n"
                    f"    static_configs:\n      - targets: ['{target}']\n")
        self.base = f"http://127.0.0.1:{free_port()}"
        self.proc = self.children.start("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
            f"--web.listen-address={self.base[len('http://'):]}"])

    def wait_until(self, what: str, check, timeout: float = 60.0):
        """``check()`` until it returns something other than None (bounded); its errors retry."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}) while waiting for {what}:\n{self.tail()}")
            try:
                value = check()
                if value is not None:
                    return value
            except OSError as e:      # not listening yet
                last = e
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what} (last error: {last}):\n{self.tail()}")

    def tail(self) -> str:
        return self.children.tail("prometheus", 20)

    def close(self) -> None:
        self.children.close(grace=0)


def test_prometheus_scrapes_the_gateway_and_queries_what_the_broker_recorded():
    with Deployment(http=True) as d:
        d.add_worker("context", "ctx0")
        d.add_worker("generation", "gen0")
        with Client(d.frontend, timeout=60) as c:
            assert len(c.generate(token_ids=[5] * 12, max_tokens=4, ignore_eos=True).token_ids) == 4
        d.wait_idle()
        with urllib.request.urlopen(f"{d.http}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST      # it names the exposition version
        prom = Prometheus(urllib.parse.urlsplit(d.http).netloc)
        try:
            def target_up():
                targets = api(prom.base, "/api/v1/targets")["activeTargets"]
                if not targets:       # before service discovery has run
                    return None
                [t] = targets
                assert t["health"] in ("up", "unknown"), f"scrape failed: {t.get('lastError')}"
                return t if t["health"] == "up" else None
            target = prom.wait_until("the gateway target to be up", target_up)
            assert target["scrapeUrl"] == f"{d.http}/metrics" and not target["lastError"]
            finished = prom.wait_until("a sample of disagg_requests_total", lambda: query(
                prom.base, 'disagg_requests_total{job="broker",outcome="finished"}'))
            assert finished == 1
            assert query(prom.base, "disagg_e2e_request_latency_seconds_count") == 1
            # the bucket bounds parse as numbers: the quantile of the one request is a finite latency
            p50 = query(prom.base, "histogram_quantile(0.5, disagg_e2e_request_latency_seconds_bucket)")
            assert p50 is not None and math.isfinite(p50) and p50 > 0
            assert query(prom.base, 'disagg_workers{role="generation",state="idle"}') == 1
        finally:
            prom.close()
