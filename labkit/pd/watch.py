"""What the PD proxy knows of its engines when it routes: their load and their prefix caches.

    engine /metrics --every load_interval s (not under round-robin)--> EngineLoad per engine
    proxy's own sends --in flight per engine, until answered-----------^ (covers the scrape gap)
    prefill KV events (ZMQ SUB, one per engine) --on the event loop--> Router.index (PrefixIndex)
    prompt (token ids, or text via the engine's POST /tokenize) -------> Router.route_prefill

A burst of requests arrives faster than /metrics is scraped, so an engine's queue (running +
waiting) is at least what the proxy itself has sent there and not yet heard back from, and a
scrape taken before the proxy's last answer from that engine no longer counts its requests
(they may be done): least-loaded does not send a burst to the engine that looked idle a
moment ago, nor avoid one whose requests just finished.

KV events: vLLM's publisher binds wildcard and ipc:// endpoints (an xPyD Lab gives each engine
an ipc:// one), so the proxy's subscribers sit beside the lab's telemetry on the same PUB; a
concrete TCP endpoint is connected to by the engine, and then the proxy binds it (its one
reader). A sequence number that goes backwards means the engine
restarted: its part of the index is cleared. Batches missed (a gap) leave the index short of
some blocks until they are evicted and stored again; `describe()` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

import httpx

from labkit.pd.router import EngineLoad, Router
from labkit.pd.upstream import CHAT, COMPLETIONS, Engine

logger = logging.getLogger(__name__)
LOAD_INTERVAL_S = 0.5


def _token_ids(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    return None


def _unknown_model(resp: httpx.Response) -> bool:
    """A 404 that is vLLM's "The model `x` does not exist." (the route is there)."""
    try:
        return resp.json()["error"]["param"] == "model"
    except (ValueError, KeyError, TypeError):
        return False


class EngineWatch:
    """Loads, in-flight counts and the prefix index of the proxy's engines (one event loop).

    Args:
        router: the proxy's Router (its index is fed here).
        engines: every prefill and decode engine, by label.
        kv_events: prefill engine label -> its KV-event endpoint (tcp://127.0.0.1:PORT).
        load_interval: seconds between /metrics scrapes while a policy reads loads.
    """

    def __init__(self, router: Router, engines: list[Engine], kv_events: dict[str, str],
                 load_interval: float = LOAD_INTERVAL_S) -> None:
        self.router = router
        self.engines = engines
        self.kv_events = dict(kv_events)
        self.load_interval = load_interval
        self.loads: dict[str, EngineLoad] = {}
        self.in_flight: dict[str, int] = {e.label: 0 for e in engines}
        self.routed: dict[str, int] = {e.label: 0 for e in engines}
        self.last_answer: dict[str, float] = {e.label: 0.0 for e in engines}  # time.time()
        self.kv_batches: dict[str, int] = dict.fromkeys(self.kv_events, 0)
        self.kv_resets: dict[str, int] = dict.fromkeys(self.kv_events, 0)
        self._kv_seq: dict[str, int] = {}
        self._scraped_at: dict[str, float] = {}
        self._subs: dict[str, Any] = {}
        self._task: asyncio.Task | None = None
        self._can_tokenize = True

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Subscribe to the KV events and start scraping loads (on the running loop)."""
        from labkit.telemetry.kv_events import publisher_binds
        from labkit.telemetry.subscriber import KVEventSubscriber

        loop = asyncio.get_running_loop()
        for name, endpoint in self.kv_events.items():
            # vLLM binds wildcard and ipc:// endpoints and connects to concrete TCP ones; the
            # reader takes the other side (a TCP endpoint then has this one reader).
            self._subs[name] = KVEventSubscriber(
                endpoint, bind=not publisher_binds(endpoint),
                callback=lambda m, n=name: loop.call_soon_threadsafe(self._on_kv, n, m))
        self._task = asyncio.ensure_future(self._watch_loads())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for sub in self._subs.values():
            await asyncio.to_thread(sub.close)
        self._subs.clear()

    def _on_kv(self, name: str, msg: Any) -> None:
        last = self._kv_seq.get(name)
        if last is not None and msg.seq <= last:  # a new engine process counts from 0
            self.router.index.clear(name)
            self.kv_resets[name] += 1
        self._kv_seq[name] = msg.seq
        self.router.index.apply_batch(name, msg.batch)
        self.kv_batches[name] += 1

    # ------------------------------------------------------------------ loads
    async def _watch_loads(self) -> None:
        while True:
            if self.router.policy != "round-robin":
                await asyncio.gather(*(self._scrape(e) for e in self.engines))
            await asyncio.sleep(self.load_interval)

    async def _scrape(self, engine: Engine) -> None:
        from labkit.telemetry.metrics import MetricsSnapshot

        try:
            resp = await engine.client.get("/metrics", timeout=2.0)
        except httpx.HTTPError:
            return
        if resp.status_code == 200:
            asked = time.time()  # the engine's counts are as of (about) when it answered
            snap = await asyncio.to_thread(MetricsSnapshot.parse, resp.text)
            self.loads[engine.label] = EngineLoad.from_metrics(engine.label, snap)
            self._scraped_at[engine.label] = asked

    def load(self, label: str) -> EngineLoad:
        """The engine's last scraped load (KV usage, blocks), its queue at least what the proxy
        has in flight there; only the in-flight count where the scrape is older than the
        proxy's last answer from the engine."""
        scraped = self.loads.get(label) or EngineLoad(label)
        sent = self.in_flight.get(label, 0)
        if self._scraped_at.get(label, 0.0) <= self.last_answer.get(label, 0.0):
            return replace(scraped, num_running=sent, num_waiting=0)
        return replace(scraped, num_waiting=max(scraped.num_waiting, sent - scraped.num_running))

    def loads_of(self, engines: list[Engine]) -> dict[str, EngineLoad]:
        return {e.label: self.load(e.label) for e in engines}

    def sent(self, engine: Engine) -> None:
        self.in_flight[engine.label] += 1
        self.routed[engine.label] += 1

    def answered(self, engine: Engine) -> None:
        self.in_flight[engine.label] = max(0, self.in_flight[engine.label] - 1)
        self.last_answer[engine.label] = time.time()

    # ------------------------------------------------------------------ prompts
    async def prompt_tokens(self, body: dict, route: str, engine: Engine) -> list[int] | None:
        """The prompt's token ids: given in the body, or the engine's `POST /tokenize` (vLLM's
        tokenizer and chat template); None where neither is to be had."""
        prompt = body.get("prompt")
        if route == COMPLETIONS:
            ids = _token_ids(prompt)
            if ids is None and isinstance(prompt, list) and len(prompt) == 1:
                ids = _token_ids(prompt[0])
            if ids is not None:
                return ids
        if not self._can_tokenize:
            return None
        req: dict[str, Any] = {"model": body.get("model")}
        if route == CHAT:
            req.update(messages=body.get("messages"),
                       add_generation_prompt=body.get("add_generation_prompt", True))
        elif isinstance(prompt, str):
            req["prompt"] = prompt
        else:
            return None
        try:
            resp = await engine.client.post("/tokenize", json=req, timeout=5.0)
        except httpx.HTTPError:
            return None
        if resp.status_code == 404 and not _unknown_model(resp):  # no /tokenize: stop asking
            self._can_tokenize = False
            logger.warning("%s has no /tokenize: kv-aware routing sees text prompts as "
                           "uncached (send token ids)", engine.name)
            return None
        try:
            return _token_ids(resp.json().get("tokens")) if resp.status_code == 200 else None
        except ValueError:
            return None

    # ------------------------------------------------------------------ report
    def describe(self) -> dict[str, Any]:
        """GET /router's body (without the policy)."""
        idx = self.router.index
        return {
            "routed": dict(self.routed),
            "in_flight": dict(self.in_flight),
            "cached_blocks": {n: idx.num_blocks(n) for n in self.router.prefill},
            "kv_events": {n: {"endpoint": ep,
                              "connected": bool(n in self._subs
                                                and self._subs[n].connected.is_set()),
                              "batches": self.kv_batches[n],
                              "missed": getattr(self._subs.get(n), "num_missed", 0),
                              "resets": self.kv_resets[n]}
                          for n, ep in self.kv_events.items()},
            "loads": {n: {"running": ld.num_running, "waiting": ld.num_waiting,
                          "kv_cache_usage": ld.kv_cache_usage}
                      for n in self.in_flight for ld in (self.load(n),)},
        }

