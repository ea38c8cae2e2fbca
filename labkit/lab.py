"""Lab: one call starts a prefill/decode pair and the PD proxy, real or simulated.

    with labkit.Lab(model="lab-1b", max_num_batched_tokens=512) as lab:  # real vLLM if possible
        lab.complete("Hello", max_tokens=16)              # through the proxy
        labkit.viz.Dashboard(lab.telemetry()).show()

`Lab(num_prefill=2, num_decode=2)` starts xPyD: four engines (each with its own ports,
labkit/plan/xpyd.py `engine_ports`) behind one proxy that routes among them
(labkit/pd/router.py; `lab.set_routing_policy("kv-aware")` switches live).

`mode="auto"` (the default, or $LABKIT_MODE) picks real vLLM where GPUs and vLLM are present
and the simulator otherwise, and says which: notebooks never branch on the hardware. Every
engine and the proxy is a subprocess in its own process group bound to 127.0.0.1; `stop()`,
the context manager, interpreter exit and the parent's death (PR_SET_PDEATHSIG) all end them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from labkit import auth
from labkit.engines.base import EngineHandle
from labkit.plan import ConfigError, EngineConfig, PDConfig, Plan, validate
from labkit.plan.ports import free_port
from labkit.vocab import GiB, run_root

Progress = Callable[[str, float], None]
MODES = ("auto", "sim", "vllm")


class ProxyProcess(EngineHandle):
    """The PD proxy (`python -m labkit.pd`) as a subprocess in its own process group."""

    def __init__(self, prefill_urls: list[str], decode_urls: list[str], connector: str,
                 read_timeout: float | None = None, *, prefill_names: list[str] | None = None,
                 decode_names: list[str] | None = None, kv_events: list[str] | None = None,
                 policy: str | None = None, block_size: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__("proxy", role="proxy", **kwargs)
        self.prefill_urls, self.decode_urls, self.connector = prefill_urls, decode_urls, connector
        self.read_timeout = read_timeout
        self.prefill_names, self.decode_names = prefill_names or [], decode_names or []
        self.kv_events, self.policy, self.block_size = kv_events or [], policy, block_size

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "labkit.pd", "--host", self.host, "--port", str(self.port),
                "--connector", self.connector]
        for u in self.prefill_urls:
            args += ["--prefill", u]
        for u in self.decode_urls:
            args += ["--decode", u]
        if self.read_timeout is not None:
            args += ["--read-timeout", f"{self.read_timeout:g}"]
        for flag, values in (("--prefill-name", self.prefill_names),
                             ("--decode-name", self.decode_names),
                             ("--prefill-kv-events", self.kv_events)):
            for v in values:
                args += [flag, v]
        if self.policy is not None:
            args += ["--policy", self.policy]
        if self.block_size is not None:
            args += ["--block-size", str(self.block_size)]
        return args


def default_run_dir() -> Path:
    return run_root() / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# Other spellings of a keyword -> the lab's one name (vLLM's own where vLLM has one).
ALIASES = {
    "chunk": "max_num_batched_tokens", "tensor_parallel_size": "tp",
    "pipeline_parallel_size": "pp", "kv_dtype": "kv_cache_dtype", "gpus": "num_gpus",
    "num_gpu_blocks_override": "num_gpu_blocks", "kv_offloading_size_gb": "kv_offloading_size",
}


def kv_cache_memory_blocks(model: str, kv_cache_memory: int, *, tp: int = 1, pp: int = 1,
                           kv_cache_dtype: str = "auto", block_size: int = 16) -> int | None:
    """How many KV blocks `kv_cache_memory` bytes per GPU hold (vLLM's --kv-cache-memory:
    num_blocks = bytes // page, page = block_size x KV bytes per token on the GPU's largest PP
    stage). An fp8 cache has half the page, so twice the blocks. None when the model or dtype
    is unknown (the planner then says so)."""
    from labkit.models import get_model, normalize_kv_dtype

    try:
        shape = get_model(model)
        page = block_size * shape.kv_bytes_per_token(normalize_kv_dtype(kv_cache_dtype), tp, pp)
    except (KeyError, ValueError, OSError):
        return None
    return max(1, int(kv_cache_memory) // page) if page > 0 else None


def build_config(model: str = "lab-1b", *, max_num_batched_tokens: int | None = None,
                 tp: int = 1, pp: int = 1,
                 prefill_tp: int | None = None, decode_tp: int | None = None,
                 prefill_pp: int | None = None, decode_pp: int | None = None,
                 kv_cache_dtype: str = "auto", block_size: int = 16,
                 max_num_seqs: int = 256, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 num_gpu_blocks: int | None = None, kv_cache_memory: int | None = None,
                 connector: str = "auto", num_gpus: int | None = None,
                 gpu_type: str | None = None, colocated: bool = False,
                 kv_offloading_size: float | None = None, enable_chunked_prefill: bool = True,
                 load_format: str = "dummy", num_prefill: int = 1, num_decode: int = 1,
                 **aliases: Any) -> PDConfig:
    """A PDConfig from the handful of knobs a learner turns (`Lab`'s keywords; see there)."""
    known = {k: v for k, v in locals().items() if k not in ("aliases", "model")}
    for old, value in aliases.items():
        new = ALIASES.get(old)
        if new is None:
            raise unknown_keyword(old)
        known[new] = value
    return _build(model, **known)


def unknown_keyword(name: str) -> ConfigError:
    import difflib

    words = [*inspect.signature(Lab.__init__).parameters][2:]
    words = [w for w in words if w != "aliases"]
    close = difflib.get_close_matches(name, [*words, *ALIASES], n=1, cutoff=0.5)
    hint = ALIASES.get(close[0], close[0]) if close else None
    return ConfigError(f"Lab() has no keyword {name!r}",
                       f"use {hint}=..." if hint else f"use one of: {', '.join(words)}")


def _build(model: str, *, max_num_batched_tokens, tp, pp, prefill_tp, decode_tp, prefill_pp,
           decode_pp, kv_cache_dtype, block_size, max_num_seqs, max_model_len,
           gpu_memory_utilization, num_gpu_blocks, kv_cache_memory, connector, num_gpus,
           gpu_type, colocated, kv_offloading_size, enable_chunked_prefill,
           load_format, num_prefill=1, num_decode=1) -> PDConfig:
    if num_gpu_blocks is not None and kv_cache_memory is not None:
        raise ConfigError("both num_gpu_blocks and kv_cache_memory size the KV cache",
                          "use kv_cache_memory (bytes; the block count follows the KV dtype) "
                          "or num_gpu_blocks (a fixed count), not both")
    if kv_cache_memory is not None and (isinstance(kv_cache_memory, bool)
                                        or not isinstance(kv_cache_memory, int)
                                        or kv_cache_memory <= 0):
        raise ConfigError(f"kv_cache_memory={kv_cache_memory!r} is not a byte count",
                          "use a positive number of bytes per GPU, e.g. kv_cache_memory=8_000_000")

    def engine(role: str, e_tp: int, e_pp: int) -> EngineConfig:
        blocks = num_gpu_blocks
        if kv_cache_memory is not None:
            blocks = kv_cache_memory_blocks(model, kv_cache_memory, tp=e_tp, pp=e_pp,
                                            kv_cache_dtype=kv_cache_dtype, block_size=block_size)
        return EngineConfig(
            model=model, role=role, tp=e_tp, pp=e_pp,  # type: ignore[arg-type]
            kv_cache_dtype=kv_cache_dtype, block_size=block_size,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            num_gpu_blocks_override=blocks, kv_offloading_size_gb=kv_offloading_size,
            enable_chunked_prefill=enable_chunked_prefill,
            load_format=load_format)  # type: ignore[arg-type]

    prefill = engine("prefill", prefill_tp or tp, prefill_pp or pp)
    decode = engine("decode", decode_tp or tp, decode_pp or pp)
    return PDConfig(prefill=prefill, decode=decode, connector=connector,  # type: ignore[arg-type]
                    num_gpus=num_gpus, gpu_type=gpu_type, colocated=colocated,
                    num_prefill=num_prefill, num_decode=num_decode)


class Lab:
    """A running (or ready to run) PD pair + proxy, real or simulated.

    The keywords carry vLLM's names where vLLM has one (the CLI's flags are the same words:
    `kv_cache_dtype` = `--kv-cache-dtype`); `chunk`, `kv_dtype`, `gpus`,
    `tensor_parallel_size`, `pipeline_parallel_size` are accepted as other spellings.

    Args:
        config: a ready PDConfig; or leave it None and describe the pair with the keywords.
        model: a preset ("lab-1b", "llama-3.1-8b", ...), an HF name or a config.json path.
        max_num_batched_tokens: the step's token budget, i.e. the prefill chunk size
            (None: vLLM's default).
        tp, pp: tensor / pipeline parallel size of both engines (vLLM's -tp / -pp);
            prefill_tp, decode_tp, prefill_pp, decode_pp set one engine only.
        kv_cache_dtype: "auto" (the model's dtype), "bfloat16", "float16", "fp8", ...
        block_size: tokens per KV block (a multiple of 16).
        max_num_seqs, max_model_len, gpu_memory_utilization: as in `vllm serve`.
        num_gpu_blocks: KV blocks per engine, whatever the dtype (vLLM's
            --num-gpu-blocks-override).
        kv_cache_memory: KV cache bytes per GPU (vLLM's --kv-cache-memory): the block count
            follows the dtype and block size (fp8 = twice the blocks).
        connector: "auto", "example" (ExampleConnector) or "nixl" (NixlConnector).
        num_gpus, gpu_type: the machine; a count or type the machine does not have plans a
            simulated cluster (default: the GPUs present, or 2 simulated H100s).
        colocated: one engine doing both phases (no PD), for comparisons.
        num_prefill, num_decode: xPyD: how many prefill and decode engines (each a copy of
            its role's config on GPUs of its own; default 1 and 1, the PD pair).
        routing_policy: how the proxy picks each request's engines: "round-robin",
            "least-loaded" or "kv-aware" (labkit/pd/router.py); `set_routing_policy` switches.
        kv_offloading_size: GiB of host memory for KV offload (vLLM's --kv-offloading-size).
        enable_chunked_prefill, load_format: as in `vllm serve` (load_format "dummy": random
            weights, no download).
        mode: "auto" | "sim" | "vllm" (default $LABKIT_MODE or "auto": real vLLM where GPUs
            and vLLM are present, simulated otherwise).
        run_dir: where logs, the model directory and connector storage go.
        port: the OpenAI endpoint's port (the PD proxy; default: a free one).
        speed: simulated engines only: simulated seconds per wall second (1.0 = real time;
            0 = as fast as possible, for tests and benchmarks).
        observe: load the observer connector (block map, KV streaming views).
        read_timeout: seconds the proxy waits for an engine's answer (for a stream: between
            two chunks) before it answers 504; None: the proxy's default (600 s).
        kv_load_timeout: simulated decode engines only: seconds a NIXL read waits for the
            prefill engine's handshake before the request fails (vLLM's 5 s).
        owner: who started it ("python", "dashboard", "labkit up"); `labkit status` shows it.
        cluster: "auto", "ray://host:port" or a Ray address: the engines run on the nodes of
            a Ray cluster (a ClusterLab, labkit/cluster; `pip install labkit[cluster]`).

    Raises:
        ConfigError: a configuration vLLM would refuse, or a keyword Lab does not know
            (with the one it has), before anything starts.
    """

    def __new__(cls, *args: Any, cluster: str | None = None, **kwargs: Any) -> Lab:
        if cluster is not None and cls is Lab:  # then ClusterLab.__init__ runs, with cluster
            from labkit.cluster.lab import ClusterLab

            return super().__new__(ClusterLab)
        return super().__new__(cls)

    def __init__(self, config: PDConfig | None = None, *, model: str = "lab-1b",
                 max_num_batched_tokens: int | None = None, tp: int = 1, pp: int = 1,
                 prefill_tp: int | None = None, decode_tp: int | None = None,
                 prefill_pp: int | None = None, decode_pp: int | None = None,
                 kv_cache_dtype: str = "auto", block_size: int = 16, max_num_seqs: int = 256,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 num_gpu_blocks: int | None = None, kv_cache_memory: int | None = None,
                 connector: str = "auto", num_gpus: int | None = None,
                 gpu_type: str | None = None, colocated: bool = False,
                 kv_offloading_size: float | None = None, enable_chunked_prefill: bool = True,
                 load_format: str = "dummy", num_prefill: int = 1, num_decode: int = 1,
                 routing_policy: str = "round-robin", mode: str | None = None,
                 run_dir: str | Path | None = None, port: int | None = None, speed: float = 1.0,
                 observe: bool = True, read_timeout: float | None = None,
                 kv_load_timeout: float | None = None, owner: str = "python",
                 **aliases: Any) -> None:
        self.mode = (mode or os.environ.get("LABKIT_MODE") or "auto").lower()
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {MODES}",
                              "use mode='auto' (real vLLM where possible), mode='sim' "
                              "or mode='vllm'")
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) \
                or not math.isfinite(speed) or speed < 0:
            raise ConfigError(f"speed={speed!r} is not a simulated-seconds-per-wall-second factor",
                              "use a positive number (1.0 = real time) or 0 (as fast as possible)")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 < port < 65536):
            raise ConfigError(f"port={port!r} is not a TCP port", "use a port in 1..65535")
        knobs = dict(max_num_batched_tokens=max_num_batched_tokens, tp=tp, pp=pp,
                     prefill_tp=prefill_tp, decode_tp=decode_tp, prefill_pp=prefill_pp,
                     decode_pp=decode_pp, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                     max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                     gpu_memory_utilization=gpu_memory_utilization,
                     num_gpu_blocks=num_gpu_blocks, kv_cache_memory=kv_cache_memory,
                     connector=connector, num_gpus=num_gpus, gpu_type=gpu_type,
                     colocated=colocated, kv_offloading_size=kv_offloading_size,
                     enable_chunked_prefill=enable_chunked_prefill, load_format=load_format,
                     num_prefill=num_prefill, num_decode=num_decode)
        from labkit.pd.router import POLICIES

        if routing_policy not in POLICIES:
            raise ConfigError(f"routing_policy={routing_policy!r} is not a routing policy",
                              f"use one of {', '.join(POLICIES)}")
        self.routing_policy = routing_policy
        for old in aliases:
            if old not in ALIASES:
                raise unknown_keyword(old)
        self.config = config if config is not None else build_config(model, **knobs, **aliases)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        self.speed = speed
        self.observe = observe
        self.port = port
        self.owner = owner
        self.kv_cache_memory = kv_cache_memory if config is None else None
        for what, t in (("read_timeout", read_timeout), ("kv_load_timeout", kv_load_timeout)):
            if t is not None and not (isinstance(t, (int, float)) and 0 < t < math.inf):
                raise ConfigError(f"{what}={t!r} is not a positive number of seconds",
                                  f"use e.g. {what}=30, or None for the default")
        self.read_timeout, self.kv_load_timeout = read_timeout, kv_load_timeout
        self._model_path: str | None = None
        self.plan: Plan = self._plan()
        self.kind: str = self.plan.kind
        self.engines: dict[str, EngineHandle] = {}
        self.proxy: ProxyProcess | None = None
        self._telemetry: Any = None
        self._observer_endpoint: str | None = None
        self._ports: dict[str, Any] = {}  # xPyD: engine_ports(plan), taken at start
        self._kv_dir: Path | None = None  # xPyD: the engines' KV-event IPC sockets

    # ------------------------------------------------------------------ planning
    def _plan(self) -> Plan:
        from labkit import hardware
        from labkit.plan import detect
        from labkit.plan.planner import check_config

        check_config(self.config)  # types first: hardware.simulated() below reads num_gpus
        if self.mode == "sim":
            hw = hardware.simulated(self.config.num_gpus or 2, self.config.gpu_type or "h100")
            plan = validate(self.config, hw)
            return replace(plan, kind="sim")
        plan = validate(self.config)
        if self.mode == "vllm" and plan.kind != "vllm":
            why = ("no NVIDIA GPU was found" if not detect().gpus
                   else "vLLM is not importable")
            raise ConfigError(f"mode='vllm' asked for real engines, but {why}",
                              "install labkit[gpu] on a GPU machine, or use mode='auto' "
                              "or mode='sim'")
        return plan

    def describe(self) -> str:
        """One line saying what runs: real or simulated, where, with which connector."""
        what = ("REAL vLLM" if self.kind == "vllm" else "SIMULATED")
        gpus = f"{self.plan.num_gpus}x {self.plan.gpu_type.name}"
        names = ", ".join(f"{e.name} on GPU {e.gpus}" for e in self.plan.engines)
        shape = "PD pair"
        if self.is_xpyd:
            shape = (f"{self.config.num_prefill}P+{self.config.num_decode}D "
                     f"(routing: {self.routing_policy})")
        return f"{what} {shape} of {self.plan.model.name} on {gpus} ({names}); " \
               f"KV connector: {self.plan.connector or 'none (colocated)'}"

    @property
    def is_xpyd(self) -> bool:
        """More than one prefill or decode engine."""
        return (self.config.num_prefill, self.config.num_decode) != (1, 1)

    # ------------------------------------------------------------------ start / stop
    def start(self, progress: Progress | bool = True, timeout: float = 900.0) -> Lab:
        """Start the engines and the proxy; return when all answer /health."""
        from labkit.plan import port_is_free

        if self.port is not None and not port_is_free("127.0.0.1", self.port):
            raise ConfigError(f"port {self.port} is in use on 127.0.0.1",
                              "use another port, or stop what holds it")
        report = _progress(progress, self.describe())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            report("preparing the model directory", 0.05)
            model_dir = self._model_path = self._model_dir()
            self._observer_endpoint = f"tcp://127.0.0.1:{free_port()}" if self.observe else None
            if self.is_xpyd:
                from labkit.plan.xpyd import engine_ports

                self._ports = engine_ports(self.plan)
            report("starting engines", 0.1)
            colocated_port = self.port if self.plan.connector is None else None
            self.engines = {ep.name: self._engine(ep.name, model_dir, colocated_port)
                            for ep in self.plan.engines}
            # The proxy starts while the engines load (it knows their URLs already and
            # tolerates engines that do not answer yet): off the critical path of an Apply.
            self._launch_proxy(self.port)
            shared = self.kind == "vllm" and len({g for ep in self.plan.engines
                                                  for g in ep.gpus}) < len(self.plan.engines)
            if shared:  # one after the other: each must see the other's memory (config notes)
                for i, eng in enumerate(self.engines.values()):
                    eng.start()
                    report(f"{eng.name}: loading", 0.1 + 0.35 * i)
                    eng.wait_ready(timeout)
            else:
                for eng in self.engines.values():
                    eng.start()
                with ThreadPoolExecutor(len(self.engines)) as pool:
                    list(pool.map(lambda e: e.wait_ready(timeout), self.engines.values()))
            report("engines ready", 0.85)
            self._await_proxy()
            if self.observe:
                # Bind the readers now and wait until every engine's publishers reach them,
                # so nothing a first request does is missed.
                report("connecting the telemetry", 0.95)
                if not self.telemetry().wait_connected(10.0):
                    print("labkit: not every engine's telemetry connected within 10 s; the "
                          "views may miss the first events", file=sys.stderr)
            self._write_state()
            report("ready", 1.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _model_dir(self) -> str:
        shape = self.plan.model
        if not shape.synthetic and shape.hf_name and self.kind == "vllm" \
                and os.environ.get("LABKIT_REAL_WEIGHTS"):
            return shape.hf_name  # a real model by name, for users with hub access
        from labkit.models import write_model_dir

        return str(write_model_dir(shape, self.run_dir / "model"))

    def _engine(self, name: str, model_dir: str, port: int | None = None,
                kv_ep: str | None = None) -> EngineHandle:
        ep = self.plan.engine(name)
        ports = self._ports.get(name)  # xPyD: the plan's own ports for this engine
        port = port or (ports.http if ports else free_port())
        kv_ep = kv_ep or (self._kv_ipc(name) if ports else f"tcp://127.0.0.1:{free_port()}")
        log = self.run_dir / f"{name}.log"
        if self.kind == "vllm":
            from labkit.engines.vllm import VLLMEngine
            from labkit.plan import env_for, vllm_args

            # vLLM's publisher binds "tcp://*:PORT"; we ask for loopback only.
            args = vllm_args(None, self.plan, name, model_dir, port,
                             {"run_dir": str(self.run_dir), "observer_endpoint":
                              self._observer_endpoint, "kv_events_endpoint": kv_ep,
                              "served_model_name": self.plan.model.name})
            return VLLMEngine(name, args, role=ep.role, port=port, gpus=[],
                              log_path=log, kv_events_endpoint=kv_ep,
                              observer_endpoint=self._observer_endpoint,
                              env=env_for(name, self.plan,
                                          ports.side_channel if ports else None))
        from labkit.engines.sim.process import SimEngineProcess

        return SimEngineProcess(
            name, plan=self.plan, plan_key=name, run_dir=self.run_dir, speed=self.speed,
            fast=self.speed == 0, port=port, log_path=log, kv_events_endpoint=kv_ep,
            observer_endpoint=self._observer_endpoint, served_model_name=self.plan.model.name,
            kv_load_timeout=self.kv_load_timeout)

    def _kv_ipc(self, name: str) -> str:
        """xPyD: engine `name`'s KV-event endpoint, a local IPC socket. vLLM's publisher
        CONNECTS to a concrete TCP address (one reader binds it) but BINDS an ipc:// one, so
        two readers can subscribe: the proxy's router (prefix index) and the lab's telemetry.
        In the run directory, or a short folder under /tmp where that path is too long for a
        Unix socket (about 100 bytes)."""
        folder = self.run_dir / "kv-events"
        if len(str(folder.resolve())) > 80:
            import hashlib
            import tempfile

            tag = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:10]
            folder = Path(tempfile.gettempdir()) / f"labkit-kv-{tag}"
        folder.mkdir(parents=True, exist_ok=True)
        self._kv_dir = folder
        return f"ipc://{folder.resolve()}/{name}"

    def _start_proxy(self, port: int | None = None) -> None:
        self._launch_proxy(port)
        self._await_proxy()

    def _launch_proxy(self, port: int | None = None) -> None:
        """Start the proxy process (no wait); colocated labs have none."""
        if self.plan.connector is None:  # colocated: no proxy, talk to the engine
            return
        pre = [e for e in self.engines.values() if e.role == "prefill"]
        dec = [e for e in self.engines.values() if e.role == "decode"]
        kv = [e.kv_events_endpoint for e in pre]
        self.proxy = ProxyProcess(
            [e.base_url for e in pre], [e.base_url for e in dec], self.plan.connector,
            self.read_timeout, prefill_names=[e.name for e in pre],
            decode_names=[e.name for e in dec],
            kv_events=kv if self.is_xpyd and all(kv) else None,  # type: ignore[arg-type]
            policy=self.routing_policy, block_size=self.plan.engines[0].config.block_size,
            kind=self.kind, port=port, log_path=self.run_dir / "proxy.log")  # type: ignore[arg-type]
        self.proxy.start()

    def _await_proxy(self) -> None:
        """Until the proxy answers (and, xPyD, its KV-event readers reach every prefill)."""
        if self.proxy is None:
            return
        self.proxy.wait_ready(60)
        if self.is_xpyd:
            self._wait_routing_connected(10.0)

    def _wait_routing_connected(self, timeout: float) -> bool:
        """Until the proxy's KV-event readers reach every prefill engine (a prefix stored
        before that is unknown to kv-aware routing); False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                subs = self.routing()["kv_events"].values()
                if all(s["connected"] for s in subs):
                    return True
            time.sleep(0.05)
        print("labkit: the proxy's KV-event readers did not reach every prefill engine within "
              f"{timeout:g} s; kv-aware routing may miss the first prefixes", file=sys.stderr)
        return False

    # ------------------------------------------------------------------ routing
    def routing(self) -> dict:
        """The proxy's routing state (GET /router): the policy, the engines, requests routed
        to each, the blocks each prefill engine holds as the proxy's index sees them, loads."""
        import httpx

        if self.proxy is None:
            raise RuntimeError("this lab has no proxy running (not started, or colocated)")
        r = httpx.get(f"{self.proxy.base_url}/router", timeout=5, headers=auth.headers())
        r.raise_for_status()
        return r.json()

    def set_routing_policy(self, policy: str) -> dict:
        """Switch the proxy's routing policy live ("round-robin", "least-loaded",
        "kv-aware"); requests that arrive from now on are routed by it. Returns the routing
        state.

        Raises:
            ConfigError: an unknown policy (nothing changes).
        """
        import httpx

        from labkit.pd.router import POLICIES

        if policy not in POLICIES:
            raise ConfigError(f"routing policy {policy!r} is not one of {POLICIES}",
                              f"use one of {', '.join(POLICIES)}")
        self.routing_policy = policy
        if self.proxy is None:
            return {"policy": policy}
        r = httpx.post(f"{self.proxy.base_url}/router", json={"policy": policy}, timeout=5,
                       headers=auth.headers())
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        """Stop the telemetry, the proxy and every engine (whole process groups)."""
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        for eng in list(self.engines.values()):
            eng.stop()
        self._remove_kv_storage()
        if self._kv_dir is not None:
            import shutil

            shutil.rmtree(self._kv_dir, ignore_errors=True)
            self._kv_dir = None
        self.state_path.unlink(missing_ok=True)
        if self.state_path.parent != self.run_dir:
            with contextlib.suppress(OSError):
                self.state_path.parent.rmdir()

    @property
    def state_path(self) -> Path:
        """This lab's state file, which `labkit status` finds under the run root: in the run
        dir, or (a run dir elsewhere) in a small folder there named after it."""
        import hashlib

        from labkit.service import STATE

        if self.run_dir.resolve().parent == run_root().resolve():
            return self.run_dir / STATE
        tag = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:10]
        return run_root() / f"elsewhere-{tag}" / STATE

    def _write_state(self) -> None:
        from labkit.service import lab_state

        st = {**lab_state(self), "owner": self.owner, "pid": os.getpid()}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2))
        tmp.replace(self.state_path)

    def _remove_kv_storage(self) -> None:
        """ExampleConnector's KV files (in RAM-backed /dev/shm) go with the lab."""
        if self.kind != "vllm" or self.plan.connector != "example":
            return
        import shutil

        from labkit.plan import shared_storage_path

        path = Path(shared_storage_path(self.run_dir))
        if path.name.startswith("labkit-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

    def restart_engine(self, name: str, timeout: float = 120.0) -> EngineHandle:
        """Stop engine `name` ("prefill", "decode", "prefill-1", ... or "proxy") whatever its state (crashed,
        hung, fine), start it again on the same port and KV-event endpoint, and wait until it
        answers /health. The proxy and the telemetry keep their URLs. A restarted engine has
        a new engine id: KV it held is gone. Returns the new handle."""
        if name == "proxy":
            if self.proxy is None:
                raise KeyError("this lab has no proxy (colocated)")
            port = self.proxy.port
            self.proxy.stop()
            self._start_proxy(port)
            return self.proxy  # type: ignore[return-value]
        if name not in self.engines or self._model_path is None:
            raise KeyError(f"no started engine {name!r}; engines: {list(self.engines)}")
        old = self.engines[name]
        old.stop()
        eng = self._engine(name, self._model_path, old.port, old.kv_events_endpoint)
        self.engines[name] = eng
        if self._telemetry is not None:
            self._telemetry.reconnecting(name)
        eng.start()
        eng.wait_ready(timeout)
        if self._telemetry is not None:
            self._telemetry.wait_connected(10.0)
        return eng

    def __enter__(self) -> Lab:
        return self.start(progress=False) if not self.is_running() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        return bool(self.engines) and all(e.is_alive() for e in self.engines.values())

    # ------------------------------------------------------------------ using it
    @property
    def url(self) -> str:
        """Where to send OpenAI requests: the proxy (or the one colocated engine)."""
        if self.proxy is not None:
            return self.proxy.base_url
        return next(iter(self.engines.values())).base_url

    def complete(self, prompt: str | list[int], max_tokens: int = 16, **kw: Any) -> dict:
        """One completion through the proxy (the served model's name is filled in)."""
        import httpx

        body = {"model": self.plan.model.name, "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, **kw}
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120,
                       headers=auth.headers())  # a cluster lab's token, if any
        r.raise_for_status()
        return r.json()

    def telemetry(self) -> Any:
        """The live telemetry of this lab (what the dashboard polls); created once."""
        if self._telemetry is None:
            from labkit.telemetry.live import EngineTap, LiveTelemetry

            taps = []
            for ep in self.plan.engines:
                eng = self.engines[ep.name]
                weights, kv, blocks = _engine_reported(eng, ep)
                taps.append(EngineTap(
                    name=ep.name, role=ep.role, kind=self.kind, base_url=eng.base_url,
                    gpus=ep.gpus, num_blocks=blocks, block_size=ep.config.block_size,
                    model=self.plan.model.name, kv_events_endpoint=eng.kv_events_endpoint,
                    pids=eng.group_pids(), weights_bytes=weights, kv_bytes=kv,
                    kv_bytes_per_block=ep.page_bytes))
            gpus = [{"index": g.index, "name": self.plan.gpu_type.name, "total_bytes": g.total}
                    for g in self.plan.gpus]
            self._telemetry = LiveTelemetry(
                self.kind, taps, proxy_url=self.proxy.base_url if self.proxy else None,
                observer_endpoint=self._observer_endpoint, gpus=gpus, link=self.plan.link)
        return self._telemetry

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Lab {state}: {self.describe()}>"


def _engine_reported(eng: Any, ep: Any) -> tuple[int, int, int]:
    """(weights bytes per GPU, KV bytes per GPU, KV blocks) as the engine's own start-up log
    said them ("Model loading took X GiB", "Available KV cache memory: X GiB", "GPU KV cache
    size: N tokens"; vLLM prints GiB to 2 decimals), the plan's figure where it said nothing.
    The views then show what the engine made, not what labkit planned (a TP=2 engine on an
    H200: 255,300 blocks, planned 253,995)."""
    st = getattr(eng, "startup", None)
    weights = max(ep.weight_bytes)
    kv, blocks = ep.kv_cache_bytes, ep.num_blocks
    if st is not None:
        if st.weights_gib:
            weights = int(st.weights_gib * GiB)
        if st.kv_cache_gib:
            kv = int(st.kv_cache_gib * GiB)
        if st.kv_cache_tokens:
            blocks = int(st.kv_cache_tokens) // ep.config.block_size
    return weights, kv, blocks


def _progress(progress: Progress | bool, title: str) -> Progress:
    """A staged progress reporter: a callable, a tqdm bar (widget in notebooks), or nothing."""
    if callable(progress):
        return progress
    if not progress:
        return lambda stage, frac: None
    from tqdm.auto import tqdm

    if "notebook" not in tqdm.__module__ and not sys.stderr.isatty():
        # A log file or a pipe: a bar's redraws would repeat the title at every stage, so
        # one plain line a stage (the caller has said what starts).
        return lambda stage, frac: print(f"  {frac:4.0%} {stage}", file=sys.stderr, flush=True)
    bar = tqdm(total=100, desc=title, bar_format="{desc}\n{percentage:3.0f}%|{bar}| {postfix}")

    def report(stage: str, frac: float) -> None:
        bar.n = int(frac * 100)
        bar.set_postfix_str(stage)
        bar.refresh()
        if frac >= 1.0:
            bar.close()

    return report


# `Lab.__new__` (which makes a ClusterLab when cluster= is given) would hide __init__'s keywords
# from help() and inspect.signature; the signature a user sees is __init__'s, with cluster.
_init_sig = inspect.signature(Lab.__init__)
Lab.__signature__ = _init_sig.replace(  # type: ignore[attr-defined]
    parameters=[
        *[p for p in list(_init_sig.parameters.values())[1:] if p.kind is not p.VAR_KEYWORD],
        inspect.Parameter("cluster", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation="str | None"),
        *[p for p in _init_sig.parameters.values() if p.kind is p.VAR_KEYWORD],
    ]
)
