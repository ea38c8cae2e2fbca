"""Device visibility: which GPUs this process may use, and what an engine's environment gets.

`detect()` asks NVML (nvidia-ml-py, imported inside the function, never at import time) for
the GPUs CUDA_VISIBLE_DEVICES lets the lab use; with no driver or no GPU it returns a simulated
machine (labkit.hardware.simulated) and says so. It keeps the GPUs the variable names, in its
order, so plan GPU k (a *logical* GPU, 0..n-1) is the k-th entry; `engine_gpu_env()` turns
logical GPUs back into the parent's entries for an engine's environment. The parsing of the
variable is pure (no NVML) and tested without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from labkit.hardware import GPUInfo, Hardware, gpu_type_for, simulated, unknown_gpu_type
from labkit.plan.errors import ConfigError

# ---- CUDA_VISIBLE_DEVICES: the GPUs this lab may use ------------------------------------------
# CUDA's rules (CUDA C Programming Guide, "CUDA Environment Variables"): a comma list of
# integer indices and/or UUIDs as nvidia-smi -L prints them ("GPU-8932f937-...", or
# "MIG-..." for a MIG instance; a unique leading part of a UUID is enough for CUDA); devices
# are enumerated in that order; an empty value hides every GPU; an invalid entry hides itself
# and every entry after it, silently. The lab refuses an invalid entry instead, before
# anything starts. Integer entries are NVML indices (PCI bus order), as vLLM reads them
# (vllm/platforms/cuda.py device_control_id_to_physical_device_id: int(entry) is an NVML
# index, a UUID goes through nvmlDeviceGetHandleByUUID, whole); engines get
# CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA numbers the GPUs the same way.
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
_NO_GPU = ("", "-1")  # "-1": the usual way to hide every GPU (an invalid first entry)
_FIX = "use indices or UUIDs that `nvidia-smi -L` lists, comma-separated, e.g. {eg}"


def _config_error(problem: str, fix: str) -> Exception:
    return ConfigError(problem, fix)


def visible_entries(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES in `environ` (default: this process's), stripped;
    None when it is unset (every GPU), [] when it hides every GPU ("" or "-1").

    Raises:
        ConfigError: an entry (empty ones too) is neither an integer >= 0 nor a GPU-/MIG- UUID.
    """
    env = os.environ if environ is None else environ
    raw = env.get(VISIBLE_ENV)
    if raw is None:
        return None
    if raw.strip() in _NO_GPU:
        return []
    entries = [e.strip() for e in raw.split(",")]
    for e in entries:
        if not (e.isdigit() or (e.startswith(("GPU-", "MIG-")) and len(e) > 4)):
            raise _config_error(
                f"{VISIBLE_ENV}={raw!r}: entry {e!r} names no GPU (CUDA would silently drop "
                f"it and every entry after it)", _FIX.format(eg=f"{VISIBLE_ENV}=0,1"))
    return entries


def resolve_visible(entries: Sequence[str] | None, uuids: Sequence[str],
                    mig: Mapping[str, int] | None = None) -> list[int]:
    """NVML indices (physical) of the GPUs `entries` name, in their order.

    Args:
        entries: visible_entries(); None = every GPU.
        uuids: NVML's GPU UUIDs, uuids[i] of NVML GPU i.
        mig: MIG instance UUID -> NVML index of its GPU (only needed for MIG- entries).

    Raises:
        ConfigError: an entry names no GPU, an abbreviated UUID matches several GPUs or is
            abbreviated at all (vLLM looks UUIDs up whole), or two entries name one GPU.
    """
    if entries is None:
        return list(range(len(uuids)))
    raw = ",".join(entries)
    eg = f"{VISIBLE_ENV}={','.join(str(i) for i in range(min(2, len(uuids))))}"
    out: list[int] = []
    for e in entries:
        p = _resolve_one(e, uuids, mig or {}, raw, eg)
        if p in out:
            raise _config_error(f"{VISIBLE_ENV}={raw!r} names physical GPU {p} twice ({e!r})",
                                "name each GPU once")
        out.append(p)
    return out


def _resolve_one(e: str, uuids: Sequence[str], mig: Mapping[str, int], raw: str,
                 eg: str) -> int:
    """The NVML index one entry names (see resolve_visible)."""
    n = len(uuids)
    if e.isdigit():
        if int(e) < n:
            return int(e)
        seen = f"NVML sees {n} GPU(s): 0..{n - 1}" if n else "NVML sees no GPU"
        raise _config_error(f"{VISIBLE_ENV}={raw!r}: GPU {e} does not exist ({seen})",
                            _FIX.format(eg=eg))
    if e in mig:
        return mig[e]
    whole = e[4:].split("/")[0] if e.startswith("MIG-GPU-") else e  # old MIG-GPU-<uuid>/gi/ci
    hits = [i for i, u in enumerate(uuids) if u.startswith(whole)]
    if len(hits) == 1 and (uuids[hits[0]] == whole or e.startswith("MIG-GPU-")):
        return hits[0]
    if hits:  # CUDA takes a unique leading part of a UUID; vLLM looks UUIDs up whole
        raise _config_error(f"{VISIBLE_ENV}={raw!r}: {e!r} is an abbreviated UUID (of GPU(s) "
                            f"{hits}); vLLM needs the whole UUID",
                            f"write {' or '.join(uuids[i] for i in hits)}")
    raise _config_error(f"{VISIBLE_ENV}={raw!r}: no GPU has UUID {e!r} (NVML sees {n} GPU(s))",
                        _FIX.format(eg=eg))


def cuda_visible_devices(gpus: Iterable[int], environ: Mapping[str, str] | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for an engine on logical GPUs `gpus` (in that order): the parent's
    entries at those positions ("2" for logical 0 under CUDA_VISIBLE_DEVICES=2,3), or the
    indices themselves where the parent sets none.

    Raises:
        ConfigError: a logical GPU beyond the parent's entries.
    """
    gpus = [int(g) for g in gpus]
    entries = visible_entries(environ)
    if entries is None:
        return ",".join(map(str, gpus))
    if any(not 0 <= g < len(entries) for g in gpus):
        raw = ",".join(entries)
        raise _config_error(
            f"the plan puts an engine on GPU(s) {gpus}, but {VISIBLE_ENV}={raw!r} lets this "
            f"process use {len(entries)} GPU(s) (logical 0..{len(entries) - 1})",
            f"plan for num_gpus <= {len(entries)}, or name more GPUs in {VISIBLE_ENV}")
    return ",".join(entries[g] for g in gpus)


def engine_gpu_env(gpus: Iterable[int], environ: Mapping[str, str] | None = None
                   ) -> dict[str, str]:
    """What an engine on logical GPUs `gpus` needs in its environment: CUDA_VISIBLE_DEVICES
    (cuda_visible_devices) and CUDA_DEVICE_ORDER=PCI_BUS_ID (integer entries are NVML's
    PCI-ordered indices; CUDA's default FASTEST_FIRST may number mixed GPUs otherwise)."""
    return {VISIBLE_ENV: cuda_visible_devices(gpus, environ), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def detect() -> Hardware:
    """The GPUs this process may use, through NVML; a simulated machine with no GPU when NVML
    fails or CUDA_VISIBLE_DEVICES hides every GPU.

    Raises:
        ConfigError: CUDA_VISIBLE_DEVICES has an entry that names no GPU (before anything
            starts; CUDA itself would silently drop it and every entry after it).
    """
    raw = os.environ.get(VISIBLE_ENV)
    if raw is not None and raw.strip() in _NO_GPU:
        return replace(simulated(0), note=f"no GPU: {VISIBLE_ENV}={raw!r} hides every GPU")
    try:
        import pynvml
    except ImportError:
        return replace(simulated(0), note="no GPU: nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return replace(simulated(0), note=f"no GPU: NVML unavailable ({exc})")
    try:
        entries = visible_entries()
        try:
            every = [_gpu_info(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
            mig = _mig_devices(pynvml, every) if _wants_mig(entries) else {}
        except Exception as exc:
            return replace(simulated(0), note=f"no GPU: NVML query failed ({exc})")
        physical = resolve_visible(entries, [g.uuid for g in every], _mig_parents(mig))
        named = entries or [""] * len(physical)
        gpus = [replace(mig.get(named[k]) or every[p], index=k, physical=p)
                for k, p in enumerate(physical)]
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if not gpus:
        return replace(simulated(0), note="no GPU found by NVML")
    first = gpus[0]
    kind = first.gpu_type or unknown_gpu_type(first)
    note = f"{len(gpus)} x {first.name}"
    if entries is not None:
        note += (f" ({VISIBLE_ENV}={raw}: physical GPU(s) "
                 f"{', '.join(str(g.physical) for g in gpus)} of {len(every)})")
    return Hardware(gpus, False, kind, note=note)


def _gpu_info(nv: Any, i: int) -> GPUInfo:
    """NVML GPU `i` (index and physical both i; detect() renumbers the visible ones)."""
    h = nv.nvmlDeviceGetHandleByIndex(i)
    name = _text(nv.nvmlDeviceGetName(h))
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    cc = tuple(nv.nvmlDeviceGetCudaComputeCapability(h))
    return GPUInfo(i, name, _text(nv.nvmlDeviceGetUUID(h)), int(mem.total), int(mem.used),
                   (int(cc[0]), int(cc[1])), gpu_type_for(name), physical=i)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _wants_mig(entries: Sequence[str] | None) -> bool:
    return any(e.startswith("MIG-") and not e.startswith("MIG-GPU-") for e in entries or ())


def _mig_devices(nv: Any, gpus: Sequence[GPUInfo]) -> dict[str, GPUInfo]:
    """MIG instance UUID -> the instance (its own memory, its GPU's physical index; no
    datasheet type: a slice has a share of the peaks), for GPUs in MIG mode."""
    out: dict[str, GPUInfo] = {}
    for g in gpus:
        h = nv.nvmlDeviceGetHandleByIndex(g.physical)
        try:
            slots = int(nv.nvmlDeviceGetMaxMigDeviceCount(h))
        except Exception:  # no MIG support on this GPU
            continue
        for j in range(slots):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except Exception:  # an empty slot
                continue
            uuid, mem = _text(nv.nvmlDeviceGetUUID(mh)), nv.nvmlDeviceGetMemoryInfo(mh)
            out[uuid] = replace(g, name=f"{g.name} (MIG)", uuid=uuid, gpu_type=None,
                                memory_total=int(mem.total), memory_used=int(mem.used))
    return out


def _mig_parents(mig: Mapping[str, GPUInfo]) -> dict[str, int]:
    return {u: g.physical for u, g in mig.items() if g.physical is not None}


def visible_physical(nv: Any, environ: Mapping[str, str] | None = None) -> list[int]:
    """NVML indices of the GPUs CUDA_VISIBLE_DEVICES lets this process use, in its order
    (position k = logical GPU k). `nv` is pynvml, initialised; raises as resolve_visible."""
    entries = visible_entries(environ)
    count = int(nv.nvmlDeviceGetCount())
    if entries is None:
        return list(range(count))
    uuids = [_text(nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    mig = _mig_devices(nv, [_gpu_info(nv, i) for i in range(count)]) if _wants_mig(entries) \
        else {}
    return resolve_visible(entries, uuids, _mig_parents(mig))
