"""The run's ready instances for a site's Prometheus: `<run>/prometheus-targets.json`, in
Prometheus's file-based service discovery format (file_sd_configs), which rank 0's Board
rewrites whenever the set of ready instances changes (docs/metrics.md). Pure."""

from __future__ import annotations

import json

from .endpoints import InstanceState


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def prometheus_targets(states: list[InstanceState], *, job: str) -> list[dict]:
    """One target group per ready instance: its host:port (Prometheus asks it for /metrics)
    and labels job (the run's job id), model (the served name), node (its node's index),
    instance (instance-NNNN, as its log and script are named) and host."""
    return [{"targets": [_address(s.host, s.port)],
             "labels": {"job": job, "model": s.served_name, "node": str(s.node),
                        "instance": f"instance-{s.id:04d}", "host": s.host}}
            for s in sorted(states, key=lambda s: s.id) if s.state == "ready"]


def render_targets(groups: list[dict]) -> str:
    return json.dumps(groups, indent=2) + "\n"
