"""What a KV cache buys, measured for real: generate T tokens with a tiny decoder (random
weights, torch on the CPU) twice, recomputing the whole prefix every step (no cache) and
computing only the new token against stored keys/values (KV cache).

    no cache:  step t runs the model on all t tokens   -> sum_t t   = O(T^2) token passes
    KV cache:  step t runs the model on 1 token        -> T          = O(T)   token passes
               (attention still reads t cached keys: O(T^2) attention FLOPs, but tiny)

Both paths produce the same tokens: the cache changes the cost, never the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from labkit.teach.result import Result


@dataclass(frozen=True)
class TinyShape:
    """A decoder small enough to time on two CPU cores in seconds."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 256
    max_len: int = 1024

    def linear_flops_per_token(self) -> float:
        """2 FLOPs per weight a token passes (QKV, O, MLP up/down, lm_head)."""
        h, i = self.hidden_size, self.intermediate_size
        return 2.0 * (self.num_layers * (4 * h * h + 2 * h * i) + h * self.vocab_size)

    def attention_flops(self, num_queries: int, context_len: int) -> float:
        """QK^T + PV FLOPs for the last `num_queries` tokens of a causal context."""
        q = num_queries
        pairs = q * (context_len - q) + q * (q + 1) // 2
        return 4.0 * self.num_layers * self.hidden_size * pairs


def build_model(shape: TinyShape = TinyShape(), seed: int = 0) -> Any:
    """A pre-norm decoder with learned positions and random weights (torch.nn.Module)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = shape.hidden_size
            self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
            self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
            self.up = nn.Linear(h, shape.intermediate_size)
            self.down = nn.Linear(shape.intermediate_size, h)

        def forward(self, x: Any, cache: tuple[Any, Any] | None) -> tuple[Any, tuple[Any, Any]]:
            b, n, h = x.shape
            heads = shape.num_heads
            q, k, v = (
                t.view(b, n, heads, h // heads).transpose(1, 2)
                for t in self.qkv(self.ln1(x)).chunk(3, dim=-1)
            )
            if cache is not None:  # the cache: keys/values of every earlier token
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            # n == 1 with a cache: the one query may see every key, no mask needed
            a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and n > 1)
            x = x + self.out(a.transpose(1, 2).reshape(b, n, h))
            x = x + self.down(F.gelu(self.up(self.ln2(x))))
            return x, (k, v)

    class TinyDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shape = shape
            self.emb = nn.Embedding(shape.vocab_size, shape.hidden_size)
            self.pos = nn.Embedding(shape.max_len, shape.hidden_size)
            self.layers = nn.ModuleList(Layer() for _ in range(shape.num_layers))
            self.head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)

        def forward(self, ids: Any, caches: list | None = None, start: int = 0) -> tuple[Any, list]:
            pos = torch.arange(start, start + ids.shape[1])
            x = self.emb(ids) + self.pos(pos)[None]
            new = []
            for i, layer in enumerate(self.layers):
                x, kv = layer(x, None if caches is None else caches[i])
                new.append(kv)
            return self.head(x), new

    torch.manual_seed(seed)
    return TinyDecoder().eval()


def generate_without_cache(model: Any, prompt: Any, num_tokens: int) -> tuple[Any, Any]:
    """Greedy generation recomputing the whole prefix each step; (ids, last logits)."""
    import torch

    ids = prompt
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits, _ = model(ids)
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids, logits[:, -1]


def generate_with_cache(model: Any, prompt: Any, num_tokens: int) -> tuple[Any, Any]:
    """Greedy generation with a KV cache: prefill once, then one token per step."""
    import torch

    with torch.inference_mode():
        logits, caches = model(prompt)  # prefill: fills the cache
        ids = torch.cat([prompt, logits[:, -1:].argmax(-1)], dim=1)
        for _ in range(num_tokens - 1):
            logits, caches = model(ids[:, -1:], caches, start=ids.shape[1] - 1)
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids, logits[:, -1]


def flops(shape: TinyShape, prompt_len: int, num_tokens: int, cached: bool) -> float:
    """FLOPs of generating `num_tokens` after a `prompt_len` prompt, either way."""
    lin = shape.linear_flops_per_token()
    if cached:
        total = prompt_len * lin + shape.attention_flops(prompt_len, prompt_len)
        for n in range(prompt_len + 1, prompt_len + num_tokens):
            total += lin + shape.attention_flops(1, n)
        return total
    return sum(
        n * lin + shape.attention_flops(n, n) for n in range(prompt_len, prompt_len + num_tokens)
    )


def _best_time(fn: Any, repeats: int, min_total_s: float = 0.3) -> float:
    """The best of at least `repeats` runs, more for short runs (until `min_total_s`):
    the minimum is what the work costs when nothing else competes for the CPU."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < repeats or (spent < min_total_s and runs < 50):
        t = time.perf_counter()
        fn()
        took = time.perf_counter() - t
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def measure(
    lengths: tuple[int, ...] = (16, 32, 64, 128, 256),
    prompt_len: int = 4,
    shape: TinyShape = TinyShape(),
    repeats: int = 3,
    threads: int | None = 1,
    seed: int = 0,
) -> Result:
    """Time generating T tokens without and with a KV cache, for each T in `lengths`.

    Args:
        lengths: the numbers of generated tokens T.
        prompt_len: tokens in the (random) prompt.
        shape: the decoder's size.
        repeats: each timing is the best of this many runs.
        threads: torch intra-op threads while timing (1: steady timings on a shared
            machine; None: torch's setting). The setting is restored afterwards.

    Returns:
        A MEASURED Result, one row per T: seconds without / with the cache, their ratio,
        GFLOPs either way, and whether both produced the same tokens.
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(lengths, prompt_len, shape, repeats, seed)
    finally:
        torch.set_num_threads(before)


def _measure(
    lengths: tuple[int, ...], prompt_len: int, shape: TinyShape, repeats: int, seed: int
) -> Result:
    import torch

    model = build_model(shape, seed)
    prompt = torch.randint(
        0, shape.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed)
    )
    generate_with_cache(model, prompt, 4)  # warm-up: first calls allocate
    rows = []
    for T in lengths:
        ids_a, logits_a = generate_without_cache(model, prompt, T)
        ids_b, logits_b = generate_with_cache(model, prompt, T)
        slow = _best_time(lambda T=T: generate_without_cache(model, prompt, T), repeats)
        fast = _best_time(lambda T=T: generate_with_cache(model, prompt, T), repeats)
        rows.append(
            {
                "T": T,
                "s_without_cache": slow,
                "s_with_cache": fast,
                "ratio": slow / fast,
                "gflop_without_cache": flops(shape, prompt_len, T, cached=False) / 1e9,
                "gflop_with_cache": flops(shape, prompt_len, T, cached=True) / 1e9,
                "same_tokens": bool(
                    torch.equal(ids_a, ids_b) and torch.allclose(logits_a, logits_b, atol=1e-4)
                ),
            }
        )
    return Result(
        "generating T tokens without and with a KV cache",
        "measured",
        rows,
        note=(
            f"torch {torch.__version__} on the CPU, {torch.get_num_threads()} thread(s); "
            f"decoder of {shape.num_layers} layers x {shape.hidden_size} hidden, random "
            f"weights; best of >= {repeats} runs; prompt of {prompt_len} tokens"
        ),
        extra={"shape": shape},
    )


def figure(result: Result) -> Any:
    """Seconds vs T, both ways (log-log: slope 2 vs slope 1)."""
    import plotly.graph_objects as go

    T = result.column("T")
    fig = go.Figure()
    fig.add_scatter(
        x=T,
        y=result.column("s_without_cache"),
        name="no cache (recompute prefix)",
        mode="lines+markers",
    )
    fig.add_scatter(x=T, y=result.column("s_with_cache"), name="KV cache", mode="lines+markers")
    fig.update_layout(
        title=f"{result.label}: time to generate T tokens",
        xaxis=dict(title="T (generated tokens)", type="log"),
        yaxis=dict(title="seconds", type="log"),
        height=380,
    )
    return fig
