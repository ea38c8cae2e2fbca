"""EngineRunner: one SimEngine stepped in (paced) simulated time, and what it tells the world.

The runner owns the engine, its clock, tokenizer, KV transport and telemetry:

- the engine loop (an asyncio task on the server's event loop): step, wait until the wall
  clock reaches the step's end (paced; `fast`: no wait), hand each request's new tokens to
  its queue; idle, it waits for a request, a NIXL read notification, or the next KV load;
- /metrics (metrics.SimMetrics), vLLM KV events (telemetry.kv_events.KVEventPublisher, one
  batch per step that has events, as vLLM's engine core publishes) and labkit observer
  events (telemetry.observer_schema: StepScheduled, RequestAllocated, RequestFinished,
  KVTransfer, PoolSnapshot at <= 4 Hz): what labkit.pd.observer publishes from inside vLLM.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.engines.sim.clock import SimClock
from labkit.engines.sim.connector import LayerRecord, TransferRecord
from labkit.engines.sim.engine import RequestOutput, SimEngine, StepResult
from labkit.engines.sim.metrics import SimMetrics, cache_config_labels
from labkit.engines.sim.transport import NetworkTransport, link_named
from labkit.telemetry import kv_events as kve
from labkit.telemetry import observer_schema as obs

logger = logging.getLogger("labkit.sim.server")
SNAPSHOT_PERIOD_S = 0.25  # PoolSnapshot <= 4 Hz (docs/architecture.md)


@dataclass
class SimServerArgs:
    """What `python -m labkit.engines.sim` accepts (vLLM's `serve` flags, plus the sim's)."""

    model: str = "lab-1b"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    role: str = "both"  # prefill | decode | both
    connector: str | None = None  # None | "example" | "nixl"
    kv_storage: str | None = None  # ExampleConnector's folder, inside the run directory
    kv_link: str | None = None  # hardware.LINKS key between engines (default: nvlink)
    kv_storage_link: str = "same-gpu"  # hardware.LINKS key to ExampleConnector's storage
    gpu_type: str = "h100"
    tp: int = 1
    pp: int = 1
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.92
    num_gpu_blocks_override: int | None = None  # vLLM's flag (shows in cache_config_info)
    num_gpu_blocks: int | None = None  # the planner's pool size (labkit.plan EnginePlan)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # vLLM's --[no-]enable-chunked-prefill
    kv_events_endpoint: str | None = None
    kv_events_topic: str = "kv"
    observer_endpoint: str | None = None
    observer_name: str | None = None
    engine_id: str | None = None
    kv_load_timeout: float = 5.0  # nixl decode: seconds to reach the KV's prefill engine
    kv_offloading_size: float | None = None  # GiB of host memory for the CPU tier (vLLM's flag)
    kv_transfer_config: dict[str, Any] | None = None  # vLLM's --kv-transfer-config (extra config)
    speed: float = 1.0
    fast: bool = False
    seed: int = 0


def load_tokenizer(model: str, vocab_size: int) -> tuple[Any, str | None, str]:
    """(tokenizers.Tokenizer, chat template or None, bos token) for a model dir or a preset."""
    from tokenizers import Tokenizer

    path = Path(model).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return (Tokenizer.from_file(str(path / "tokenizer.json")), cfg.get("chat_template"),
                str(cfg.get("bos_token") or "<s>"))
    from labkit import models

    # A preset: the same tokenizer and template labkit.models.write_model_dir writes.
    return models.build_tokenizer(vocab_size), getattr(models, "_CHAT_TEMPLATE", None), "<s>"


class EngineRunner:
    """The engine, its loop and its telemetry, shared by the HTTP handlers."""

    def __init__(self, args: SimServerArgs) -> None:
        from labkit.models import get_model

        self.args = args
        self.served_model_name = args.served_model_name or args.model
        self.shape = get_model(args.model)
        self.tokenizer, self.chat_template, self.bos_token = load_tokenizer(
            args.model, self.shape.vocab_size)
        self.clock = SimClock(paced=not args.fast, speed=args.speed)
        self.epoch0 = time.time()
        self.engine_id = args.engine_id or str(uuid.uuid4())
        self.transport: NetworkTransport | None = None
        self.nixl: Any = None  # the NixlConnector, if any (its leases)
        engine_kw: dict[str, Any] = {}
        if args.connector:
            if args.connector == "example" and not args.kv_storage:
                raise ValueError("--connector example needs --kv-storage DIR (inside the run dir)")
            link = link_named(args.kv_link or "nvlink")
            self.transport = NetworkTransport(
                link, link_named(args.kv_storage_link), storage_dir=args.kv_storage,
                engine_id=self.engine_id, timeout=args.kv_load_timeout)
            engine_kw.update(connector=args.connector, transport=self.transport)
        self.engine = SimEngine(
            self.shape, args.gpu_type, tp=args.tp, pp=args.pp, kv_cache_dtype=args.kv_cache_dtype,
            block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            num_gpu_blocks=args.num_gpu_blocks_override or args.num_gpu_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill, engine_id=self.engine_id,
            clock=self.clock, seed=args.seed, enable_kv_cache_events=bool(args.kv_events_endpoint),
            record_observer_events=bool(args.observer_endpoint), eos_token_id=2,
            side_channel_port=args.port, kv_offloading_size=args.kv_offloading_size,
            kv_connector_extra_config=(args.kv_transfer_config or {}).get("kv_connector_extra_config"),
            **engine_kw)
        conn = self.engine.connector
        for c in getattr(conn, "connectors", None) or [conn]:
            if c is not None and hasattr(c, "side_channel_host"):
                c.side_channel_host = args.host  # remote_host in prefill's kv_transfer_params
                # Leases between processes: the paced clock (both engines follow the wall at
                # the same speed), or the wall clock when fast (each fast clock is its own).
                c.lease_clock = time.monotonic if args.fast else self.clock.now
                self.nixl = c
        if self.transport is not None:
            self.transport.kv_bytes_per_token = self.engine.cost_model.kv_bytes_per_token
        labels = cache_config_labels(self.engine, args.kv_cache_dtype,
                                     args.gpu_memory_utilization, args.num_gpu_blocks_override)
        self.metrics = SimMetrics(self.served_model_name, max_model_len=self.engine.max_model_len,
                                  cache_info=labels, gpu_type=args.gpu_type,
                                  connector=args.connector, speed=f"{args.speed:g}",
                                  offload=self.engine.offload is not None)
        self.kv_publisher: kve.KVEventPublisher | None = None
        self.observer: obs.ObserverPublisher | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._pending_transfers: list[TransferRecord] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._pool_dirty = True
        self._last_snapshot = 0.0
        self._last_num_free = -1
        self._failed_seen = 0
        self._expired_seen = 0

    # ------------------------------------------------------------------ facts
    def epoch(self, t: float) -> float:
        """Wall-clock epoch of simulated time `t` (fast mode: start + simulated seconds)."""
        return self.epoch0 + (t / self.clock.speed if self.clock.paced else t)

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"kind": "sim", "engine_id": self.engine_id, "role": self.args.role,
                "connector": self.args.connector, "gpu_type": self.args.gpu_type,
                "num_gpu_blocks": e.num_gpu_blocks, "block_size": e.block_size,
                "kv_bytes_per_token": e.cost_model.kv_bytes_per_token,
                "max_model_len": e.max_model_len,
                "max_num_batched_tokens": e.max_num_batched_tokens, "sim_time": self.clock.now(),
                "paced": self.clock.paced, "speed": self.clock.speed, "step": e.step_count,
                "num_free_blocks": e.kv_cache_manager.block_pool.get_num_free_blocks(),
                "args": asdict(self.args)}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        if self.transport is not None:
            self.transport.on_read_delivered = lambda _rid: self.wake()
        if self.args.kv_events_endpoint:
            self.kv_publisher = kve.KVEventPublisher(self.args.kv_events_endpoint,
                                                     self.args.kv_events_topic)
        if self.args.observer_endpoint:
            self.observer = obs.ObserverPublisher(
                self.args.observer_endpoint, engine_id=self.args.observer_name or self.args.role,
                role=self.args.role, kind="sim", bind=False)
        self._task = asyncio.create_task(self._loop(), name="sim-engine-loop")

    async def stop(self) -> None:
        self._stopping = True
        self.wake()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.transport is not None:
            await self.transport.aclose()
        if self.kv_publisher is not None:
            self.kv_publisher.close()
        if self.observer is not None:
            self.observer.close()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ requests
    async def generate(self, req_id: str, prompt_token_ids: list[int], max_tokens: int, *,
                       ignore_eos: bool = False, kv_transfer_params: dict[str, Any] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes; aborts it if abandoned.

        Raises:
            ValueError: the engine refused the request (too long, empty, ...).
        """
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[req_id] = queue
        if self.transport is not None:
            self.transport.register_remote(kv_transfer_params)
        finished = False
        try:
            self.engine.add_request(req_id, prompt_token_ids, max_tokens, ignore_eos=ignore_eos,
                                    kv_transfer_params=kv_transfer_params)
            self.wake()
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(req_id, None)
            if not finished and self.engine.get_request(req_id) is not None:
                self.engine.abort(req_id)
                self.wake()

    def deliver_read(self, req_id: str, block_ids: list[int]) -> dict[str, Any]:
        """NIXL read notification from a decode engine: free `req_id`'s held blocks.

        Raises:
            KeyError: no finished request of that id holds blocks here.
            ValueError: `block_ids` are not the blocks the request holds.
        """
        request = self.engine.get_request(req_id)
        if self.transport is None or request is None or not request.is_finished():
            lease = f" (its lease may have expired: kv_lease_duration {self.nixl.kv_lease_duration:g} s)" \
                if self.nixl is not None else ""
            raise KeyError(f"no request {req_id!r} holds blocks for a KV transfer here{lease}")
        held = self.engine.kv_cache_manager.get_block_ids(req_id)[0]
        if block_ids and not set(block_ids) <= set(held):
            raise ValueError(f"blocks {sorted(set(block_ids) - set(held))[:8]} are not held by {req_id}")
        blocks = block_ids or held
        num_bytes = len(blocks) * self.engine.block_size * self.engine.cost_model.kv_bytes_per_token
        now = self.clock.now()
        start = request.finished_time if request.finished_time is not None else now
        self._emit([obs.KVTransfer(ts=self.epoch(now), req_id=req_id, direction="send",
                                   num_tokens=request.num_computed_tokens, num_bytes=num_bytes,
                                   start=self.epoch(start), end=self.epoch(now),
                                   connector=self.args.connector or "")])
        self.transport.deliver_read(req_id)
        return {"remote_request_id": req_id, "engine_id": self.engine_id,
                "num_blocks": len(blocks), "num_bytes": num_bytes}

    def deliver_heartbeat(self, req_ids: list[str]) -> dict[str, Any]:
        """NIXL heartbeat from a decode engine ("HB:<ids>"): extend these requests' leases."""
        if self.transport is None or self.nixl is None:
            raise KeyError("this engine holds no NIXL blocks (no nixl connector)")
        self.transport.deliver_heartbeat(req_ids)
        return {"engine_id": self.engine_id, "num_req_ids": len(req_ids)}

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        eng, clock = self.engine, self.clock
        assert self._wake is not None
        self._snapshot(force=True)
        busy = False
        while not self._stopping:
            self._wake.clear()
            pending_reads = ((self.transport is not None and self.transport.has_pending_reads())
                             or self._lease_due())
            # vLLM's engine core steps while scheduler.has_requests(): unfinished requests or
            # finished ones not yet reported (an abort); held NIXL blocks alone wait for a read.
            if eng.has_unfinished() or eng.scheduler.finished_req_ids or pending_reads:
                # Busy steps run back to back in simulated time (no drift from sleep
                # overshoot); after idling, or far behind the wall, start at "now".
                now = clock.now()
                start = eng.busy_until if busy and now - eng.busy_until < 0.25 else now
                res = eng.step(now=max(start, eng.busy_until))
                if clock.paced:
                    delay = (res.end - clock.now()) / clock.speed
                    if delay > 0:
                        await asyncio.sleep(delay)
                clock.advance_to(res.end)
                self._after_step(res)
                busy = bool(res.num_scheduled_tokens or res.outputs)
                if not busy:
                    await self._idle(eng.next_event_time())
                else:
                    await asyncio.sleep(0)
            else:
                busy = False
                await self._idle(None)
            self._flush_transfers()
            self._snapshot()
            if self.observer is not None:
                self.observer.greet()  # a lab that just joined hears this engine

    def _lease_due(self) -> bool:
        """A NIXL lease on held prefill blocks has run out: step to free them (vLLM's engine
        core keeps stepping while finished requests hold blocks; this one wakes at least every
        SNAPSHOT_PERIOD_S to look)."""
        nixl = self.nixl
        if nixl is None:
            return False
        expiry = nixl.next_lease_expiry()
        return expiry is not None and nixl.lease_clock() >= expiry

    async def _idle(self, next_event: float | None) -> None:
        """Wait for a wake-up, the next KV load landing, or a due pool snapshot."""
        assert self._wake is not None
        timeout = SNAPSHOT_PERIOD_S
        if next_event is not None:
            if not self.clock.paced:
                self.clock.advance_to(next_event)  # fast: jump to the landing
                return
            timeout = min(timeout, max(0.0, (next_event - self.clock.now()) / self.clock.speed))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _after_step(self, res: StepResult) -> None:
        eng = self.engine
        self.metrics.update(eng)
        if eng.offload is not None:
            self.metrics.update_offload(eng.offload)
            self._emit(self._offload_events(res))
        self._pending_transfers.extend(eng.take_transfers())
        if self.kv_publisher is not None:
            events = [_kv_event(ev) for ev in eng.take_kv_events()]
            if events:
                self.kv_publisher.publish(kve.KVEventBatch(ts=self.epoch(res.end), events=events))
        layer_events = self._layer_events(res)
        if self.observer is not None:
            self._emit(self._observer_events(res) + layer_events)
        for out in res.outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        num_free = eng.kv_cache_manager.block_pool.get_num_free_blocks()
        if res.num_scheduled_tokens or res.outputs or num_free != self._last_num_free:
            self._pool_dirty = True  # frees after a NIXL read or an abort change no tokens
        self._last_num_free = num_free

    def _observer_events(self, res: StepResult) -> list[Any]:
        """What labkit.pd.observer emits for one scheduler step (build_connector_meta)."""
        so, t0, t1 = res.scheduler_output, self.epoch(res.start), self.epoch(res.end)
        allocs: list[Any] = []
        finished: list[Any] = []
        for kind, rid, block_ids, extra in self.engine.take_observer_events():
            if kind == "alloc":
                allocs.append(obs.RequestAllocated(ts=t0, req_id=rid, block_ids=list(block_ids),
                                                   num_external_tokens=int(extra)))
            else:
                finished.append(obs.RequestFinished(ts=t1, req_id=rid, block_ids=list(block_ids),
                                                    delay_free=bool(extra)))
        new_block_ids = {r.req_id: list(r.block_ids[0]) for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        for rid, nb in zip(cached.req_ids, cached.new_block_ids, strict=False):
            if nb is not None and nb[0]:
                new_block_ids[rid] = list(nb[0])
        events: list[Any] = allocs
        if so.total_num_scheduled_tokens or so.finished_req_ids or so.preempted_req_ids:
            events.append(obs.StepScheduled(
                step=res.step, ts=t0, token_budget=so.token_budget,
                num_scheduled_tokens=dict(so.num_scheduled_tokens), new_block_ids=new_block_ids,
                num_computed_tokens={r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs},
                preempted=sorted(so.preempted_req_ids), finished=sorted(so.finished_req_ids),
                num_free=so.num_free_blocks))
        return events + finished

    def _layer_events(self, res: StepResult) -> list[Any]:
        """LayerTiming as labkit.pd.observer reports it from the worker's per-layer hooks
        (on steps that compute prompt tokens or load KV): the connector's own per-layer work
        (ExampleConnector: one file per layer saved inside prefill's forward; its loads are
        done in start_load_kv, so wait_for_layer_load returns at once), else a save_kv_layer
        that returns at once (NixlConnector: decode reads every layer in one go later)."""
        conn = self.engine.connector
        if conn is None:
            return []
        parts = getattr(conn, "connectors", [conn])  # MultiConnector's children
        records = [r for c in parts for r in c.take_layer_timings()]
        if self.observer is None:
            return []
        so = res.scheduler_output
        before = {r.req_id: (r.num_computed_tokens, len(r.prompt_token_ids)) for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        for rid, done in zip(cached.req_ids, cached.num_computed_tokens, strict=False):
            if (req := self.engine.get_request(rid)) is not None:
                before[rid] = (done, req.num_prompt_tokens)
        prompt = {rid: k for rid, n in so.num_scheduled_tokens.items() if rid in before
                  and (k := min(n, before[rid][1] - before[rid][0])) > 0}
        if prompt and not any(c.saves_per_layer for c in parts):
            t = res.start + res.launch_s  # the forward: each layer's hook right after its compute
            per, nbytes = res.gpu_s / conn.num_layers, conn.kv_bytes_per_token * sum(prompt.values())
            records += [LayerRecord("save", i, t + (i + 1) * per, t + (i + 1) * per,
                                    nbytes // conn.num_layers, sorted(prompt)) for i in range(conn.num_layers)]
        return [obs.LayerTiming(ts=self.epoch(r.end), op=r.op, layer=f"model.layers.{r.layer}.self_attn.attn",
                                start=self.epoch(r.start), end=self.epoch(r.end), num_bytes=r.num_bytes,
                                req_ids=r.req_ids) for r in records]

    def _offload_events(self, res: StepResult) -> list[Any]:
        """The CPU tier's finished GPU<->CPU jobs (OffloadTransfer); the tier is dirty then."""
        done = self.engine.offload.take_host_transfers()  # type: ignore[union-attr]
        if done or res.num_scheduled_tokens:
            self._pool_dirty = True
        return [obs.OffloadTransfer(ts=self.epoch(t.end), req_id=t.req_id,
                                    transfer_type=t.transfer_type, num_blocks=t.num_blocks,
                                    num_bytes=t.num_bytes, start=self.epoch(t.start),
                                    end=self.epoch(t.end), gpu_block_ids=list(t.gpu_block_ids),
                                    cpu_block_ids=list(t.cpu_block_ids), step=t.step)
                for t in done]

    def _flush_transfers(self) -> None:
        """Transfers whose end the clock has passed: metrics and KVTransfer events."""
        if self.transport is not None:
            failed = self.transport.num_failed_notifications
            for _ in range(failed - self._failed_seen):
                self.metrics.failed_notification()
            self._failed_seen = failed
        if self.nixl is not None and self.nixl.num_expired != self._expired_seen:
            self.metrics.kv_expired(self.nixl.num_expired - self._expired_seen)
            self._expired_seen = self.nixl.num_expired
        if not self._pending_transfers:
            return
        now = self.clock.now()
        done = [r for r in self._pending_transfers if r.end <= now]
        if not done:
            return
        self._pending_transfers = [r for r in self._pending_transfers if r.end > now]
        layers = max(self.shape.layers_per_stage(self.args.pp))
        for r in done:
            self.metrics.record_transfer(r, layers)
        self._emit([obs.KVTransfer(ts=self.epoch(r.end), req_id=r.req_id, direction=r.direction,
                                   num_tokens=r.num_tokens, num_bytes=r.num_bytes,
                                   start=self.epoch(r.start), end=self.epoch(r.end),
                                   connector=r.connector) for r in done])

    def _snapshot(self, force: bool = False) -> None:
        if self.observer is None or not (force or self._pool_dirty):
            return
        now = time.monotonic()
        if not force and now - self._last_snapshot < SNAPSHOT_PERIOD_S:
            return
        pool = self.engine.kv_cache_manager.block_pool
        states = self.engine.block_states()
        events: list[Any] = [obs.PoolSnapshot(ts=self.epoch(self.clock.now()), num_blocks=len(states),
                                              num_free=pool.get_num_free_blocks(), block_state=states)]
        if self.engine.offload is not None:
            mgr = self.engine.offload.manager
            host = mgr.block_states()
            events.append(obs.HostTierSnapshot(
                ts=events[0].ts, num_blocks=len(host), num_free=mgr.get_num_free_blocks(),
                num_stored=len(mgr.evictable), block_state=host))
        self._emit(events)
        self._last_snapshot, self._pool_dirty = now, False

    def _emit(self, events: list[Any]) -> None:
        if self.observer is not None and events:
            self.observer.publish(events, ts=self.epoch(self.clock.now()))


def _kv_event(ev: Any) -> Any:
    """The simulator's event dataclass -> vLLM's msgspec struct (fields as real vLLM fills them)."""
    name = type(ev).__name__
    if name == "BlockStored":
        return kve.BlockStored(
            block_hashes=list(ev.block_hashes), parent_block_hash=ev.parent_block_hash,
            token_ids=list(ev.token_ids), block_size=ev.block_size, lora_id=ev.lora_id,
            medium=ev.medium, lora_name=ev.lora_name, extra_keys=[None] * len(ev.block_hashes),
            group_idx=0, kv_cache_spec_kind="full_attention")
    if name == "BlockRemoved":
        return kve.BlockRemoved(block_hashes=list(ev.block_hashes), medium=ev.medium, group_idx=0)
    return kve.AllBlocksCleared()


__all__ = ["EngineRunner", "SimServerArgs", "load_tokenizer"]
