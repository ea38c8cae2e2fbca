"""One name per request across the views: the proxy's request id joined with the engines' ids.

vLLM 0.26 makes each internal request id unique by adding a suffix: the proxy sends
`pd-3f2a…`, the OpenAI server answers `cmpl-pd-3f2a…` (the response's `id`), and the
scheduler, connector and observer see `cmpl-pd-3f2a…-0-1b2c3d4e` (`<response id>-<choice
index>-<8 hex>`), a different suffix on prefill and on decode. The observer's events carry
the internal id; the proxy's timeline the proxy's. The join, most exact first:

1. `kv_transfer_params.remote_request_id` in `prefill_end` (NIXL): prefill's internal id, as is;
2. the response ids the proxy records (`prefill_id` in `prefill_end`, `decode_id` in
   `kv_transfer_end` / `finish`) plus vLLM's suffix rule above (the shipped recordings and
   ExampleConnector give nothing better);
3. a proxy id seen as such.

Each request also gets a number in arrival order (#1, #2, …) and one colour from it, so the
block map, the Gantt and the schedule name and paint a request alike.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from labkit.viz.style import REQUEST_COLORS, request_color

VLLM_SUFFIX = re.compile(r"-\d+-[0-9a-f]{8}$")  # vLLM's per-request uniquifier


def response_id(engine_req_id: str) -> str:
    """'cmpl-abc-0-1b2c3d4e' -> 'cmpl-abc' (unchanged when there is no vLLM suffix)."""
    return VLLM_SUFFIX.sub("", engine_req_id)


class RequestIds:
    """Aliases (engine id / response id -> proxy id) and a number per proxy request."""

    def __init__(self, max_aliases: int = 20000) -> None:
        self.alias: OrderedDict[str, str] = OrderedDict()
        self.number: dict[str, int] = {}
        self.max_aliases = max_aliases
        self.version = 0

    def _add(self, other: Any, proxy_id: str) -> None:
        if isinstance(other, str) and other and self.alias.get(other) != proxy_id:
            self.alias[other] = proxy_id
            while len(self.alias) > self.max_aliases:
                self.alias.popitem(last=False)
            self.version += 1

    def note_timeline(self, ev: dict[str, Any]) -> None:
        """Learn from one proxy timeline event (arrival numbers; ids in prefill_end / finish)."""
        rid = str(ev.get("req_id"))
        if rid not in self.number and ev.get("event") != "token":
            self.number[rid] = len(self.number) + 1
            self.version += 1
        for key in ("prefill_id", "decode_id"):
            self._add(ev.get(key), rid)
        params = ev.get("kv_transfer_params")
        if isinstance(params, dict):
            self._add(params.get("remote_request_id"), rid)

    def resolve(self, req_id: str) -> str | None:
        """The proxy id of any id of a request; None while the join is not known."""
        if req_id in self.number:
            return req_id
        hit = self.alias.get(req_id)
        if hit is None:
            hit = self.alias.get(response_id(req_id))
            if hit is not None:
                self._add(req_id, hit)
        return hit

    def key(self, req_id: str) -> str:
        """A stable key for a request: its proxy id, else its response id."""
        return self.resolve(req_id) or response_id(req_id)

    def label(self, req_id: str) -> str:
        """'#12' for a request the proxy numbered; else a short tail of its id."""
        n = self.number.get(self.key(req_id))
        if n is not None:
            return f"#{n}"
        rid = response_id(req_id)
        return rid if len(rid) <= 10 else "…" + rid[-8:]

    def color(self, req_id: str) -> str:
        """One colour per request, the same in every view (by number: neighbours differ)."""
        n = self.number.get(self.key(req_id))
        if n is not None:
            return REQUEST_COLORS[(n - 1) % len(REQUEST_COLORS)]
        return request_color(response_id(req_id))

    def color_index(self, req_id: str) -> int:
        return REQUEST_COLORS.index(self.color(req_id))
