"""Rank 0's view of the whole fleet: every rank's instance states merged into the endpoints
file (launch.endpoints.EndpointsFile), the routers kept in step with them (launch.router), the
ready instances for a site's Prometheus (launch.targets: prometheus-targets.json), and what
the user sees while instances start: progress lines, each failure with its log tail as it
happens, the summary table."""

from __future__ import annotations

import sys
import time

from ..files import write_atomic
from ..layout import RunLayout
from .endpoints import (EndpointsFile, InstanceState, draining, failure_report, merge_parts,
                        none_serving)
from ..runfiles import SERVING_STATES
from .endpoints import summary_table
from .targets import prometheus_targets, render_targets

PROGRESS_INTERVAL = 10.0  # seconds between "still loading" lines


class Board:
    def __init__(self, config, plan, endpoints: EndpointsFile, *, layout: RunLayout,
                 router_host: str, router_node: str, api_key: str, log):
        self.config = config
        self.endpoints = endpoints
        self.layout = layout
        self.log = log
        self.by_rank: dict[int, list[InstanceState]] = {}
        self.merged: list[InstanceState] = []
        self.started = time.monotonic()
        self.next_progress = self.started + PROGRESS_INTERVAL
        self.reported: set[tuple[int, int]] = set()  # (instance, restarts) failures shown
        self.router_ports = plan.router_ports
        self.router_host, self.router_node = router_host, router_node
        self.api_key = api_key
        self.routers = None  # started with the instances, not during staging
        self.is_draining = False  # the job's end is near: nothing offered, routers emptied
        self.targets_written: str | None = None  # prometheus-targets.json as last written
        self.targets_failing = False  # its last write failed: try again on the next tick

    # -- every tick ---------------------------------------------------------------------------
    def update(self, changed: dict[int, list[InstanceState]]) -> None:
        """New states from the ranks whose instances changed (rank -> its states)."""
        self.by_rank.update(changed)
        if changed:
            self.merged = merge_parts([s for part in self.by_rank.values() for s in part])
            self._report_new_failures()
        shown = draining(self.merged) if self.is_draining else self.merged
        routers_changed = self.routers is not None and self.routers.sync(shown)
        if changed or routers_changed:
            self.endpoints.update(shown if changed else None,
                                  routers=self.routers.records() if self.routers else None)
        if changed or self.targets_failing:
            self.publish_targets(shown)

    def publish_targets(self, states: list[InstanceState]) -> None:
        """prometheus-targets.json: the ready instances, rewritten (atomically) only when they
        change. Mode 0644: a site's Prometheus runs as another user, and the file holds
        addresses and names, nothing secret. A failed write is reported once; the launch goes
        on and the next tick tries again."""
        text = render_targets(prometheus_targets(states, job=self.endpoints.job))
        if text == self.targets_written:
            return
        path = self.layout.prometheus_targets
        try:
            write_atomic(path, text, mode=0o644)
        except OSError as err:
            if not self.targets_failing:
                self.log(f"cannot write {path} ({err.strerror or err}); a Prometheus reading "
                         "it keeps its last targets")
            self.targets_failing = True
            return
        self.targets_written, self.targets_failing = text, False

    def _report_new_failures(self) -> None:
        for s in self.merged:
            if s.state == "failed" and (s.id, s.restarts) not in self.reported:
                self.reported.add((s.id, s.restarts))
                print(failure_report([s]), file=sys.stderr, flush=True)

    def progress(self) -> None:
        """While starting: how many are ready, which are still loading, for how long."""
        now = time.monotonic()
        if now < self.next_progress:
            return
        self.next_progress = now + PROGRESS_INTERVAL
        loading = [s for s in self.merged if s.state in ("pending", "starting", "restarting")]
        if not loading:
            return
        ready = sum(s.state == "ready" for s in self.merged)
        names = ", ".join(f"instance-{s.id:04d}" for s in loading[:6])
        more = f" and {len(loading) - 6} more" if len(loading) > 6 else ""
        self.log(f"{ready}/{len(self.merged)} ready after {now - self.started:.0f}s; loading: "
                 f"{names}{more} (logs: {self.layout.root}/logs)")

    # -- the launcher's phases -----------------------------------------------------------------
    def starting(self) -> None:
        self.started = time.monotonic()
        self.next_progress = self.started + PROGRESS_INTERVAL
        if self.router_ports:
            from .router import Routers

            self.routers = Routers(self.router_ports, host=self.router_host,
                                   node=self.router_node, layout=self.layout,
                                   api_key=self.api_key, extra_args=self.config.router_args,
                                   log=self.log)
        self.endpoints.update(state="starting",
                              routers=self.routers.records() if self.routers else None)
        self.publish_targets([])  # a file from an earlier run in this directory lists nothing

    def serving(self) -> None:
        self.endpoints.update(self.merged, state="serving")
        for record in self.endpoints.routers:
            if record["state"] == "ready":
                self.log(f"router for {record['model']}: {record['url']}")

    def draining(self) -> None:
        """The job's end is near: no instance is offered (in the file or by a router); what
        is in flight finishes."""
        self.is_draining = True
        shown = draining(self.merged)
        if self.routers is not None:
            self.routers.sync(shown)  # no ready instance: every worker is removed
        self.endpoints.update(shown, state="draining",
                              routers=self.routers.records() if self.routers else None)
        self.publish_targets(shown)

    def stopping(self) -> None:
        """A stop is decided: nothing is listed as ready, the routers take no more requests."""
        if self.routers is not None:
            self.routers.close()
        self.endpoints.update(none_serving(self.merged), state="stopping",
                              routers=self.routers.records() if self.routers else None)
        self.publish_targets([])

    def verdict(self) -> bool:
        ready = sum(s.state in SERVING_STATES for s in self.merged)  # a health check may flap
        ok = ready == len(self.merged) or (self.config.allow_partial and ready > 0)
        if not ok:
            self.log(f"{len(self.merged) - ready} of {len(self.merged)} instance(s) not ready"
                     + ("" if not self.config.allow_partial else " and none is ready"))
        return ok

    def report(self) -> None:
        print(summary_table(self.merged), file=sys.stderr, flush=True)
        self.log(f"endpoints: {self.endpoints.json_path}")

    def finish(self, state: str, exit_code: int) -> None:
        if self.routers is not None:
            self.routers.close()
        self.endpoints.finish(state, exit_code,
                              routers=self.routers.records() if self.routers else None)
        self.publish_targets([])
