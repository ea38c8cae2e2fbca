"""Simulated KV connectors: the two behaviours of vLLM 0.26's PD connectors, scheduler side
plus a timed stand-in for the worker side.

- "example" (vllm/distributed/kv_transfer/kv_connector/v1/example_connector.py): the prefill
  engine saves the KV of whole blocks of the prompt to shared storage keyed by the prompt's
  tokens; the decode engine finds the key and loads `align(len(prompt) - 1)` tokens, e.g. a
  1,081-token prompt -> 1,072 external tokens, the rest computed locally. The worker writes
  and reads one safetensors file per (request, attention layer): prefill's `save_kv_layer`
  writes each layer's file synchronously right after that layer's forward, decode's
  `start_load_kv` reads every layer's file before the forward starts. Both lengthen the step.
- "nixl" (kv_connector/v1/nixl/pull_scheduler.py): prefill finishes with delay-free and returns
  kv_transfer_params (remote_block_ids, remote_engine_id, remote_host, remote_port,
  remote_num_tokens); decode pulls EVERY prompt token it lacks asynchronously
  (WAITING_FOR_REMOTE_KVS), then notifies prefill, which frees its blocks (finished_sending).
  Prefill holds them for a lease (`kv_lease_duration` in kv_connector_extra_config, 30 s),
  which decode's heartbeats extend while the request waits; an expired lease frees them
  (vllm:nixl_num_kv_expired_reqs). See NixlConnector.

Engines exchange bytes and notifications through a `KVTransport` (in-process for SimCluster,
over the network for simulated servers).
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labkit.engines.sim.cost_model import transfer_time
from labkit.engines.sim.request import Request, RequestStatus
from labkit.hardware import achieved_link

if TYPE_CHECKING:
    from labkit.engines.sim.kv_cache_manager import KVCacheBlocks
    from labkit.engines.sim.output import SchedulerOutput
    from labkit.hardware import LinkSpec

logger = logging.getLogger(__name__)
_NOTHING: tuple[set[str], set[str]] = (frozenset(), frozenset())  # type: ignore[assignment]
STORAGE = "storage"  # the peer name of ExampleConnector's shared storage in KVTransport.link


class KVTransport(ABC):
    """What simulated connectors need from outside their engine. Keep implementations small.

    ExampleConnector: `store` / `contains` a prompt's KV under a key (vLLM: a folder per
    prompt hash under shared_storage_path). NixlConnector: `notify_read_done` tells the
    prefill engine that a decode engine has read a request's blocks (vLLM: NIXL notif), and
    the prefill engine drains them with `take_read_done`. `link` names the path the bytes
    take between two engines (or to STORAGE); transfer time is latency + bytes / bandwidth.
    """

    @abstractmethod
    def store(self, key: str, num_tokens: int) -> None:
        """An engine saved `num_tokens` tokens of KV under `key`."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether KV for `key` has been saved."""

    @abstractmethod
    def link(self, src_engine_id: str, dst_engine_id: str) -> LinkSpec:
        """The link KV bytes cross from `src` to `dst` (either may be STORAGE)."""

    @abstractmethod
    def notify_read_done(self, remote_engine_id: str, remote_request_id: str, at: float) -> None:
        """Decode finished reading `remote_request_id`'s blocks from `remote_engine_id` at `at`."""

    @abstractmethod
    def take_read_done(self, engine_id: str, now: float) -> list[str]:
        """Request ids of `engine_id` whose blocks were read by `now` (drained)."""

    def heartbeat(self, remote_engine_id: str, remote_request_ids: list[str],  # noqa: B027
                  at: float) -> None:
        """A decode engine extends the lease on these requests' blocks (vLLM: an "HB:" notif)."""

    def take_heartbeats(self, engine_id: str, now: float) -> list[tuple[float | None, list[str]]]:
        """Heartbeats `engine_id` got by `now`, drained: (send time, or None for "now"; ids)."""
        return []


class InProcessTransport(KVTransport):
    """A transport for engines living in one process (SimCluster, tests).

    Args:
        default_link: link between any two engines (e.g. LINKS["nvlink"]).
        storage_link: link to ExampleConnector's storage (e.g. LINKS["same-gpu"]).
        links: overrides per (src_engine_id, dst_engine_id).
    """

    def __init__(self, default_link: LinkSpec, storage_link: LinkSpec | None = None,
                 links: dict[tuple[str, str], LinkSpec] | None = None) -> None:
        self.default_link = default_link
        self.storage_link = storage_link or default_link
        # Writes to the storage (ExampleConnector's saves) as measured where they were.
        self.storage_write_link = achieved_link("example-save", self.storage_link)
        self.links = dict(links or {})
        self._stored: dict[str, int] = {}
        self._read_done: dict[str, list[tuple[float, str]]] = {}
        self._heartbeats: dict[str, list[tuple[float, list[str]]]] = {}
        self.on_notify: Any = None  # callable(engine_id, at): SimCluster wakes the engine

    def store(self, key: str, num_tokens: int) -> None:
        self._stored[key] = num_tokens

    def contains(self, key: str) -> bool:
        return key in self._stored

    def link(self, src_engine_id: str, dst_engine_id: str) -> LinkSpec:
        found = self.links.get((src_engine_id, dst_engine_id))
        if found is not None:
            return found
        if dst_engine_id == STORAGE:
            return self.storage_write_link
        return self.storage_link if src_engine_id == STORAGE else self.default_link

    def notify_read_done(self, remote_engine_id: str, remote_request_id: str, at: float) -> None:
        self._read_done.setdefault(remote_engine_id, []).append((at, remote_request_id))
        if self.on_notify is not None:
            self.on_notify(remote_engine_id, at)

    def take_read_done(self, engine_id: str, now: float) -> list[str]:
        pending = self._read_done.get(engine_id)
        if not pending:
            return []
        ready = [rid for t, rid in pending if t <= now]
        if ready:
            self._read_done[engine_id] = [(t, rid) for t, rid in pending if t > now]
        return ready

    def heartbeat(self, remote_engine_id: str, remote_request_ids: list[str], at: float) -> None:
        self._heartbeats.setdefault(remote_engine_id, []).append((at, remote_request_ids))

    def take_heartbeats(self, engine_id: str, now: float) -> list[tuple[float | None, list[str]]]:
        pending = self._heartbeats.get(engine_id)
        if not pending:
            return []
        ready: list[tuple[float | None, list[str]]] = [x for x in pending if x[0] <= now]
        if ready:
            self._heartbeats[engine_id] = [x for x in pending if x[0] > now]
        return ready


@dataclass(slots=True)
class TransferRecord:
    """One finished or scheduled KV move (the observer's KVTransfer event)."""

    req_id: str
    direction: str  # "send" (save) | "recv" (load)
    num_tokens: int
    num_bytes: int
    start: float
    end: float
    connector: str


@dataclass(slots=True)
class LayerRecord:
    """One layer's KV work in a worker hook (the observer's LayerTiming event)."""

    op: str  # "save" (save_kv_layer) | "load" (wait_for_layer_load)
    layer: int
    start: float
    end: float
    num_bytes: int
    req_ids: list[str]


class SimKVConnector(ABC):
    """Scheduler-side hooks with vLLM's names, plus `start_step` standing in for the worker.

    Args:
        engine_id: this engine's id (NIXL's engine_id).
        block_size: tokens per block.
        kv_bytes_per_token: KV bytes of one token on one GPU of this engine.
        transport: how this engine reaches the others.
        num_layers: attention layers on one GPU of this engine (ExampleConnector: files
            per request; each file costs the link's latency once).
    """

    name = "base"
    saves_per_layer = False  # save_kv_layer does work (ExampleConnector); else it returns at once
    # kv_role "kv_both" (what the lab runs): a KV consumer, so with more than one batch in
    # flight the scheduler defers block frees (Scheduler.defer_block_free).
    is_kv_consumer = True

    def __init__(self, engine_id: str, block_size: int, kv_bytes_per_token: int,
                 transport: KVTransport, num_layers: int = 1) -> None:
        self.engine_id = engine_id
        self.num_layers = max(1, num_layers)
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self.transport = transport
        self.transfers: list[TransferRecord] = []
        self.layer_timings: list[LayerRecord] = []

    def on_new_request(self, request: Request) -> None:  # noqa: B027 (optional hook, as in vLLM)
        """A request entered the scheduler."""

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """(tokens loadable beyond the local hits, whether they load asynchronously)."""

    @abstractmethod
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Blocks were allocated; remember what to load."""

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        """Per-step work for the worker; resets per-step state."""
        return None

    def start_step(self, meta: Any, now: float) -> float:
        """Worker side of one step starting at `now`: start transfers; returns the seconds of
        synchronous KV work the step must wait for (loads before, saves after the forward)."""
        return 0.0

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """(delay freeing the blocks?, kv_transfer_params for the response)."""
        return False, None

    def get_finished(self, now: float) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) request ids as of `now`."""
        return _NOTHING

    def next_event_time(self) -> float | None:
        """Earliest time a pending transfer completes (None: nothing pending)."""
        return None

    def has_pending_push_work(self) -> bool:
        """Work left with nothing scheduled (vLLM's has_pending_push_work: offload stores)."""
        return False

    def take_transfers(self) -> list[TransferRecord]:
        out, self.transfers = self.transfers, []
        return out

    def take_layer_timings(self) -> list[LayerRecord]:
        out, self.layer_timings = self.layer_timings, []
        return out

    def _bytes(self, num_tokens: int) -> int:
        return num_tokens * self.kv_bytes_per_token


def align_to_block_size(num_tokens: int, block_size: int) -> int:
    """example_connector.py align_to_block_size: (n - 1) // bs * bs."""
    return (num_tokens - 1) // block_size * block_size


def prompt_key(token_ids: list[int]) -> str:
    """Storage key of a token prefix (vLLM hashes the int64 token bytes into a folder name)."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()


class ExampleConnector(SimKVConnector):
    """vLLM's ExampleConnector: synchronous save/load of whole blocks through shared storage."""

    name = "example"
    saves_per_layer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._requests_need_load: dict[str, Request] = {}

    def _found_match_for_prompt(self, prompt_token_ids: list[int]) -> bool:
        # The lookup key uses prompt-minus-one (example_connector.py _found_match_for_prompt).
        n = align_to_block_size(len(prompt_token_ids) - 1, self.block_size)
        return self.transport.contains(prompt_key(prompt_token_ids[:n]))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._found_match_for_prompt(request.prompt_token_ids):
            return 0, False
        num_tokens_to_check = align_to_block_size(request.num_prompt_tokens - 1, self.block_size)
        # vLLM returns this unclamped; a local hit longer than the stored prefix would make it
        # negative there (an assert fails later), the simulator clamps to 0.
        return max(0, num_tokens_to_check - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._requests_need_load[request.request_id] = request

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        """Loads for requests that hit; saves for new requests whose prompt is not stored yet.

        The save covers align(len(prompt)) tokens (ReqMeta.make_meta), the whole prompt's
        blocks, at the request's first scheduled step, as vLLM's worker does.
        """
        loads: list[tuple[str, int]] = []
        saves: list[tuple[str, int, str]] = []
        for new_req in scheduler_output.scheduled_new_reqs:
            tokens = new_req.prompt_token_ids
            valid = align_to_block_size(len(tokens), self.block_size)
            if new_req.req_id in self._requests_need_load:
                loads.append((new_req.req_id, valid))
            elif not self._found_match_for_prompt(tokens):
                saves.append((new_req.req_id, valid, prompt_key(tokens[:valid])))
        for req_id in scheduler_output.resumed_req_ids:
            request = self._requests_need_load.get(req_id)
            if request is not None:
                loads.append((req_id, align_to_block_size(request.num_prompt_tokens, self.block_size)))
        self._requests_need_load.clear()
        return loads, saves

    def file_time(self, num_tokens: int, link: LinkSpec) -> float:
        """Seconds to write or read one request's files: one per layer, each latency + bytes / bw."""
        per_layer = num_tokens * self.kv_bytes_per_token / self.num_layers
        return self.num_layers * transfer_time(per_layer, link)

    def start_step(self, meta: Any, now: float) -> float:
        """Loads (start_load_kv: every layer of every loading request, before the forward),
        then saves (save_kv_layer after each layer's forward, one file per stored request).

        vLLM's saves interleave with the layers' compute; each is synchronous (GPU->host copy,
        then the file write), so the step lasts forward + all saves. Records: a load spans its
        own reads; a save spans the forward's window from its first to its last layer file.
        Per layer (LayerTiming): layer i's save is the i-th share of that window; its
        wait_for_layer_load returns at once (start_load_kv has read every layer already).
        """
        if not meta:
            return 0.0
        loads, saves = meta
        if not loads and not saves:
            return 0.0
        t = now
        link_in = self.transport.link(STORAGE, self.engine_id)
        for req_id, n in loads:
            nbytes = self._bytes(n)
            end = t + self.file_time(n, link_in)
            self.transfers.append(TransferRecord(req_id, "recv", n, nbytes, t, end, self.name))
            t = end
        if loads:
            ids, nbytes = sorted(r for r, _ in loads), self._bytes(sum(n for _, n in loads)) // self.num_layers
            self.layer_timings.extend(LayerRecord("load", i, t, t, nbytes, ids) for i in range(self.num_layers))
        link_out = self.transport.link(self.engine_id, STORAGE)
        save_total = sum(self.file_time(n, link_out) for _, n, _ in saves)
        if saves:
            per, ids = save_total / self.num_layers, sorted(r for r, _, _ in saves)
            nbytes = self._bytes(sum(n for _, n, _ in saves)) // self.num_layers
            self.layer_timings.extend(LayerRecord("save", i, t + i * per, t + (i + 1) * per, nbytes, ids)
                                      for i in range(self.num_layers))
        for req_id, n, key in saves:
            self.transfers.append(TransferRecord(req_id, "send", n, self._bytes(n), t,
                                                 t + save_total, self.name))
            self.transport.store(key, n)
        return t + save_total - now


class NixlConnector(SimKVConnector):
    """vLLM's NixlConnector (pull mode): decode reads prefill's blocks asynchronously.

    The lease (vLLM 0.26, kv_connector/v1/nixl/): prefill keeps a finished request's blocks
    until decode has read them or its lease runs out. `request_finished` (pull_scheduler.py)
    sets the expiry to now + `kv_lease_duration` (kv_connector_extra_config, default 30 s,
    base_scheduler.py __init__). A decode engine heartbeats every request it tracks from
    `on_new_request` (base_scheduler.py) until its read lands (`update_connector_output`) or
    it finishes: `build_connector_meta` packages them at most every lease // 6 s, the worker
    sends "HB:<ids>" (base_worker.py `_send_heartbeats`), and prefill's `_handle_heartbeat`
    sets expiry = max(expiry, now + lease * 2 // 3). Prefill's `get_finished`
    (base_worker.py) handles notifications (reads, heartbeats) first, then frees expired
    requests in insertion order, stopping at the first one not expired (vLLM's early exit),
    each counted in vllm:nixl_num_kv_expired_reqs (`xfer_stats.record_kv_expired_req`).
    vLLM's engine core keeps stepping while such requests exist (scheduler.py
    `has_finished_requests`); the simulator wakes its engine at the expiry instead.

    Args (beyond SimKVConnector's):
        side_channel_host / side_channel_port: what prefill writes into kv_transfer_params.
        tp_size: this engine's TP size (kv_transfer_params["tp_size"]).
        kv_lease_duration: seconds (kv_connector_extra_config["kv_lease_duration"]).
        lease_clock: what leases and heartbeat intervals are measured on; None: the step
            times the engine passes (simulated time, shared by in-process engines). Engines in
            separate processes pass their paced clock, or the wall clock when they run fast
            (their simulated clocks are not each other's).
    """

    name = "nixl"

    def __init__(self, *args: Any, side_channel_host: str = "localhost", side_channel_port: int = 5600,
                 tp_size: int = 1, kv_lease_duration: float = 30,
                 lease_clock: Callable[[], float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.side_channel_host = side_channel_host
        self.side_channel_port = side_channel_port
        self.tp_size = tp_size
        self._reqs_need_recv: dict[str, tuple[Request, list[int]]] = {}
        self._recving: list[tuple[float, str, str, str]] = []  # (end, req_id, remote engine, remote req)
        self._inbound_free_at = 0.0  # reads into this engine share its inbound link, in order
        if not (isinstance(kv_lease_duration, (int, float)) and not isinstance(kv_lease_duration, bool)
                and kv_lease_duration > 0):
            raise ValueError(f"kv_lease_duration={kv_lease_duration!r} must be a positive number of "
                             f"seconds (kv_connector_extra_config)")
        self.kv_lease_duration = kv_lease_duration
        self.heartbeat_interval = kv_lease_duration // 6  # base_scheduler.py: lease // 6
        self.lease_extension = kv_lease_duration * 2 // 3  # base_worker.py: lease * 2 // 3
        self.lease_clock = lease_clock
        self._now = 0.0  # lease clock at the last start_step / get_finished
        # prefill: request id -> lease expiry, in insertion order (base_worker._reqs_to_send)
        self._reqs_to_send: dict[str, float] = {}
        self.num_expired = 0  # vllm:nixl_num_kv_expired_reqs
        # decode: remote engine -> remote request ids to heartbeat; local id -> (engine, remote id)
        self._heartbeat_by_engine: dict[str, set[str]] = {}
        self._heartbeat_req_engine: dict[str, tuple[str, str]] = {}
        self._last_heartbeat_time = float("-inf")

    def _lease_now(self, now: float) -> float:
        return self.lease_clock() if self.lease_clock is not None else now

    def on_new_request(self, request: Request) -> None:
        """base_scheduler.py on_new_request: a decode request with every remote field is
        heartbeated to its prefill engine until its read lands."""
        params = request.kv_transfer_params
        if params is None or not params.get("do_remote_prefill"):
            return
        engine, remote_id = params.get("remote_engine_id"), params.get("remote_request_id")
        if (engine is None or remote_id is None or params.get("remote_host") is None
                or params.get("remote_port") is None or params.get("tp_size") is None):
            return
        self._heartbeat_by_engine.setdefault(str(engine), set()).add(str(remote_id))
        self._heartbeat_req_engine[request.request_id] = (str(engine), str(remote_id))

    def _stop_heartbeat(self, req_id: str) -> None:
        """base_scheduler.py _stop_heartbeat."""
        key = self._heartbeat_req_engine.pop(req_id, None)
        if key is not None:
            ids = self._heartbeat_by_engine.get(key[0])
            if ids is not None:
                ids.discard(key[1])
                if not ids:
                    del self._heartbeat_by_engine[key[0]]

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params
        if params is not None and params.get("do_remote_prefill"):
            # pull_scheduler.py: remote prefill -> pull every prompt token not cached locally.
            count = request.num_prompt_tokens - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_decode"):
            return  # a prefill request: nothing to load (the host-buffer save path is not modelled)
        if params.get("do_remote_prefill"):
            if params.get("remote_block_ids") and all(
                    p in params for p in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")):
                # Pull into the unhashed local blocks; an empty list (full local hit) still
                # notifies prefill so it can free its blocks.
                local = blocks.get_unhashed_block_ids() if num_external_tokens > 0 else []
                self._reqs_need_recv[request.request_id] = (request, local)
            # Only trigger 1 KV transfer per request.
            params["do_remote_prefill"] = False
            params["_remote_blocks_processed"] = True

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        meta = list(self._reqs_need_recv.values())
        self._reqs_need_recv.clear()
        return meta

    def start_step(self, meta: Any, now: float) -> float:
        """Start the reads (start_load_kv issues them; they overlap the forward pass) and send
        the heartbeats due (build_connector_meta's throttle, the worker's _send_heartbeats)."""
        self._now = t = self._lease_now(now)
        if self._heartbeat_by_engine and t - self._last_heartbeat_time >= self.heartbeat_interval:
            self._last_heartbeat_time = t
            for engine, ids in self._heartbeat_by_engine.items():
                self.transport.heartbeat(engine, sorted(ids), now)
        for request, local_block_ids in meta or ():
            params = request.kv_transfer_params or {}
            remote_engine = str(params.get("remote_engine_id"))
            num_blocks = len(local_block_ids)
            num_bytes = num_blocks * self.block_size * self.kv_bytes_per_token
            link = achieved_link("nixl", self.transport.link(remote_engine, self.engine_id))
            start = max(now, self._inbound_free_at)
            end = start + transfer_time(num_bytes, link) if num_blocks else start + link.latency
            if num_blocks:
                self._inbound_free_at = end
            request.kv_recv_start, request.kv_recv_end = start, end
            self._recving.append((end, request.request_id, remote_engine, str(params.get("remote_request_id"))))
            num_tokens = request.num_external_tokens if num_blocks else 0
            self.transfers.append(TransferRecord(request.request_id, "recv", num_tokens, num_bytes,
                                                 start, end, self.name))
        return 0.0

    def get_finished(self, now: float) -> tuple[set[str], set[str]]:
        """base_worker.py get_finished: notifications (heartbeats, reads), landed reads, then
        expired leases."""
        t = self._lease_now(now)
        self._now = t
        to_send = self._reqs_to_send
        beats = self.transport.take_heartbeats(self.engine_id, now)
        if not self._recving and not to_send:
            return _NOTHING
        sending: set[str] = set()
        if to_send:
            for at, ids in beats:  # _handle_heartbeat
                new_expiry = (t if at is None or self.lease_clock is not None else at) \
                    + self.lease_extension
                for rid in ids:
                    old = to_send.get(rid)
                    if old is not None and new_expiry > old:
                        to_send[rid] = new_expiry
            for rid in self.transport.take_read_done(self.engine_id, now):
                if to_send.pop(rid, None) is not None:
                    sending.add(rid)
        recving: set[str] = set()
        if self._recving:
            still = []
            for item in self._recving:
                if item[0] <= now:
                    recving.add(item[1])
                    self._stop_heartbeat(item[1])  # update_connector_output(finished_recving)
                    # The decode worker sends the NIXL notif once it sees the read complete.
                    self.transport.notify_read_done(item[2], item[3], now)
                else:
                    still.append(item)
            self._recving = still
        while to_send:  # expired leases: oldest first, stop at the first still held
            rid, expires = next(iter(to_send.items()))
            if t < expires:
                break
            del to_send[rid]
            self.num_expired += 1
            sending.add(rid)
            logger.warning("Releasing expired KV blocks for request %s which were retrieved by "
                           "0 remote worker(s) before lease expired.", rid)
        return sending, recving

    def next_lease_expiry(self) -> float | None:
        """When the first held request's lease runs out, on the lease clock (None: none held)."""
        return next(iter(self._reqs_to_send.values())) if self._reqs_to_send else None

    def next_event_time(self) -> float | None:
        times = [item[0] for item in self._recving]
        if self._reqs_to_send and self.lease_clock is None:  # in simulated time: wake then
            times.append(next(iter(self._reqs_to_send.values())))
        return min(times) if times else None

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """pull_scheduler.py request_finished: prefill keeps its blocks until decode read them."""
        params = request.kv_transfer_params
        if not params:
            return False, None
        is_p_node = bool(params.get("do_remote_decode"))
        self._stop_heartbeat(request.request_id)  # aborted before its read landed
        if params.get("do_remote_prefill"):
            # Aborted before it was scheduled: tell prefill to free (an empty read).
            self._reqs_need_recv[request.request_id] = (request, [])
            params["do_remote_prefill"] = False
            return False, None
        if not is_p_node:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None
        delay_free_blocks = len(block_ids) > 0
        if delay_free_blocks:  # held for the lease
            self._reqs_to_send[request.request_id] = self._now + self.kv_lease_duration
        return delay_free_blocks, dict(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_block_ids=[list(block_ids)],
            remote_engine_id=self.engine_id,
            remote_request_id=request.request_id,
            remote_host=self.side_channel_host,
            remote_port=self.side_channel_port,
            tp_size=self.tp_size,
            remote_num_tokens=request.num_computed_tokens if delay_free_blocks else 0,
            remote_blocks_expiry_time=None,
        )


class ObserverConnector(SimKVConnector):
    """labkit's observer connector (labkit/pd/observer.py) alone: kv_both, moves no KV.

    It changes nothing the scheduler computes except that a KV connector is present, which
    (with async scheduling) turns on vLLM's deferred block frees: an engine recorded with the
    observer is replayed with this connector.
    """

    name = "observer"

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        return None


NIXL_EXTRA_KEYS = ("kv_lease_duration",)  # what the simulated NixlConnector reads


def nixl_extra_config(extra: dict[str, Any] | None) -> dict[str, Any]:
    """NixlConnector keywords from vLLM's kv_connector_extra_config (other keys are vLLM's
    and ignored here, as `get_from_extra_config` reads only the keys it asks for).

    Raises:
        ValueError: `extra` is not a dict, or kv_lease_duration is not a positive number.
    """
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError(f"kv_connector_extra_config must be a JSON object, got {type(extra).__name__}")
    out = {k: extra[k] for k in NIXL_EXTRA_KEYS if k in extra}
    lease = out.get("kv_lease_duration")
    if lease is not None and not (isinstance(lease, (int, float)) and not isinstance(lease, bool)
                                  and 0 < lease < float("inf")):
        raise ValueError(f"kv_connector_extra_config kv_lease_duration={lease!r} must be a "
                         f"positive number of seconds (vLLM's default: 30)")
    return out


CONNECTORS: dict[str, type[SimKVConnector]] = {"example": ExampleConnector, "nixl": NixlConnector,
                                               "observer": ObserverConnector}


def make_connector(name: str, *, block_size: int, kv_bytes_per_token: int, transport: KVTransport,
                   engine_id: str | None = None, **kwargs: Any) -> SimKVConnector:
    """Build a connector by name ("example" | "nixl"; vLLM's class names are accepted too)."""
    key = {"exampleconnector": "example", "nixlconnector": "nixl",
           "labkitobserverconnector": "observer"}.get(name.lower(), name.lower())
    if key not in CONNECTORS:
        raise ValueError(f"unknown simulated connector {name!r}; choose from {sorted(CONNECTORS)}")
    return CONNECTORS[key](engine_id or str(uuid.uuid4()), block_size, kv_bytes_per_token,
                           transport, **kwargs)
