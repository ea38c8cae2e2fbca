"""CUDA_VISIBLE_DEVICES: which GPUs the lab may use, and what an engine's environment gets.

Pure parsing of the variable (no NVML): labkit.hardware.detect() resolves the entries against
the GPUs NVML sees; engines get the parent's entries back for their logical GPUs
(`engine_gpu_env`). Re-exported by labkit.hardware.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

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
    """labkit.config.ConfigError (imported late: config imports this module)."""
    from labkit.config import ConfigError

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
