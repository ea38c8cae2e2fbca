"""The KV transport between simulated engine PROCESSES, for both connector modes of vLLM 0.26.

`labkit.engines.sim.connector` decides WHAT moves (vLLM's ExampleConnector / NixlConnector
rules); this module carries the facts between two `python -m labkit.engines.sim` servers:

- "example" (vllm/distributed/kv_transfer/kv_connector/v1/example_connector.py): prefill saves
  a prompt's KV into a folder per prompt hash under `shared_storage_path`; decode looks the
  folder up. Here a small marker file `<storage>/<key>.json` ({num_tokens, num_bytes,
  engine_id}) stands for the safetensors files: no tensors, the same lookup. The storage
  folder must lie inside the lab's run directory (`check_storage_path`).
- "nixl" (kv_connector/v1/nixl/): prefill answers with kv_transfer_params naming its engine,
  host and port (here: its HTTP port) and the block ids it holds (delay-free). Decode reads
  the blocks (the time comes from the link model, in simulated time), then notifies prefill,
  which frees them. The notification is `POST /labkit/kv/read {remote_request_id,
  block_ids}` on prefill's HTTP server (vLLM: a NIXL notif); its answer says how many bytes
  the blocks hold.

    decode engine                                 prefill engine
    add_request(kv_transfer_params) -> register_remote(params)
    step (waiting): heartbeat --POST /labkit/kv/heartbeat--> deliver_heartbeat
                                                  step: take_heartbeats -> lease extended
    step: read lands (sim time) -> notify_read_done --POST /labkit/kv/read--> deliver_read
                                                  step: take_read_done -> blocks freed
                                                  (or the lease runs out -> blocks freed)

  Heartbeats are vLLM's "HB:<ids>" NIXL notifs (base_worker.py `_send_heartbeats`); at most
  one POST per prefill engine is in flight (a step may send one every step when the lease is
  under 6 s: vLLM's interval is lease // 6).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from labkit.engines.sim.connector import STORAGE, KVTransport
from labkit.hardware import LINKS, LinkSpec
from labkit.vocab import run_root

logger = logging.getLogger(__name__)

READ_ROUTE = "/labkit/kv/read"
HEARTBEAT_ROUTE = "/labkit/kv/heartbeat"
MAX_HEARTBEAT_IDS = 65536  # request ids in one heartbeat (the route refuses more)
_KEY = re.compile(r"^[0-9a-f]{16,128}$")


def check_storage_path(path: str | Path, root: str | Path | None = None) -> Path:
    """Resolve `path` and refuse it unless it lies inside the run directory `root`.

    Raises:
        ValueError: the path (after resolving links and '..') is outside `root`.
    """
    base = Path(root).expanduser().resolve() if root is not None else run_root().resolve()
    resolved = Path(path).expanduser().resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"KV storage path {resolved} is outside the run directory {base}; "
                         f"use a folder under it (or set LABKIT_RUN_DIR)")
    return resolved


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def kv_peer(host: Any, port: Any) -> tuple[str, int]:
    """The (host, port) a decode engine may reach for KV: a bare loopback host (the lab's
    engines bind 127.0.0.1 only) and a port number, nothing else: a client's
    kv_transfer_params naming `127.0.0.1:PORT/anything?x=` must not make the engine call it.

    Raises:
        ValueError: anything else, with what was expected.
    """
    ok_port = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
    if not (isinstance(host, str) and host in _LOOPBACK and ok_port):
        raise ValueError(f"kv_transfer_params must name a prefill engine of this lab by "
                         f"remote_host (one of {sorted(_LOOPBACK)}) and remote_port (1-65535); "
                         f"got host {str(host)[:64]!r}, port {str(port)[:16]!r}")
    return host, port


class KVLoadError(RuntimeError):
    """A decode request's KV cannot be read: its prefill engine is gone, silent or another."""


class NetworkTransport(KVTransport):
    """`KVTransport` between engine processes: marker files for "example", HTTP for "nixl".

    Every method runs on the server's event-loop thread (the engine loop and the HTTP
    routes share it), so no locks are needed.

    Args:
        link: the link KV crosses between two engines (NIXL reads).
        storage_link: the link to ExampleConnector's storage (save and load).
        storage_dir: ExampleConnector's folder (checked with `check_storage_path`); None: no
            storage (nixl only).
        kv_bytes_per_token: KV bytes of one token on one GPU (marker files record bytes).
        engine_id: this engine's id (written into marker files).
        timeout: seconds for one notification POST, and for the handshake before a read.
    """

    def __init__(self, link: LinkSpec, storage_link: LinkSpec | None = None, *,
                 storage_dir: str | Path | None = None, kv_bytes_per_token: int = 0,
                 engine_id: str = "", timeout: float = 5.0) -> None:
        self.default_link = link
        self.storage_link = storage_link or link
        self.storage_dir = check_storage_path(storage_dir) if storage_dir is not None else None
        if self.storage_dir is not None:
            self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.engine_id = engine_id
        self.timeout = timeout
        self._remotes: dict[str, tuple[str, int]] = {}  # engine id -> (host, port)
        self._remote_blocks: dict[str, list[int]] = {}  # remote request id -> its block ids
        self._read_done: list[str] = []
        self._heartbeats: list[list[str]] = []
        self._beating: set[str] = set()  # engines with a heartbeat POST in flight
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: httpx.AsyncClient | None = None
        self.num_notifications = 0
        self.num_failed_notifications = 0
        self.num_heartbeats = 0  # heartbeats answered by their prefill engine
        self.on_read_delivered: Callable[[str], None] | None = None  # wakes the engine loop
        self.on_read_acked: Callable[[str, int], None] | None = None  # (req id, bytes)

    # ------------------------------------------------------------- ExampleConnector
    def _marker(self, key: str) -> Path:
        if self.storage_dir is None:
            raise RuntimeError("no KV storage folder configured (--kv-storage)")
        if not _KEY.match(key):
            raise ValueError(f"bad storage key {key!r}: expected a hex digest")
        return self.storage_dir / f"{key}.json"

    def store(self, key: str, num_tokens: int) -> None:
        """Record a saved prompt: write the marker atomically (tmp file, then rename)."""
        path = self._marker(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"num_tokens": num_tokens, "engine_id": self.engine_id,
                                   "num_bytes": num_tokens * self.kv_bytes_per_token}))
        os.replace(tmp, path)

    def contains(self, key: str) -> bool:
        return self.storage_dir is not None and self._marker(key).is_file()

    def stored(self, key: str) -> dict[str, Any] | None:
        """A marker's content, or None."""
        try:
            return json.loads(self._marker(key).read_text())
        except (OSError, ValueError):
            return None

    def link(self, src_engine_id: str, dst_engine_id: str) -> LinkSpec:
        return self.storage_link if STORAGE in (src_engine_id, dst_engine_id) else self.default_link

    # ------------------------------------------------------------- NixlConnector, decode
    def register_remote(self, params: dict[str, Any] | None) -> None:
        """Remember where a decode request's KV lives (its kv_transfer_params from prefill)."""
        if not params or not params.get("do_remote_prefill"):
            return
        engine, host, port = (params.get("remote_engine_id"), params.get("remote_host"),
                              params.get("remote_port"))
        if engine and host and port:
            try:
                self._remotes[str(engine)] = kv_peer(host, port)
            except ValueError as exc:
                logger.warning("%s", exc)
        rid = params.get("remote_request_id")
        blocks = params.get("remote_block_ids") or []
        if rid is not None:
            self._remote_blocks[str(rid)] = [int(b) for b in (blocks[0] if blocks and
                                                              isinstance(blocks[0], list) else blocks)]

    async def handshake(self, params: dict[str, Any] | None) -> None:
        """Reach the prefill engine that holds a decode request's KV before reading it.

        vLLM's NIXL handshake (nixl/base_worker.py _nixl_handshake) waits 5 s for the remote
        agent and checks its engine id; a failure marks the request's blocks invalid and, with
        kv_load_failure_policy='fail' (the default), the request ends with an error. Here the
        handshake is `GET /labkit/info` on prefill's HTTP port, once per request (vLLM caches
        it per engine, then a read from a dead engine fails: the same outcome).

        Raises:
            KVLoadError: no answer within `timeout` s, or the engine there has another id
                (it restarted: the blocks are gone).
            ValueError: the address is not a loopback host and a port (`kv_peer`).
        """
        if not params or not params.get("do_remote_prefill"):
            return
        engine, host, port = (params.get("remote_engine_id"), params.get("remote_host"),
                              params.get("remote_port"))
        if not (engine and host and port):
            return
        host, port = kv_peer(host, port)
        where = f"prefill engine {engine} at {host}:{port}"
        rid = params.get("remote_request_id")
        try:
            resp = await self._http().get(f"http://{host}:{port}/labkit/info")
            resp.raise_for_status()
            found = resp.json().get("engine_id")
        except (httpx.HTTPError, ValueError) as exc:
            raise KVLoadError(
                f"KV load failed: the {where} did not answer the NIXL handshake within "
                f"{self.timeout:g} s ({type(exc).__name__}: {exc}); request {rid}'s KV cannot "
                f"be read (kv_load_failure_policy='fail'). Restart the prefill engine and send "
                f"the request again") from None
        if found != engine:
            raise KVLoadError(
                f"KV load failed: {host}:{port} is now engine {found}, not the {where} that "
                f"computed request {rid} (it restarted; its blocks are gone). Send the request "
                f"again") from None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            from labkit.auth import headers

            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False,
                                             headers=headers())
        return self._client

    def notify_read_done(self, remote_engine_id: str, remote_request_id: str, at: float) -> None:
        """Tell prefill its blocks were read: a POST sent in the background (never blocks
        the engine loop); failures are counted, as vLLM's nixl_num_failed_notifications."""
        addr = self._remotes.get(remote_engine_id)
        blocks = self._remote_blocks.pop(remote_request_id, [])
        if addr is None:
            self.num_failed_notifications += 1
            logger.warning("no address for remote engine %s (request %s)", remote_engine_id,
                           remote_request_id)
            return
        body = {"remote_request_id": remote_request_id, "block_ids": blocks,
                "remote_engine_id": remote_engine_id}
        url = f"http://{addr[0]}:{addr[1]}{READ_ROUTE}"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): post inline
            self._post_sync(url, body)
            return
        task = loop.create_task(self._post(url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def heartbeat(self, remote_engine_id: str, remote_request_ids: list[str], at: float) -> None:
        """Extend the lease on these requests' blocks: a POST in the background, one in flight
        per engine; a failure is only logged (vLLM logs a failed heartbeat at debug level)."""
        addr = self._remotes.get(remote_engine_id)
        if addr is None or remote_engine_id in self._beating or not remote_request_ids:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nobody serves the answer (heartbeats are best effort)
        url = f"http://{addr[0]}:{addr[1]}{HEARTBEAT_ROUTE}"
        body = {"remote_engine_id": remote_engine_id,
                "req_ids": remote_request_ids[:MAX_HEARTBEAT_IDS]}
        self._beating.add(remote_engine_id)
        task = loop.create_task(self._post_heartbeat(url, body, remote_engine_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_heartbeat(self, url: str, body: dict[str, Any], engine: str) -> None:
        try:
            resp = await self._http().post(url, json=body)
            resp.raise_for_status()
            self.num_heartbeats += 1
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("NIXL heartbeat to %s failed: %s", url, exc)
        finally:
            self._beating.discard(engine)

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        try:
            resp = await self._http().post(url, json=body)
            resp.raise_for_status()
            self._acked(body["remote_request_id"], resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            self.num_failed_notifications += 1
            logger.warning("KV read notification to %s failed: %s", url, exc)

    def _post_sync(self, url: str, body: dict[str, Any]) -> None:
        try:
            resp = httpx.post(url, json=body, timeout=self.timeout)
            resp.raise_for_status()
            self._acked(body["remote_request_id"], resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            self.num_failed_notifications += 1
            logger.warning("KV read notification to %s failed: %s", url, exc)

    def _acked(self, req_id: str, answer: dict[str, Any]) -> None:
        self.num_notifications += 1
        if self.on_read_acked is not None:
            self.on_read_acked(req_id, int(answer.get("num_bytes", 0)))

    async def aclose(self) -> None:
        """Wait for notifications in flight (briefly), then close the HTTP client."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------- NixlConnector, prefill
    def deliver_read(self, remote_request_id: str) -> None:
        """A decode engine read this request's blocks (the route calls this)."""
        self._read_done.append(remote_request_id)
        if self.on_read_delivered is not None:
            self.on_read_delivered(remote_request_id)

    def deliver_heartbeat(self, req_ids: list[str]) -> None:
        """A decode engine heartbeated these requests (the route calls this): applied at the
        next step, as "now + lease extension" on this engine's lease clock."""
        self._heartbeats.append(list(req_ids))
        if self.on_read_delivered is not None:
            self.on_read_delivered("")

    def take_heartbeats(self, engine_id: str, now: float) -> list[tuple[float | None, list[str]]]:
        out, self._heartbeats = self._heartbeats, []
        return [(None, ids) for ids in out]

    def has_pending_reads(self) -> bool:
        """Reads or heartbeats delivered and not yet taken by a step."""
        return bool(self._read_done or self._heartbeats)

    def take_read_done(self, engine_id: str, now: float) -> list[str]:
        """Every delivered read (the decode engine's clock is not ours: `now` is not compared)."""
        out, self._read_done = self._read_done, []
        return out


def link_named(key: str) -> LinkSpec:
    """A hardware.LINKS entry by key, with the choices in the error."""
    try:
        return LINKS[key]
    except KeyError:
        raise ValueError(f"unknown link {key!r}; choose from {sorted(LINKS)}") from None
