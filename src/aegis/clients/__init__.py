"""Clients of a run: what you do with a fleet once it serves. Each reads the run through
`aegis.Run` (endpoints, routers, its key), never by re-parsing run files.

- batch: OpenAI batch files (JSONL) spread over the run's routers or instances, exactly once
- runs: the runs under a run directory (`aegis list`)
- metrics: what the fleet is doing, from every instance's and router's /metrics (`aegis metrics`)
"""

from __future__ import annotations

from ..run import Run as _HeldRun


class Run(_HeldRun):
    """The Run you hold (aegis.run.Run: state, wait, endpoints, key, cancel), with what you do
    with the fleet once it serves. `aegis.Run` and `aegis.submit` give this one."""

    def batch(self, input, output, **options):
        """An OpenAI batch file over this run, exactly once -> aegis.clients.batch.BatchCounts
        (aegis.clients.batch.batch; docs/batch.md)."""
        from .batch import batch  # its client (aiohttp, tqdm) only when a batch runs

        return batch(self, input, output, **options)

    def metrics(self, previous=None, **options):
        """One scrape of every serving instance's /metrics (and the routers') ->
        aegis.clients.metrics.Metrics; with `previous` (an earlier scrape), the rates
        between the two (aegis.clients.metrics.metrics; docs/metrics.md)."""
        from .metrics import metrics  # its client (aiohttp, prometheus_client) only when used

        return metrics(self, previous=previous, **options)


submit = Run.submit

__all__ = ["Run", "submit"]
