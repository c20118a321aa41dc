"""Clients of a run: what you do with a fleet once it serves. Each reads the run through
`aegis.Run` (endpoints, routers, its key), never by re-parsing run files.

- batch: OpenAI batch files (JSONL) spread over the run's routers or instances, exactly once
- runs: the runs under a run directory (`aegis list`)
"""
