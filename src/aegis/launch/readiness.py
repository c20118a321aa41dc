"""Is an instance really serving? /health 200, its name in /v1/models, a 1-token completion.
(A ready instance is also watched more often with /health alone: Target.health_only.)

vLLM answers /health 200 while its engine is about to die (measured), so only an answered
completion counts. Probes run concurrently on one asyncio loop with aiohttp, one client
session per round whose pool keeps each server's connection alive across its three checks.

Why aiohttp (not httpx): its HTTP parser is C (llhttp), so thousands of probes per round stay
cheap on the launcher's one core (benchmarks/bench_readiness.py); it speaks HTTP/1.0 and 1.1,
keep-alive or not, chunked or close-delimited bodies, as servers choose; and it ignores
HTTP(S)_PROXY unless told otherwise, which matters on sites that set a proxy for the outside
world: probes go to node addresses directly.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_BODY = 4 << 20  # bytes of a response a probe reads at most (a model list, a completion)
COMPLETION_TIMEOUT = 30.0  # the first completion of a fresh engine can be slow (warm-up)


@dataclass(frozen=True)
class Target:
    key: object  # caller's handle (instance id, ...)
    host: str
    port: int
    served_name: str
    api_key: str | None = None
    health_only: bool = False  # GET /health alone: the quick check of a ready instance
    timeout: float | None = None  # this target's own limit per request (default: the round's)


@dataclass(frozen=True)
class Probe:
    ready: bool
    detail: str  # why not ready ("" when ready)


class _BodyTooLarge(Exception):
    pass


async def _request(session, method: str, url: str, timeout: float, **kw) -> tuple[int, bytes]:
    import aiohttp

    async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout),
                               allow_redirects=False, **kw) as resp:
        data = bytearray()
        async for chunk in resp.content.iter_chunked(64 << 10):
            data += chunk
            if len(data) > MAX_BODY:
                raise _BodyTooLarge(f"{url} answered more than {MAX_BODY} bytes")
        return resp.status, bytes(data)


async def probe(session, target: Target, timeout: float = 5.0) -> Probe:
    """One readiness check with an aiohttp session; never raises."""
    import aiohttp

    timeout = target.timeout or timeout
    auth = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    where = f"{target.host}:{target.port}"
    host = f"[{target.host}]" if ":" in target.host else target.host
    base = f"http://{host}:{target.port}"
    try:
        status, _ = await _request(session, "GET", f"{base}/health", timeout)
        if status != 200:
            return Probe(False, f"/health answered {status}")
        if target.health_only:
            return Probe(True, "")
        status, data = await _request(session, "GET", f"{base}/v1/models", timeout, headers=auth)
        if status != 200:
            return Probe(False, f"/v1/models answered {status}")
        names = {m.get("id") for m in json.loads(data).get("data", [])}
        if target.served_name not in names:
            return Probe(False, f"/v1/models does not list {target.served_name!r} "
                                f"(has {sorted(n for n in names if n)})")
        body = {"model": target.served_name, "prompt": "Hello", "max_tokens": 1,
                "temperature": 0}
        status, data = await _request(session, "POST", f"{base}/v1/completions",
                                      max(timeout, COMPLETION_TIMEOUT), json=body, headers=auth)
        if status != 200:
            return Probe(False, f"1-token completion answered {status}: "
                                f"{data[:200].decode(errors='replace')}")
        if not json.loads(data).get("choices"):
            return Probe(False, "1-token completion returned no choices")
        return Probe(True, "")
    except aiohttp.ClientConnectorError as e:
        if e.os_error is not None and e.os_error.errno == errno.ECONNREFUSED:
            return Probe(False, f"connection refused on {where}")
        return Probe(False, f"{where}: cannot connect: {e.os_error or e}")
    except asyncio.TimeoutError:  # aiohttp's timeouts are asyncio.TimeoutError too
        return Probe(False, f"no answer from {where} within {timeout:g}s")
    except (aiohttp.ClientError, OSError, _BodyTooLarge, ValueError, AttributeError,
            TypeError) as e:  # a broken answer: not JSON, not the expected shape, cut off
        return Probe(False, f"{where}: {type(e).__name__}: {e}")


async def _probe_all(targets: list[Target], timeout: float, concurrency: int) -> list[Probe]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    # One pooled connection per server at a time (its three checks run in turn); no cookies.
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=1)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     headers={"Accept": "application/json"}) as session:

        async def one(t: Target) -> Probe:
            async with gate:
                return await probe(session, t, timeout)

        return await asyncio.gather(*(one(t) for t in targets))


def probe_round(targets: Iterable[Target], *, timeout: float = 5.0,
                concurrency: int = 256) -> dict[object, Probe]:
    """Probe every target once, concurrently. Keys are the targets' keys."""
    targets = list(targets)
    if not targets:
        return {}
    results = asyncio.run(_probe_all(targets, timeout, concurrency))
    return {t.key: r for t, r in zip(targets, results)}


def wait_ready(targets: Iterable[Target], *, deadline: float, interval: float = 0.5,
               timeout: float = 5.0, dead: Callable[[object], str | None] | None = None,
               on_ready: Callable[[object], None] | None = None) -> dict[object, Probe]:
    """Poll until every target is ready, dead (dead(key) returns a reason) or the monotonic
    `deadline` passes. Each pending target is probed at least every `interval` seconds."""
    pending = {t.key: t for t in targets}
    final: dict[object, Probe] = {}
    last: dict[object, Probe] = {}
    while pending:
        started = time.monotonic()
        if dead:
            for key in list(pending):
                reason = dead(key)
                if reason:
                    final[key] = Probe(False, reason)
                    del pending[key]
        for key, result in probe_round(pending.values(), timeout=timeout).items():
            last[key] = result
            if result.ready:
                final[key] = result
                del pending[key]
                if on_ready:
                    on_ready(key)
        now = time.monotonic()
        if now >= deadline:
            for key in pending:
                final[key] = Probe(False, f"not ready in time; last check: {last[key].detail}")
            break
        if pending:
            time.sleep(max(0.0, min(interval - (now - started), deadline - now)))
    return final
