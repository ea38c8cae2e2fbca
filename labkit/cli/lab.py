"""The `labkit` subcommands that start things: up, status, down, demo, dashboard.

Registered into `labkit.cli` (its COMMANDS table). Every value reaches a subprocess as an
argument list; every server binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from labkit.cli.plan import EXIT_CONFIG_ERROR, add_config_flags, config_from_args, error_line
from labkit.plan import ConfigError


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sim", dest="mode", action="store_const", const="sim",
                      help="simulated engines (no GPU needed)")
    mode.add_argument("--vllm", dest="mode", action="store_const", const="vllm",
                      help="real vLLM engines on this machine's GPUs")
    mode.add_argument("--auto", dest="mode", action="store_const", const="auto",
                      help="real vLLM where GPUs and vLLM are present, else simulated (default)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="simulated seconds per wall second (simulator only; 0 = as fast as possible)")
    p.add_argument("--run-dir", type=Path, help="where logs and connector storage go")
    p.add_argument("--routing-policy", choices=["round-robin", "least-loaded", "kv-aware"],
                   default="round-robin", help="xPyD: how the proxy picks each request's "
                   "engines (switch live: POST /router on the proxy)")


def make_lab(a: argparse.Namespace, owner: str):  # -> labkit.lab.Lab
    """The Lab the flags describe (raises ConfigError before anything starts)."""
    from labkit.lab import Lab

    if a.run_dir is not None and a.run_dir.exists() and not a.run_dir.is_dir():
        raise ConfigError(f"--run-dir {a.run_dir} is a file, not a directory",
                          "name a directory (it is created if missing), or leave --run-dir out")
    return Lab(config_from_args(a), mode=a.mode or None, run_dir=a.run_dir, speed=a.speed,
               port=getattr(a, "port", None), owner=owner,
               read_timeout=getattr(a, "read_timeout", None),
               routing_policy=getattr(a, "routing_policy", "round-robin"))


# ---- labkit up / status / down -------------------------------------------------------------
def register_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a prefill/decode pair and the PD proxy")
    add_config_flags(p)
    _add_mode_flags(p)
    p.add_argument("--port", type=int,
                   help="port of the OpenAI endpoint (the PD proxy) on 127.0.0.1 "
                        "(default: a free one)")
    p.add_argument("--read-timeout", type=float, metavar="S",
                   help="seconds the proxy waits for an engine's answer (for a stream: between "
                        "two chunks) before it answers 504 (default 600)")
    p.add_argument("--detach", action="store_true",
                   help="return once ready; `labkit down` stops it")
    p.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_up, mode=None)


def cmd_up(a: argparse.Namespace) -> int:
    from labkit import service

    lab = make_lab(a, owner="labkit up")  # a ConfigError: `labkit.cli.main` says it
    if a.detach and not a.foreground:
        argv = [x for x in sys.argv[2:] if x != "--detach"] if sys.argv[1:2] == ["up"] else []
        argv = [x for i, x in enumerate(argv)
                if x != "--run-dir" and (i == 0 or argv[i - 1] != "--run-dir")]
        try:
            st = service.up_detached(argv, lab.run_dir)
        except (RuntimeError, TimeoutError) as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            print(error_line(f"labkit up: the lab did not start ({last})",
                             f"read {lab.run_dir}/supervisor.log"), file=sys.stderr)
            return 1
        print(service.format_state(st))
        print("`labkit status` shows it; `labkit down` stops it.")
        return 0
    if not a.quiet:
        print(lab.describe(), flush=True)
    return service.run_foreground(lab, quiet=a.quiet)


def register_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the labs running on this machine, with their health")
    p.set_defaults(func=cmd_status)


def cmd_status(a: argparse.Namespace) -> int:
    from labkit import service

    labs = service.running_labs()
    if not labs:
        print("no lab is running")
        return 0
    for st in labs:
        print(service.format_state(st, with_health=True))
        print(f"  started : by {st.get('owner', 'labkit up')} (pid "
              f"{st.get('pid', st.get('supervisor_pid'))})")
    return 0


def register_down(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop every lab `labkit status` lists (a notebook's or "
                                    "the dashboard's lab: its engines; the kernel lives on)")
    p.set_defaults(func=cmd_down)


def cmd_down(a: argparse.Namespace) -> int:
    from labkit import service

    n = service.down()
    print(f"stopped {n} lab(s)" if n else "no lab was running")
    return 0


# ---- labkit demo ----------------------------------------------------------------------------
def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the lab's main job in a terminal: start a PD pair, send "
                                    "requests, show blocks, KV transfer and latency, stop")
    add_config_flags(p)
    _add_mode_flags(p)
    p.add_argument("--requests", type=int, default=12, help="requests after the first one")
    p.set_defaults(func=cmd_demo, mode=None)


def cmd_demo(a: argparse.Namespace) -> int:
    from labkit.demo import run_demo

    if a.requests < 0:
        raise ConfigError(f"--requests {a.requests} is negative", "use --requests 0 or more")
    import httpx

    lab = make_lab(a, owner="labkit demo")
    try:
        return run_demo(lab, num_requests=a.requests)
    except httpx.HTTPStatusError as exc:
        body = exc.response.text.strip().splitlines()
        print(error_line(f"a request failed: HTTP {exc.response.status_code} "
                         f"{body[0][:200] if body else ''}",
                         f"the engines' logs are in {lab.run_dir}"), file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(error_line(f"a request failed: {exc!r}", f"the engines' logs are in {lab.run_dir}"),
              file=sys.stderr)
        return 1


# ---- labkit dashboard -----------------------------------------------------------------------
def register_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="serve the live dashboard notebook with Voila "
                                         "(http://127.0.0.1:PORT)")
    p.add_argument("--port", type=int, default=8866)
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--replay", metavar="NAME",
                   help="play a recording instead of starting a lab: a .lkrec file or a shipped "
                        "name such as real-h200x2-nixl (`labkit replay --list`)")
    p.set_defaults(func=cmd_dashboard)


def dashboard_notebook() -> Path:
    """The dashboard's own page (made for Voila: nothing to run by hand); notebook 08 is the
    lesson around the same dashboard."""
    return Path(__file__).resolve().parents[1] / "data" / "dashboard.ipynb"


OFFLINE_TEMPLATE = "labkit-offline"
# Kernels of closed pages go. The dashboard's 4 Hz updates keep a kernel busy, so the culler
# alone never fires: a closed page stops sending its heartbeat, and PAGE_TIMEOUT_S later the
# kernel stops its lab and its updates (labkit/teach/page.py); the idle kernel is then
# culled (no page connected, idle this long, checked this often). A reloaded page's new
# lab takes the old one over at once anyway.
PAGE_TIMEOUT_S = 90  # > a minute: Chromium runs a background tab's timers once a minute
CULL = ["--MappingKernelManager.cull_idle_timeout=60",
        "--MappingKernelManager.cull_interval=15",
        "--MappingKernelManager.cull_connected=False",
        # A kernel that ends (a reloaded page's new kernel takes its lab over and ends it)
        # stays ended: restarted, it would hold no page and no lab, only memory.
        "--KernelManager.autorestart=False"]


def offline_template(root: Path) -> Path:
    """A Voila template under `root` (pass it as JUPYTER_PATH) that is Voila's "lab" template
    without its two Font Awesome <link>s to cdn.jsdelivr.net: Voila's own bundle already
    carries Font Awesome 5 (css and fonts), so every asset is served by the local server and
    the page works offline, behind a workshop room's firewall."""
    from jupyter_core.paths import jupyter_path

    for base in jupyter_path("voila", "templates"):
        src = Path(base) / "lab" / "index.html.j2"
        if src.exists():
            break
    else:
        raise FileNotFoundError("Voila's lab template is not installed")
    text = "\n".join(line for line in src.read_text().splitlines()
                     if "cdn.jsdelivr.net" not in line)
    out = root / "voila" / "templates" / OFFLINE_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html.j2").write_text(text + "\n")
    (out / "conf.json").write_text('{"base_template": "lab"}\n')
    return root


def voila_args(notebook: str | Path, port: int, offline: bool = True) -> list[str]:
    """The Voila command line that serves `notebook` on 127.0.0.1:`port` (this interpreter's
    Voila, so its kernel sees the same packages); `labkit dashboard` and the e2e test use it.
    With `offline`, run it with `voila_env()`: the template that fetches nothing remotely."""
    args = [sys.executable, "-m", "voila", str(notebook), f"--port={port}",
            "--Voila.ip=127.0.0.1", "--theme=light", *CULL]
    return [*args, f"--template={OFFLINE_TEMPLATE}"] if offline else args


def voila_env(root: Path | None = None, replay: str | None = None) -> dict[str, str]:
    """The environment for `voila_args(..., offline=True)`: JUPYTER_PATH finds the template;
    the kernels learn the page timeout and the recording to play (`replay`), if any."""
    import os
    import tempfile

    from labkit.teach.page import PAGE_TIMEOUT_ENV, REPLAY_ENV

    root = offline_template(root or Path(tempfile.mkdtemp(prefix="labkit-voila-")))
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), env.get("JUPYTER_PATH")]))
    env.setdefault(PAGE_TIMEOUT_ENV, str(PAGE_TIMEOUT_S))
    if replay:
        env[REPLAY_ENV] = replay
    return env


def cmd_dashboard(a: argparse.Namespace) -> int:
    if importlib.util.find_spec("voila") is None:
        print("labkit dashboard: Voila is not installed (pip install 'labkit[lab]')",
              file=sys.stderr)
        return 1
    replay = None
    if a.replay:
        from labkit.telemetry.replay import recordings, resolve

        try:
            replay = str(resolve(a.replay).resolve())
        except FileNotFoundError:
            print(error_line(f"no recording {a.replay!r}",
                             f"name a .lkrec file or one of: {', '.join(recordings())}"),
                  file=sys.stderr)
            return EXIT_CONFIG_ERROR
    args = voila_args(dashboard_notebook(), a.port)
    if a.no_browser:
        args.append("--no-browser")
    proc = subprocess.Popen(args, env=voila_env(replay=replay))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # SIGTERM stops Voila, its kernels and their labs
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_tree(proc.pid)


def stop_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM `pid` and every descendant (Voila's kernels run in their own sessions, their
    labs' engines in theirs), then SIGKILL whatever is left after `timeout` s."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_up, register_status, register_down, register_demo, register_dashboard]


# ---- labkit bench ---------------------------------------------------------------------------
def register_bench(sub: argparse._SubParsersAction) -> None:
    from labkit.bench.__main__ import add_arguments

    p = sub.add_parser("bench", help="run a workload against PD vs colocated, chunk sizes, TP or "
                                     "KV dtype and print a table (real or SIMULATED, labelled)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    from labkit.bench.__main__ import run

    return int(run(a) or 0)


COMMANDS.append(register_bench)


# ---- labkit calibrate -----------------------------------------------------------------------
def register_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="on a GPU machine: probe a real vLLM engine and write "
                                         "the simulator's cost constants for this GPU type",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="see `python -m labkit.bench.calibrate --help`")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(a: argparse.Namespace) -> int:
    return calibrate(a.args)


def calibrate(argv: list[str]) -> int:
    """`labkit calibrate ARGS`: measuring needs a GPU and vLLM (or --url / --probes)."""
    from labkit.bench.calibrate import main as calibrate_main

    if not any(x.startswith(("--url", "--probes", "-h", "--help")) for x in argv):
        from labkit.hardware import vllm_available
        from labkit.plan import detect

        if not detect().gpus or not vllm_available():
            why = "no NVIDIA GPU was found" if not detect().gpus else "vLLM is not importable"
            raise ConfigError(f"labkit calibrate measures a real vLLM engine, but {why}",
                              "run it on a GPU machine with labkit[gpu], or refit stored probes "
                              "with --probes FILE (or --url URL of a running engine)")
    try:
        return int(calibrate_main(argv) or 0)
    except SystemExit as exc:  # its own argparse: usage on stderr already
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_CONFIG_ERROR


COMMANDS.append(register_calibrate)
