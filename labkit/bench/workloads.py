"""Seeded benchmark workloads: who arrives when, with how long a prompt, asking for how much.

A `Workload` is a list of `Request` specs (arrival_s, prompt_len, output_len, prefix_id)
and a seed; the same (generator, arguments, seed) gives the same workload on every machine.
Prompt token ids are made from the seed too (`Workload.token_ids`), so nothing is
downloaded and the prefix cache only hits where the workload means it to (shared prefixes).

    wl = sharegpt(200, rate=8.0, seed=0)          # lognormal lengths, Poisson arrivals
    wl.stats()                                    # mean/median lengths, offered rate
    SimCluster(...).run(wl.items())               # in-process
    run_load(url, wl)                             # over HTTP (labkit.bench.loadgen)

ShareGPT-like lengths: the means are the ShareGPT statistics published with vLLM (Kwon et
al., SOSP 2023, Table 1: 161.31 input and 337.99 output tokens on average); the spreads
(sigma of the log) are this module's assumption, picked for the long right tails of that
paper's histograms. Lengths are then pruned like vLLM's benchmark pruning of ShareGPT
(`is_valid_sequence` in vllm/benchmarks/datasets.py: at least 4 tokens each, prompt at most
1,024, prompt + output at most 2,048) by redrawing.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SHAREGPT_MEAN_PROMPT = 161.31  # vLLM paper (SOSP'23), Table 1
SHAREGPT_MEAN_OUTPUT = 337.99
SHAREGPT_SIGMA_PROMPT = 1.0  # assumption (see module docstring)
SHAREGPT_SIGMA_OUTPUT = 0.9
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048  # vLLM's ShareGPT pruning
FIRST_TOKEN_ID = 1000  # prompts avoid the low ids where tokenizers keep special tokens


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload.

    `prefix_id` names the shared system prompt the request starts with (None: none);
    its first `prefix_len` prompt tokens are that prompt's.
    """

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_id: int | None = None
    prefix_len: int = 0

    def as_item(self) -> tuple[float, int, int, int | None, int]:
        """SimCluster's work item: (arrival_s, prompt_len, output_len, prefix_id, prefix_len)."""
        return (self.arrival_s, self.prompt_len, self.output_len, self.prefix_id, self.prefix_len)


@dataclass
class Workload:
    """Requests sorted by arrival, plus how they were made (name, seed, parameters)."""

    name: str
    requests: list[Request]
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def items(self) -> list[tuple[float, int, int, int | None, int]]:
        """Work items for `SimCluster.run`."""
        return [r.as_item() for r in self.requests]

    def token_ids(self, vocab_size: int = 32000) -> list[list[int]]:
        """Prompt token ids per request, deterministic per seed.

        Every prompt differs from every other from its first token on (so no two share a
        KV block by chance); a request with a `prefix_id` starts with that prefix's tokens.
        """
        rng = np.random.default_rng([self.seed, 0x70C])
        hi = max(FIRST_TOKEN_ID + 2, vocab_size)
        longest: dict[int, int] = {}
        for r in self.requests:
            if r.prefix_id is not None:
                longest[r.prefix_id] = max(longest.get(r.prefix_id, 0), r.prefix_len)
        prefixes = {pid: rng.integers(FIRST_TOKEN_ID, hi, size=n) for pid, n in sorted(longest.items())}
        out = []
        for i, r in enumerate(self.requests):
            tokens = rng.integers(FIRST_TOKEN_ID, hi, size=r.prompt_len)
            # A unique first token: prompts never share a first block by chance.
            tokens[0] = FIRST_TOKEN_ID + i % (hi - FIRST_TOKEN_ID)
            if r.prefix_id is not None:
                k = min(r.prefix_len, r.prompt_len - 1)
                tokens[:k] = prefixes[r.prefix_id][:k]
            out.append(tokens.tolist())
        return out

    def scaled(self, rate: float) -> Workload:
        """The same requests re-timed to Poisson arrivals at `rate` (same seed)."""
        arrivals = poisson_arrivals(len(self.requests), rate, _rng(self.seed, "arrivals"))
        reqs = [replace(r, arrival_s=a) for r, a in zip(self.requests, arrivals, strict=True)]
        return Workload(self.name, reqs, self.seed, {**self.params, "rate": rate})

    def stats(self) -> dict[str, float]:
        """Mean / median / p99 lengths, the offered rate and the shared-prefix share."""
        p = np.array([r.prompt_len for r in self.requests], dtype=float)
        o = np.array([r.output_len for r in self.requests], dtype=float)
        t = np.array([r.arrival_s for r in self.requests], dtype=float)
        span = float(t.max() - t.min()) if len(t) > 1 else 0.0
        shared = sum(r.prefix_id is not None for r in self.requests)
        return {
            "num_requests": float(len(p)),
            "prompt_mean": float(p.mean()), "prompt_p50": float(np.median(p)),
            "prompt_p99": float(np.percentile(p, 99)),
            "output_mean": float(o.mean()), "output_p50": float(np.median(o)),
            "output_p99": float(np.percentile(o, 99)),
            "duration_s": span,
            "offered_rate": (len(t) - 1) / span if span > 0 else math.inf,
            "shared_prefix_fraction": shared / len(p) if len(p) else 0.0,
        }


# ------------------------------------------------------------------ arrivals
def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per (seed, purpose): lengths and arrivals do not interfere."""
    return np.random.default_rng([seed, sum(ord(c) << (8 * (i % 4)) for i, c in enumerate(stream))])


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Arrival times of a Poisson process at `rate` req/s starting at 0 (inf: all at 0)."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be > 0 (or inf), got {rate}")
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps).tolist()


def burst_arrivals(n: int, burst_size: int, interval_s: float) -> list[float]:
    """`burst_size` requests at once every `interval_s` seconds."""
    if burst_size < 1:
        raise ValueError("burst_size must be >= 1")
    return [(i // burst_size) * interval_s for i in range(n)]


def _arrivals(n: int, rate: float, seed: int, burst: tuple[int, float] | None) -> list[float]:
    if burst is not None:
        return burst_arrivals(n, burst[0], burst[1])
    return poisson_arrivals(n, rate, _rng(seed, "arrivals"))


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Lognormal draws with the given MEAN (mu = ln(mean) - sigma^2 / 2)."""
    mu = math.log(mean) - sigma * sigma / 2
    return rng.lognormal(mu, sigma, size=size)


def _pruned_draw(rng: np.random.Generator, k: int, mean_p: float, mean_o: float, sigma_p: float,
                 sigma_o: float) -> list[tuple[int, int]]:
    """k lognormal (prompt, output) draws, kept if vLLM's ShareGPT pruning keeps them."""
    ps = np.rint(_lognormal(rng, mean_p, sigma_p, k)).astype(int)
    os_ = np.rint(_lognormal(rng, mean_o, sigma_o, k)).astype(int)
    keep = (ps >= MIN_LEN) & (os_ >= MIN_LEN) & (ps <= MAX_PROMPT_LEN) & (ps + os_ <= MAX_TOTAL_LEN)
    return list(zip(ps[keep].tolist(), os_[keep].tolist(), strict=True))


@functools.lru_cache(maxsize=16)
def _prepruning_means(mean_p: float, mean_o: float, sigma_p: float, sigma_o: float
                      ) -> tuple[float, float]:
    """Pruning cuts the long tails, so draw from larger means: a few fixed-point steps on a
    fixed-seed sample find the pre-pruning means whose pruned means are the asked ones."""
    raw_p, raw_o = mean_p, mean_o
    for _ in range(4):
        kept = np.array(_pruned_draw(np.random.default_rng(12345), 50_000, raw_p, raw_o,
                                     sigma_p, sigma_o), dtype=float)
        raw_p *= mean_p / kept[:, 0].mean()
        raw_o *= mean_o / kept[:, 1].mean()
    return raw_p, raw_o


def _build(name: str, lens: Sequence[tuple[int, int]], arrivals: Sequence[float], seed: int,
           params: dict[str, Any], prefixes: Sequence[tuple[int | None, int]] | None = None
           ) -> Workload:
    prefixes = prefixes or [(None, 0)] * len(lens)
    reqs = [Request(float(a), int(p), int(o), pid, plen)
            for a, (p, o), (pid, plen) in zip(arrivals, lens, prefixes, strict=True)]
    return Workload(name, reqs, seed, params)


# ------------------------------------------------------------------ generators
def fixed(num_requests: int, prompt_len: int, output_len: int, *, rate: float = math.inf,
          seed: int = 0, burst: tuple[int, float] | None = None, name: str | None = None
          ) -> Workload:
    """Every request the same length; Poisson arrivals at `rate` or `burst=(size, interval_s)`."""
    lens = [(prompt_len, output_len)] * num_requests
    return _build(name or f"fixed-{prompt_len}x{output_len}", lens,
                  _arrivals(num_requests, rate, seed, burst), seed,
                  {"rate": rate, "burst": burst, "prompt_len": prompt_len, "output_len": output_len})


def sharegpt(num_requests: int, *, rate: float = math.inf, seed: int = 0,
             burst: tuple[int, float] | None = None, mean_prompt: float = SHAREGPT_MEAN_PROMPT,
             mean_output: float = SHAREGPT_MEAN_OUTPUT, sigma_prompt: float = SHAREGPT_SIGMA_PROMPT,
             sigma_output: float = SHAREGPT_SIGMA_OUTPUT) -> Workload:
    """ShareGPT-like lengths (lognormal, pruned like vLLM's ShareGPT benchmark); see module doc."""
    # Draw with the pre-pruning means that leave the asked means after pruning.
    raw_p, raw_o = _prepruning_means(mean_prompt, mean_output, sigma_prompt, sigma_output)
    rng = _rng(seed, "lengths")
    lens: list[tuple[int, int]] = []
    while len(lens) < num_requests:
        lens += _pruned_draw(rng, 2 * (num_requests - len(lens)) + 16, raw_p, raw_o,
                             sigma_prompt, sigma_output)
    lens = lens[:num_requests]
    return _build("sharegpt", lens, _arrivals(num_requests, rate, seed, burst), seed,
                  {"rate": rate, "burst": burst, "mean_prompt": mean_prompt,
                   "mean_output": mean_output, "sigma_prompt": sigma_prompt,
                   "sigma_output": sigma_output})


def _uniform_lens(seed: int, n: int, prompt: tuple[int, int], output: tuple[int, int]
                  ) -> list[tuple[int, int]]:
    rng = _rng(seed, "lengths")
    ps = rng.integers(prompt[0], prompt[1] + 1, size=n)
    os_ = rng.integers(output[0], output[1] + 1, size=n)
    return list(zip(ps.tolist(), os_.tolist(), strict=True))


def prefill_heavy(num_requests: int, *, rate: float = math.inf, seed: int = 0,
                  burst: tuple[int, float] | None = None, prompt: tuple[int, int] = (1536, 3072),
                  output: tuple[int, int] = (8, 32)) -> Workload:
    """Long prompts, short answers (summarisation, RAG): prefill dominates."""
    return _build("prefill-heavy", _uniform_lens(seed, num_requests, prompt, output),
                  _arrivals(num_requests, rate, seed, burst), seed,
                  {"rate": rate, "burst": burst, "prompt": prompt, "output": output})


def decode_heavy(num_requests: int, *, rate: float = math.inf, seed: int = 0,
                 burst: tuple[int, float] | None = None, prompt: tuple[int, int] = (64, 256),
                 output: tuple[int, int] = (384, 768)) -> Workload:
    """Short prompts, long answers (generation, chat): decode dominates."""
    return _build("decode-heavy", _uniform_lens(seed, num_requests, prompt, output),
                  _arrivals(num_requests, rate, seed, burst), seed,
                  {"rate": rate, "burst": burst, "prompt": prompt, "output": output})


def shared_prefix(num_requests: int, *, rate: float = math.inf, seed: int = 0,
                  burst: tuple[int, float] | None = None, num_prefixes: int = 4,
                  prefix_len: int = 1024, share: float = 0.8, suffix: tuple[int, int] = (64, 512),
                  output: tuple[int, int] = (32, 128)) -> Workload:
    """A `share` of the requests start with one of `num_prefixes` system prompts of
    `prefix_len` tokens (picked uniformly), followed by their own `suffix` tokens."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = _rng(seed, "prefixes")
    uses = rng.random(num_requests) < share
    pick = rng.integers(0, num_prefixes, size=num_requests)
    base = _uniform_lens(seed, num_requests, suffix, output)
    lens, prefixes = [], []
    for (s, o), use, pid in zip(base, uses.tolist(), pick.tolist(), strict=True):
        lens.append((s + prefix_len, o) if use else (s, o))
        prefixes.append((int(pid), prefix_len) if use else (None, 0))
    return _build("shared-prefix", lens, _arrivals(num_requests, rate, seed, burst), seed,
                  {"rate": rate, "burst": burst, "num_prefixes": num_prefixes,
                   "prefix_len": prefix_len, "share": share, "suffix": suffix, "output": output},
                  prefixes)


GENERATORS: dict[str, Callable[..., Workload]] = {
    "sharegpt": sharegpt, "prefill-heavy": prefill_heavy, "decode-heavy": decode_heavy,
    "shared-prefix": shared_prefix,
}


def make(name: str, num_requests: int, *, rate: float = math.inf, seed: int = 0,
         **kwargs: Any) -> Workload:
    """A workload by name (`GENERATORS` keys, or "fixed" with prompt_len/output_len)."""
    if name == "fixed":
        return fixed(num_requests, kwargs.pop("prompt_len", 512), kwargs.pop("output_len", 64),
                     rate=rate, seed=seed, **kwargs)
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; one of {['fixed', *GENERATORS]}") from None
    return gen(num_requests, rate=rate, seed=seed, **kwargs)


def rate_sweep(name: str, num_requests: int, rates: Sequence[float], *, seed: int = 0,
               **kwargs: Any) -> list[Workload]:
    """One workload per rate: the same lengths (same seed), only the arrivals change.

    Each rate's prompts get their own token ids (a seed of their own for `token_ids`), so an
    engine that serves the whole sweep finds no prefix-cache hits left by the previous rate.
    """
    base = make(name, num_requests, rate=math.inf, seed=seed, **kwargs)
    return [replace(base.scaled(r), seed=seed + 7919 * (i + 1)) for i, r in enumerate(rates)]
