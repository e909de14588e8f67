"""A real Prometheus server on loopback for the dashboard and alert tests, and the
dashboard's and rules' PromQL with their variables filled in. Debian's `prometheus`."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "kvdepot-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "kvdepot-alerts.yml"
WINDOW = "10m"  # longer than a test: every sample since the first scrape is in it


def is_installed() -> bool:
    return shutil.which("prometheus") is not None and shutil.which("promtool") is not None


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the dashboard, its variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in (("$__rate_interval", WINDOW), ("$__range", WINDOW),
                               ("$instance", ".*"), ("$job", ".*kvdepot.*")):  # fmt: skip
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> dict[str, str]:
    import yaml

    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


class Prometheus:
    """`prometheus` scraping `targets` (job -> port on 127.0.0.1) every second, with the
    alert rules loaded; `stop` ends it."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        jobs = "\n".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']"
            for job, port in targets.items()
        )
        shutil.copy(ALERTS, workdir / "alerts.yml")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [alerts.yml]\nscrape_configs:\n{jobs}\n"
        )
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=self.log,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not get ready in 60 s"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def wait_scrapes(self, count: int = 3) -> None:
        """Wait until every target has been scraped `count` more times."""
        time.sleep(count * 1.0 + 0.5)

    def wait_for(self, expr: str, timeout_s: float = 30) -> list[tuple[dict[str, str], float]]:
        deadline = time.monotonic() + timeout_s
        while not (found := self.query(expr)):
            assert time.monotonic() < deadline, f"no data for {expr}"
            time.sleep(0.5)
        return found

    def alerts(self) -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
