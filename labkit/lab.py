"""Lab: one call starts a prefill/decode pair and the PD proxy, real or simulated.

    with labkit.Lab(model="lab-1b", chunk=512) as lab:   # real vLLM where GPUs + vLLM exist
        lab.complete("Hello", max_tokens=16)              # through the proxy
        labkit.viz.Dashboard(lab.telemetry()).show()

`mode="auto"` (the default, or $LABKIT_MODE) picks real vLLM where GPUs and vLLM are present
and the simulator otherwise, and says which: notebooks never branch on the hardware. Every
engine and the proxy is a subprocess in its own process group bound to 127.0.0.1; `stop()`,
the context manager, interpreter exit and the parent's death (PR_SET_PDEATHSIG) all end them.
"""

from __future__ import annotations

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

from labkit.engines.base import EngineHandle
from labkit.plan import ConfigError, EngineConfig, PDConfig, Plan, validate
from labkit.plan.ports import free_port
from labkit.vocab import GiB, run_root

Progress = Callable[[str, float], None]
MODES = ("auto", "sim", "vllm")


class ProxyProcess(EngineHandle):
    """The PD proxy (`python -m labkit.pd`) as a subprocess in its own process group."""

    def __init__(self, prefill_urls: list[str], decode_urls: list[str], connector: str,
                 read_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__("proxy", role="proxy", **kwargs)
        self.prefill_urls, self.decode_urls, self.connector = prefill_urls, decode_urls, connector
        self.read_timeout = read_timeout

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "labkit.pd", "--host", self.host, "--port", str(self.port),
                "--connector", self.connector]
        for u in self.prefill_urls:
            args += ["--prefill", u]
        for u in self.decode_urls:
            args += ["--decode", u]
        if self.read_timeout is not None:
            args += ["--read-timeout", f"{self.read_timeout:g}"]
        return args


def default_run_dir() -> Path:
    return run_root() / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def build_config(model: str = "lab-1b", *, chunk: int | None = None, tp: int = 1, pp: int = 1,
                 prefill_tp: int | None = None, decode_tp: int | None = None,
                 prefill_pp: int | None = None, decode_pp: int | None = None,
                 kv_cache_dtype: str = "auto", block_size: int = 16,
                 max_num_seqs: int = 256, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 num_gpu_blocks: int | None = None, connector: str = "auto",
                 num_gpus: int | None = None, gpu_type: str | None = None,
                 colocated: bool = False, kv_offloading_size_gb: float | None = None) -> PDConfig:
    """A PDConfig from the handful of knobs a learner turns."""
    common = dict(model=model, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                  max_num_batched_tokens=chunk, max_num_seqs=max_num_seqs,
                  max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                  num_gpu_blocks_override=num_gpu_blocks,
                  kv_offloading_size_gb=kv_offloading_size_gb)
    prefill = EngineConfig(role="prefill", tp=prefill_tp or tp, pp=prefill_pp or pp, **common)
    decode = EngineConfig(role="decode", tp=decode_tp or tp, pp=decode_pp or pp, **common)
    return PDConfig(prefill=prefill, decode=decode, connector=connector,  # type: ignore[arg-type]
                    num_gpus=num_gpus, gpu_type=gpu_type, colocated=colocated)


class Lab:
    """A running (or ready to run) PD pair + proxy.

    Args:
        config: a PDConfig; or leave it None and pass `build_config`'s keywords.
        mode: "auto" | "sim" | "vllm" (default $LABKIT_MODE or "auto").
        run_dir: where logs, the model directory and connector storage go.
        speed: simulated engines only: simulated seconds per wall second (1.0 = real time;
            0 = as fast as possible, for tests and benchmarks).
        read_timeout: seconds the proxy waits for an engine's answer (for a stream: between
            two chunks) before it answers 504; None: the proxy's default (600 s).
        kv_load_timeout: simulated decode engines only: seconds a NIXL read waits for the
            prefill engine's handshake before the request fails (vLLM's 5 s).
    """

    def __init__(self, config: PDConfig | None = None, *, mode: str | None = None,
                 run_dir: str | Path | None = None, speed: float = 1.0, observe: bool = True,
                 read_timeout: float | None = None, kv_load_timeout: float | None = None,
                 **knobs: Any) -> None:
        self.mode = (mode or os.environ.get("LABKIT_MODE") or "auto").lower()
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {MODES}",
                              "use mode='auto' (real vLLM where possible), 'sim' or 'vllm'")
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) \
                or not math.isfinite(speed) or speed < 0:
            raise ConfigError(f"speed={speed!r} is not a simulated-seconds-per-wall-second factor",
                              "use a positive number (1.0 = real time) or 0 (as fast as possible)")
        self.config = config if config is not None else build_config(**knobs)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        self.speed = speed
        self.observe = observe
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

    # ------------------------------------------------------------------ planning
    def _plan(self) -> Plan:
        from labkit import hardware
        from labkit.plan import detect

        if self.mode == "sim":
            hw = hardware.simulated(self.config.num_gpus or 2, self.config.gpu_type or "h100")
            plan = validate(self.config, hw)
            return replace(plan, kind="sim")
        plan = validate(self.config)
        if self.mode == "vllm" and plan.kind != "vllm":
            why = ("no NVIDIA GPU was found" if not detect().gpus
                   else "vLLM is not importable")
            raise ConfigError(f"mode='vllm' asked for real engines, but {why}",
                              "install labkit[gpu] on a GPU machine, or use mode='auto'/'sim'")
        return plan

    def describe(self) -> str:
        """One line saying what runs: real or simulated, where, with which connector."""
        what = ("REAL vLLM" if self.kind == "vllm" else "SIMULATED")
        gpus = f"{self.plan.num_gpus}x {self.plan.gpu_type.name}"
        names = ", ".join(f"{e.name} on GPU {e.gpus}" for e in self.plan.engines)
        return f"{what} PD pair of {self.plan.model.name} on {gpus} ({names}); " \
               f"KV connector: {self.plan.connector or 'none (colocated)'}"

    # ------------------------------------------------------------------ start / stop
    def start(self, progress: Progress | bool = True, timeout: float = 900.0) -> Lab:
        """Start the engines and the proxy; return when all answer /health."""
        report = _progress(progress, self.describe())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            report("preparing the model directory", 0.05)
            model_dir = self._model_path = self._model_dir()
            self._observer_endpoint = f"tcp://127.0.0.1:{free_port()}" if self.observe else None
            report("starting engines", 0.1)
            self.engines = {ep.name: self._engine(ep.name, model_dir) for ep in self.plan.engines}
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
            report("engines ready; starting the PD proxy", 0.85)
            self._start_proxy()
            if self.observe:
                # Bind the readers now: the engines' observer sockets reconnect within ~0.1 s,
                # so nothing a first request does is missed.
                self.telemetry()
                time.sleep(0.3)
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
        port = port or free_port()
        kv_ep = kv_ep or f"tcp://127.0.0.1:{free_port()}"
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
                              env=env_for(name, self.plan))
        from labkit.engines.sim.process import SimEngineProcess

        return SimEngineProcess(
            name, plan=self.plan, plan_key=name, run_dir=self.run_dir, speed=self.speed,
            fast=self.speed == 0, port=port, log_path=log, kv_events_endpoint=kv_ep,
            observer_endpoint=self._observer_endpoint, served_model_name=self.plan.model.name,
            kv_load_timeout=self.kv_load_timeout)

    def _start_proxy(self, port: int | None = None) -> None:
        if self.plan.connector is None:  # colocated: no proxy, talk to the engine
            return
        pre = [e.base_url for e in self.engines.values() if e.role == "prefill"]
        dec = [e.base_url for e in self.engines.values() if e.role == "decode"]
        self.proxy = ProxyProcess(pre, dec, self.plan.connector, self.read_timeout,
                                  kind=self.kind,  # type: ignore[arg-type]
                                  port=port, log_path=self.run_dir / "proxy.log")
        self.proxy.start()
        self.proxy.wait_ready(60)

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
        """Stop engine `name` ("prefill", "decode" or "proxy") whatever its state (crashed,
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
        eng.start()
        eng.wait_ready(timeout)
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
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
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
                    pids=eng.group_pids(), weights_bytes=weights, kv_bytes=kv))
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

    bar = tqdm(total=100, desc=title, bar_format="{desc}\n{percentage:3.0f}%|{bar}| {postfix}")

    def report(stage: str, frac: float) -> None:
        bar.n = int(frac * 100)
        bar.set_postfix_str(stage)
        bar.refresh()
        if frac >= 1.0:
            bar.close()

    return report
