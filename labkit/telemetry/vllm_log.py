"""Start-up progress of a `vllm serve` process, read from its log.

vLLM 0.26 says where it is in plain log lines (api_server.py, core.py, gpu_worker.py,
kv_cache_utils.py, gpu/model_runner.py); this module turns them into ordered stages with
the figures a learner wants to see while an engine starts: weights GiB, KV-cache GiB and
tokens, maximum concurrency, eager or CUDA graphs, how long each part took, and errors.

    state = parse_log(path)                   # whole file
    for line in follow(path, stop): ...       # tail a growing log
    parser = StartupParser(); parser.feed(line) -> list[StageEvent]
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Stages in the order vLLM goes through them; `failed` can come at any point.
STAGES = (
    "process_started",   # API server printed its banner / non-default args
    "engine_core_init",  # EngineCore: "Initializing a V1 LLM engine ... with config"
    "loading_weights",   # "Loading model from scratch..." / "Loading weights"
    "weights_loaded",    # "Model loading took X GiB and Y seconds"
    "kv_cache_profiled", # "Available KV cache memory: X GiB"
    "kv_cache_allocated",  # "GPU KV cache size: N tokens" (+ max concurrency)
    "graph_capture",     # "Capturing CUDA graphs" / "Graph capturing finished" (or eager)
    "engine_ready",      # "init engine (profile, create kv cache, warmup model) took X s"
    "api_ready",         # "Starting vLLM server on ..." then "Application startup complete."
)

_PREFIX = re.compile(r"^\((?P<proc>[A-Za-z_]+)(?:_TP\d+|_DP\d+)?\s+pid=(?P<pid>\d+)\)\s*")
_TS = re.compile(r"(?:INFO|WARNING|ERROR|DEBUG|CRITICAL)\s+(\d\d-\d\d \d\d:\d\d:\d\d)")
_NUM = r"([\d,]+(?:\.\d+)?)"


def _f(text: str) -> float:
    return float(text.replace(",", ""))


@dataclass
class StageEvent:
    """One stage reached (or an error seen), with the line that says so."""

    stage: str
    line_no: int
    log_time: str | None
    detail: dict[str, float | int | str | bool]
    line: str


@dataclass
class StartupState:
    """Everything learned so far from one engine's start-up log."""

    stage: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    version: str | None = None
    config: dict[str, str] = field(default_factory=dict)
    weights_gib: float | None = None
    weights_load_s: float | None = None
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    max_concurrency_tokens: int | None = None
    eager: bool | None = None
    graph_capture_s: float | None = None
    graph_gib: float | None = None
    init_engine_s: float | None = None
    port: int | None = None
    ready: bool = False
    errors: list[str] = field(default_factory=list)
    events: list[StageEvent] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def progress(self) -> float:
        """0..1 by stage reached (for a progress bar)."""
        if self.stage is None or self.stage not in STAGES:
            return 0.0
        return (STAGES.index(self.stage) + 1) / len(STAGES)


_CONFIG_KEYS = ("model", "dtype", "max_seq_len", "load_format", "tensor_parallel_size",
                "pipeline_parallel_size", "enforce_eager", "kv_cache_dtype",
                "enable_prefix_caching", "enable_chunked_prefill", "quantization")

# (stage, pattern); first match wins for a line. Groups become detail entries.
_RULES: list[tuple[str, re.Pattern[str], tuple[str, ...]]] = [
    ("process_started", re.compile(r"version (\d+\.\d+\.\S+)"), ("version",)),
    ("process_started", re.compile(r"non-default args: "), ()),
    ("engine_core_init", re.compile(r"Initializing a V1 LLM engine \(v([^)]+)\) with config"),
     ("version",)),
    ("loading_weights", re.compile(r"Loading model from scratch|Loading weights|Starting to load model"),
     ()),
    ("weights_loaded", re.compile(rf"Model loading took {_NUM} GiB(?: memory)? and {_NUM} seconds"),
     ("weights_gib", "weights_load_s")),
    ("kv_cache_profiled", re.compile(rf"Available KV cache memory: {_NUM} GiB"), ("kv_cache_gib",)),
    ("kv_cache_allocated", re.compile(rf"GPU KV cache size: {_NUM} tokens"), ("kv_cache_tokens",)),
    ("kv_cache_allocated", re.compile(rf"Maximum concurrency for {_NUM} tokens per request: {_NUM}x"),
     ("max_concurrency_tokens", "max_concurrency")),
    ("graph_capture", re.compile(r"Capturing CUDA graphs"), ()),
    ("graph_capture", re.compile(rf"Graph capturing finished in {_NUM} secs, took {_NUM} GiB"),
     ("graph_capture_s", "graph_gib")),
    ("engine_ready", re.compile(rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} s"),
     ("init_engine_s",)),
    ("api_ready", re.compile(r"Starting vLLM server on \S+:(\d+)"), ("port",)),
    ("api_ready", re.compile(r"Application startup complete()"), ("ready",)),
]
_EAGER = re.compile(r"Enforce eager set|Cudagraph is disabled under eager mode")
_ERRORS = [
    re.compile(r"CUDA out of memory|OutOfMemoryError"),
    re.compile(r"No available memory for the cache blocks"),
    re.compile(r"Address already in use|\[Errno 98\]"),
    re.compile(r"\b\w*Error: "),  # ValueError: ..., RuntimeError: ..., AssertionError: ...
    re.compile(r"Engine core initialization failed"),
]
_NOT_ERRORS = re.compile(r"fd limit errors|OSError: \[Errno 24\] Too many open files`")
_INTS = {"kv_cache_tokens", "max_concurrency_tokens", "port"}


class StartupParser:
    """Feed log lines one at a time; get the stages they reach."""

    def __init__(self) -> None:
        self.state = StartupState()
        self.line_no = 0

    def feed(self, line: str) -> list[StageEvent]:
        self.line_no += 1
        line = line.rstrip("\n")
        st = self.state
        body = line
        m = _PREFIX.match(line)
        if m:
            st.pids.setdefault(m.group("proc"), int(m.group("pid")))
            body = line[m.end():]
        ts_m = _TS.search(body)
        log_time = ts_m.group(1) if ts_m else None
        out: list[StageEvent] = []
        if _EAGER.search(body):
            st.eager = True
        if "Initializing a V1 LLM engine" in body:
            for key in _CONFIG_KEYS:
                km = re.search(rf"\b{key}=('([^']*)'|[^,]+)", body)
                if km:
                    st.config[key] = km.group(2) if km.group(2) is not None else km.group(1)
            if st.config.get("enforce_eager") == "False":
                st.eager = False
        for stage, pat, names in _RULES:
            pm = pat.search(body)
            if not pm:
                continue
            if not names and any(e.stage == stage for e in st.events):
                break  # e.g. one event for tqdm's many "Capturing CUDA graphs" updates
            detail: dict[str, float | int | str | bool] = {}
            for name, value in zip(names, pm.groups(), strict=True):
                if name in ("version",):
                    detail[name] = value
                elif name == "ready":
                    detail[name] = True
                else:
                    detail[name] = int(_f(value)) if name in _INTS else _f(value)
            if stage == "api_ready" and "ready" not in detail:
                detail["ready"] = False
            for name, value in detail.items():
                setattr(st, name, value)
            if stage == "graph_capture" and st.eager is None:
                st.eager = False
            if st.stage is None or STAGES.index(stage) >= STAGES.index(st.stage):
                st.stage = stage
            out.append(StageEvent(stage, self.line_no, log_time, detail, line))
            break
        if not _NOT_ERRORS.search(body) and any(p.search(body) for p in _ERRORS):
            st.errors.append(body.strip())
            out.append(StageEvent("failed", self.line_no, log_time, {}, line))
        st.events.extend(out)
        return out


def parse_log(path: str | Path) -> StartupState:
    """Parse a whole log file (as far as it goes)."""
    parser = StartupParser()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parser.feed(line)
    return parser.state


def follow(path: str | Path, stop: threading.Event | None = None,
           poll_s: float = 0.1, from_start: bool = True) -> Iterator[str]:
    """Yield lines of a growing file as they are written, until `stop` is set.

    Waits for the file to appear; a partial last line is held back until its newline.
    """
    stop = stop or threading.Event()
    path = Path(path)
    while not path.exists():
        if stop.wait(poll_s):
            return
    with open(path, encoding="utf-8", errors="replace") as fh:
        if not from_start:
            fh.seek(0, 2)
        buf = ""
        while True:
            chunk = fh.readline()
            if chunk:
                buf += chunk
                if buf.endswith("\n"):
                    yield buf
                    buf = ""
                continue
            if stop.wait(poll_s):
                if buf:
                    yield buf
                return


class LogFollower:
    """A daemon thread that tails a log and calls `on_event(event, state)` per stage."""

    def __init__(self, path: str | Path,
                 on_event: Callable[[StageEvent, StartupState], None] | None = None,
                 poll_s: float = 0.1) -> None:
        self.path = Path(path)
        self.parser = StartupParser()
        self.on_event = on_event
        self.poll_s = poll_s
        self.num_errors = 0  # on_event calls that raised
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"log-follow:{self.path.name}",
                                        daemon=True)

    @property
    def state(self) -> StartupState:
        return self.parser.state

    def start(self) -> LogFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        for line in follow(self.path, self._stop, self.poll_s):
            for ev in self.parser.feed(line):
                if self.on_event is not None:
                    try:
                        self.on_event(ev, self.parser.state)
                    except Exception:  # a view's bug must not stop the tail, nor hide
                        self.num_errors += 1
                        if self.num_errors == 1:
                            logger.exception("log follower: on_event failed (further "
                                             "failures only counted in num_errors)")


def wait_for_stage(state_fn: Callable[[], StartupState], stage: str, timeout: float,
                   poll_s: float = 0.1) -> StartupState:
    """Poll until `stage` (or a failure) is reached; return the state (for tests and CLIs)."""
    deadline = time.monotonic() + timeout
    while True:
        st = state_fn()
        if st.failed or (st.stage is not None and STAGES.index(st.stage) >= STAGES.index(stage)):
            return st
        if time.monotonic() > deadline:
            return st
        time.sleep(poll_s)
