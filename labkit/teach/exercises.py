"""Checkers for the notebooks' exercises: a learner's answer against labkit's own numbers.

Each `check_*` computes the right answer with the functions the lab itself runs on
(labkit.models' KV arithmetic, labkit.plan's planner, the simulator's block pool,
scheduler and connectors), prints a friendly verdict and returns True / False.
`answer=None` means "not answered yet": the notebook still runs top to bottom.
`reveal=True` also prints the expected value. Each returns a `Verdict` (truthy when right)
that Jupyter does not echo, so a cell shows the printed verdicts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from labkit.vocab import GiB  # noqa: F401


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: `bool(v)` is True when the answer was right."""

    ok: bool
    expected: Any
    answer: Any

    def __bool__(self) -> bool:
        return self.ok

    def _ipython_display_(self) -> None:  # the printed verdict already said it all
        pass


def _verdict(answer: Any, expected: Any, ok: bool, what: str, hint: str, reveal: bool) -> Verdict:
    if answer is None:
        print(f"✍️  Not answered yet: set your answer for {what} and run the cell again.")
        return Verdict(False, expected, answer)
    if ok:
        print(f"✅ Right: {what} = {expected}.")
    else:
        print(f"❌ Not quite: you said {answer} for {what}.\n   Hint: {hint}")
        if reveal:
            print(f"   labkit computes {expected}.")
    return Verdict(ok, expected, answer)


def _close(answer: Any, expected: float, rel: float) -> bool:
    try:
        return math.isclose(float(answer), float(expected), rel_tol=rel, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def check_kv_bytes_per_token(
    model: str, kv_cache_dtype: str, answer: Any, *, reveal: bool = False
) -> Verdict:
    """KV bytes one token costs in the whole model (all layers, K and V)."""
    from labkit.models import get_model, kv_dtype_bytes

    m = get_model(model)
    expected = m.kv_bytes_per_token(kv_cache_dtype)
    hint = (
        f"2 (K and V) x {m.num_layers} layers x {m.num_kv_heads} KV heads x "
        f"{m.head_dim} head_dim x {kv_dtype_bytes(kv_cache_dtype, m.dtype)} bytes per element"
    )
    return _verdict(
        answer,
        expected,
        _close(answer, expected, 0),
        f"KV bytes per token of {model} ({kv_cache_dtype})",
        hint,
        reveal,
    )


def simulated_prompt_blocks(prompt_len: int, block_size: int) -> int:
    """Blocks the simulator's KV-cache manager allocates for a prompt (one prefill step)."""
    from labkit.engines.sim.engine import SimEngine

    chunk = max(prompt_len, 16)
    eng = SimEngine(
        "lab-tiny",
        "h100",
        block_size=block_size,
        max_num_batched_tokens=chunk,
        max_num_seqs=1,
        max_model_len=prompt_len + block_size + 1,
        num_gpu_blocks=prompt_len // block_size + 3,
    )
    eng.add_request("q", list(range(1, prompt_len + 1)), 2)
    eng.step()
    return len(eng.kv_cache_manager.get_block_ids("q")[0])


def check_blocks_needed(
    prompt_len: int, block_size: int, answer: Any, *, reveal: bool = False
) -> Verdict:
    """KV blocks a prompt of `prompt_len` tokens occupies after its prefill."""
    expected = simulated_prompt_blocks(prompt_len, block_size)
    hint = "a block holds block_size tokens; a partly filled last block still counts (round up)"
    return _verdict(
        answer,
        expected,
        _close(answer, expected, 0),
        f"blocks for a {prompt_len}-token prompt with block_size {block_size}",
        hint,
        reveal,
    )


def simulated_chunk_steps(prompt_len: int, chunk: int) -> list[int]:
    """Tokens the simulator's scheduler schedules per step until the first token comes out
    (one request alone, token budget `chunk`)."""
    from labkit.engines.sim.engine import SimEngine

    eng = SimEngine(
        "lab-tiny",
        "h100",
        block_size=16,
        max_num_batched_tokens=chunk,
        max_num_seqs=1,
        max_model_len=prompt_len + 17,
        num_gpu_blocks=prompt_len // 16 + 4,
    )
    eng.add_request("q", list(range(1, prompt_len + 1)), 2)
    steps: list[int] = []
    while len(steps) <= prompt_len:  # bounded: every step schedules >= 1 token
        res = eng.step()
        steps.append(res.num_scheduled_tokens)
        if res.sampled:
            return steps
    raise RuntimeError("the simulated scheduler did not finish the prefill")


def check_chunk_steps(prompt_len: int, chunk: int, answer: Any, *, reveal: bool = False) -> Verdict:
    """Engine steps a lone prompt needs before its first token with chunked prefill."""
    steps = simulated_chunk_steps(prompt_len, chunk)
    expected = len(steps)
    hint = (
        "each step schedules at most max_num_batched_tokens (the chunk) tokens; "
        "the first token comes out of the step that computes the prompt's last token"
    )
    ok = _verdict(
        answer,
        expected,
        _close(answer, expected, 0),
        f"steps to prefill {prompt_len} tokens with chunk {chunk}",
        hint,
        reveal,
    )
    if ok or reveal:
        print(f"   the simulated scheduler ran steps of {steps} tokens")
    return ok


def check_tp_kv_per_gpu(
    model: str, tp: int, kv_cache_dtype: str, answer: Any, *, reveal: bool = False
) -> Verdict:
    """KV bytes per token that ONE GPU of a TP group stores."""
    from labkit.models import get_model

    m = get_model(model)
    expected = m.kv_bytes_per_token(kv_cache_dtype, tp=tp)
    hint = (
        f"TP splits the KV heads: each GPU keeps max(1, {m.num_kv_heads} // tp) of them "
        f"(heads are replicated when tp > KV heads), for all {m.num_layers} layers"
    )
    return _verdict(
        answer,
        expected,
        _close(answer, expected, 0),
        f"KV bytes per token per GPU of {model} at tp={tp} ({kv_cache_dtype})",
        hint,
        reveal,
    )


def check_weight_gib(
    model: str, answer: Any, *, tp: int = 1, pp: int = 1, reveal: bool = False
) -> Verdict:
    """GiB of weights the most loaded GPU holds (within 5 %)."""
    from labkit.models import get_model

    expected = round(max(get_model(model).weight_bytes(tp, pp)) / GiB, 2)
    hint = (
        "parameters x bytes per parameter (bfloat16: 2); TP splits each layer, PP splits "
        "the layers; the embedding sits on the first stage, lm_head on the last"
    )
    return _verdict(
        answer,
        expected,
        _close(answer, expected, 0.05),
        f"GiB of weights per GPU of {model} at tp={tp}, pp={pp}",
        hint,
        reveal,
    )


def simulated_transfer_tokens(prompt_len: int, block_size: int, connector: str) -> int:
    """Prompt tokens the decode engine takes from the connector in a simulated PD pair
    (vllm:prompt_tokens_by_source_total{source="external_kv_transfer"})."""
    from labkit.engines.sim.cluster import SimCluster

    blocks = 2 * (prompt_len // block_size) + 8
    cluster = SimCluster(
        "lab-tiny",
        "h100",
        connector=connector,
        block_size=block_size,
        num_gpu_blocks=blocks,
        max_num_batched_tokens=max(prompt_len, 64),
        max_num_seqs=2,
        max_model_len=prompt_len + 2 * block_size,
    )
    cluster.run([(0.0, prompt_len, 2)])
    return cluster.decode_engines[0].stats.prompt_tokens_by_source["external_kv_transfer"]


def check_pd_transfer_tokens(
    prompt_len: int, block_size: int, connector: str, answer: Any, *, reveal: bool = False
) -> Verdict:
    """Prompt tokens whose KV moves from prefill to decode with `connector`."""
    expected = simulated_transfer_tokens(prompt_len, block_size, connector)
    hints = {
        "nixl": "NixlConnector: decode pulls the KV of every prompt token it lacks",
        "example": (
            "ExampleConnector saves whole blocks only, and decode must compute at least "
            "the last prompt token itself: align(prompt_len - 1) down to block_size"
        ),
    }
    return _verdict(
        answer,
        expected,
        _close(answer, expected, 0),
        f"tokens moved for a {prompt_len}-token prompt ({connector}, block_size {block_size})",
        hints.get(connector, "see the connector's source"),
        reveal,
    )


def kv_gpus(model: str, tp: int, num_gpus: int, gpu_type: str = "h100") -> list[int]:
    """GPUs that hold KV cache when one engine runs `model` at `tp` on `num_gpus` GPUs."""
    from labkit.teach.placement import colocated_plan

    plan = colocated_plan(model, tp=tp, num_gpus=num_gpus, gpu_type=gpu_type)
    return [g.index for g in plan.gpus if any(line.kv > 0 for line in g.lines)]


def check_kv_gpus(
    model: str, tp: int, num_gpus: int, answer: Any, *, reveal: bool = False
) -> Verdict:
    """Which GPUs hold KV cache (a list of indices)."""
    expected = kv_gpus(model, tp, num_gpus)
    ok = answer is not None and sorted(int(a) for a in answer) == expected
    hint = (
        "vLLM places TP ranks on the first tp visible GPUs; each rank keeps its share of "
        "the KV heads in the memory left beside its own weights"
    )
    return _verdict(
        answer,
        expected,
        ok,
        f"GPUs holding KV for {model} at tp={tp} with {num_gpus} GPUs",
        hint,
        reveal,
    )


def check_prefix_hit_rate(result: Any, answer: Any, *, tolerance: float = 0.10,
                          reveal: bool = False) -> Verdict:
    """A predicted prefix-cache hit rate (a fraction, e.g. 0.6) against a routing run's own
    (labkit.bench.routing PolicyResult or routing_served ServedResult: hit tokens over the
    prompt tokens the prefill engines looked up); right within `tolerance` (10 points)."""
    expected = round(float(result.hit_rate), 3)
    try:
        ok = abs(float(answer) - expected) <= tolerance
    except (TypeError, ValueError):
        ok = False
    hint = ("each turn's prompt is the conversation so far: a turn can hit everything its "
            "previous turn sent (if it lands on the same prefill engine), and every turn "
            "can hit the shared system prompt; the new message and the last answer never hit")
    return _verdict(answer, expected, ok, f"the prefix-cache hit rate under {result.policy}",
                    hint, reveal)
