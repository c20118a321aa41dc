"""Is an instance really serving? /health 200, its name in /v1/models, a 1-token completion.

vLLM answers /health 200 while its engine is about to die (measured), so only an answered
completion counts. Probes run concurrently on one asyncio loop with a tiny HTTP/1.1 client
(no new dependencies; thousands of endpoints per round on one core).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: object  # caller's handle (instance id, ...)
    host: str
    port: int
    served_name: str
    api_key: str | None = None


@dataclass(frozen=True)
class Probe:
    ready: bool
    detail: str  # why not ready ("" when ready)


class _HTTPError(Exception):
    pass


class _Connection:
    """HTTP/1.1 with keep-alive: the three checks of one probe share a connection (one TCP
    handshake instead of three), reconnecting when the server closes it."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._request(method, path, body, headers or {}),
                                      timeout or self.timeout)

    async def _request(self, method, path, body, headers) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Accept: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        await self.writer.drain()
        reader = self.reader
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise _HTTPError(f"bad status line {status_line[:60]!r}")
        status = int(parts[1])
        length, chunked, close = None, False, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            data = b""
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    break
                data += await reader.readexactly(size)
                await reader.readline()
        elif length is not None:
            data = await reader.readexactly(length)
        else:
            data = await reader.read()
            close = True
        if close:
            await self.close()
        return status, data


async def probe(target: Target, timeout: float = 5.0) -> Probe:
    """One readiness check; never raises."""
    auth = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    where = f"{target.host}:{target.port}"
    conn = _Connection(target.host, target.port, timeout)
    try:
        status, _ = await conn.request("GET", "/health")
        if status != 200:
            return Probe(False, f"/health answered {status}")
        status, data = await conn.request("GET", "/v1/models", headers=auth)
        if status != 200:
            return Probe(False, f"/v1/models answered {status}")
        names = {m.get("id") for m in json.loads(data).get("data", [])}
        if target.served_name not in names:
            return Probe(False, f"/v1/models does not list {target.served_name!r} "
                                f"(has {sorted(n for n in names if n)})")
        body = json.dumps({"model": target.served_name, "prompt": "Hello", "max_tokens": 1,
                           "temperature": 0}).encode()
        # The first completion of a fresh engine can be slow (warm-up): allow longer.
        status, data = await conn.request("POST", "/v1/completions", body=body, headers=auth,
                                          timeout=max(timeout, 30.0))
        if status != 200:
            return Probe(False, f"1-token completion answered {status}: {data[:200].decode(errors='replace')}")
        if not json.loads(data).get("choices"):
            return Probe(False, "1-token completion returned no choices")
        return Probe(True, "")
    except ConnectionRefusedError:
        return Probe(False, f"connection refused on {where}")
    except asyncio.TimeoutError:
        return Probe(False, f"no answer from {where} within {timeout:g}s")
    except (OSError, _HTTPError, asyncio.IncompleteReadError, ValueError, AttributeError) as e:
        return Probe(False, f"{where}: {type(e).__name__}: {e}")
    finally:
        await conn.close()


async def _probe_all(targets: list[Target], timeout: float, concurrency: int) -> list[Probe]:
    gate = asyncio.Semaphore(concurrency)

    async def one(t: Target) -> Probe:
        async with gate:
            return await probe(t, timeout)

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
