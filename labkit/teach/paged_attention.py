"""Paged attention in a few lines of torch, checked against ordinary attention.

vLLM keeps the KV cache in one pool of fixed-size blocks; a request's block table maps its
logical blocks (0, 1, 2, ... in token order) to physical blocks anywhere in the pool:

    block table of "A": [7, 2, 11]          pool (physical blocks)
    logical 0 -> physical 7                 [0: null][1][2: A1][3]...[7: A0]...[11: A2]
    token i lives at (table[i // bs], i % bs)

The kernel walks the table block by block with a running (online) softmax, so it never
needs the request's keys side by side. Here that walk is written out in torch and compared
with torch's scaled_dot_product_attention on the same keys laid out contiguously.
"""

from __future__ import annotations

import math
import random
from typing import Any

from labkit.teach.result import Result


class PagedKVCache:
    """A K and a V pool of shape [num_blocks, block_size, num_heads, head_dim] + block tables.

    Block 0 is kept free as vLLM's null block; the free list is shuffled so that a
    request's blocks land scattered over the pool, as they do after some traffic.
    """

    def __init__(
        self,
        num_blocks: int = 16,
        block_size: int = 16,
        num_heads: int = 2,
        head_dim: int = 8,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        import torch

        self.block_size, self.num_blocks = block_size, num_blocks
        self.k_pool = torch.zeros(num_blocks, block_size, num_heads, head_dim)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.free_blocks = list(range(1, num_blocks))
        if shuffle:
            random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.num_tokens: dict[str, int] = {}
        self.sequences: list[str] = []  # every sequence ever written, first come first

    def append(self, seq: str, k: Any, v: Any) -> None:
        """Write the keys/values of new tokens ([n, heads, head_dim]) of `seq`, taking a
        free block whenever the last one is full. Raises MemoryError when none is left."""
        table = self.block_tables.setdefault(seq, [])
        if seq not in self.sequences:
            self.sequences.append(seq)
        pos = self.num_tokens.get(seq, 0)
        for i in range(k.shape[0]):
            slot = (pos + i) % self.block_size
            if slot == 0:
                if not self.free_blocks:
                    raise MemoryError(f"no free KV block for {seq!r}: the pool is full")
                table.append(self.free_blocks.pop())
            self.k_pool[table[-1], slot] = k[i]
            self.v_pool[table[-1], slot] = v[i]
        self.num_tokens[seq] = pos + k.shape[0]

    def free(self, seq: str) -> None:
        """Return `seq`'s blocks to the free list."""
        self.free_blocks += self.block_tables.pop(seq, [])
        self.num_tokens.pop(seq, None)

    def gather(self, seq: str) -> tuple[Any, Any]:
        """`seq`'s keys and values side by side ([n, heads, head_dim]): what a contiguous
        layout would hold."""
        table, n = self.block_tables[seq], self.num_tokens[seq]
        h, d = self.k_pool.shape[2:]
        return (self.k_pool[table].reshape(-1, h, d)[:n], self.v_pool[table].reshape(-1, h, d)[:n])

    def owners(self) -> dict[int, tuple[str, int]]:
        """physical block -> (sequence, logical block index)."""
        return {b: (s, i) for s, t in self.block_tables.items() for i, b in enumerate(t)}


def paged_attention(q: Any, cache: PagedKVCache, seq: str) -> Any:
    """Causal attention of the last `q.shape[0]` tokens of `seq` ([n, heads, head_dim]),
    reading K/V block by block through the block table with an online softmax."""
    import torch

    nq, heads, dim = q.shape
    total, bs = cache.num_tokens[seq], cache.block_size
    q_pos = torch.arange(total - nq, total)  # positions of the queries
    scale = 1.0 / math.sqrt(dim)
    m = torch.full((heads, nq), float("-inf"))  # running max of the scores
    denom = torch.zeros(heads, nq)  # running softmax denominator
    acc = torch.zeros(heads, nq, dim)  # running weighted sum of values
    for logical, physical in enumerate(cache.block_tables[seq]):
        k_pos = torch.arange(logical * bs, (logical + 1) * bs)
        k, v = cache.k_pool[physical], cache.v_pool[physical]  # [bs, heads, dim]
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        s = s.masked_fill(
            (k_pos[None, :] > q_pos[:, None]) | (k_pos >= total)[None, :], float("-inf")
        )
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[..., None]).nan_to_num(0.0)
        fix = torch.exp(m - m_new).nan_to_num(0.0)
        denom = denom * fix + p.sum(-1)
        acc = acc * fix[..., None] + torch.einsum("hqk,khd->hqd", p, v)
        m = m_new
    return (acc / denom[..., None]).transpose(0, 1)  # [nq, heads, dim]


def contiguous_attention(q: Any, k: Any, v: Any) -> Any:
    """The reference: torch's scaled_dot_product_attention on contiguous K/V, causal for
    the last q.shape[0] positions."""
    import torch
    from torch.nn import functional as F

    nq, n = q.shape[0], k.shape[0]
    mask = torch.arange(n)[None, :] <= torch.arange(n - nq, n)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    )
    return out.transpose(0, 1)


def demo(
    seq_lens: dict[str, int] | None = None,
    block_size: int = 16,
    num_blocks: int = 16,
    num_heads: int = 2,
    head_dim: int = 8,
    step_tokens: int = 8,
    seed: int = 0,
) -> tuple[PagedKVCache, Result]:
    """Fill a small pool with several sequences (interleaved, `step_tokens` at a time, as
    a server writes them), then check paged == contiguous attention for each.

    Returns:
        The cache (for `block_map_figure`) and a MEASURED Result: one row per sequence with
        its block table, the largest difference and torch.allclose.
    """
    import torch

    seq_lens = seq_lens or {"A": 37, "B": 5, "C": 20, "D": 50}
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_blocks, block_size, num_heads, head_dim, seed)
    keys = {s: torch.randn(n, num_heads, head_dim, generator=gen) for s, n in seq_lens.items()}
    vals = {s: torch.randn(n, num_heads, head_dim, generator=gen) for s, n in seq_lens.items()}
    for start in range(0, max(seq_lens.values()), step_tokens):
        for s in seq_lens:
            cache.append(
                s, keys[s][start : start + step_tokens], vals[s][start : start + step_tokens]
            )
    rows = []
    for s, n in seq_lens.items():
        q = torch.randn(min(4, n), num_heads, head_dim, generator=gen)
        paged = paged_attention(q, cache, s)
        ref = contiguous_attention(q, keys[s], vals[s])
        rows.append(
            {
                "sequence": s,
                "tokens": n,
                "block_table": str(cache.block_tables[s]),
                "max_abs_diff": float((paged - ref).abs().max()),
                "allclose": bool(torch.allclose(paged, ref, atol=1e-5)),
            }
        )
    return cache, Result(
        "paged attention vs contiguous attention",
        "measured",
        rows,
        note=f"block_size {block_size}, pool of {num_blocks} blocks "
        f"(block 0 is the null block), torch on the CPU",
    )


def fragmentation(
    request_lens: list[int],
    max_model_len: int = 4096,
    block_sizes: tuple[int, ...] = (16, 64, 256),
    model: str = "lab-1b",
    kv_cache_dtype: str = "auto",
) -> Result:
    """KV memory reserved vs used: one contiguous region of max_model_len per request
    (what a server without paging must reserve) against blocks of each size.

    Bytes come from labkit.models (the model's real KV bytes per token)."""
    from labkit.models import get_model

    per_token = get_model(model).kv_bytes_per_token(kv_cache_dtype)
    used = sum(request_lens)
    schemes = [("contiguous, max_model_len each", len(request_lens) * max_model_len)]
    schemes += [
        (f"paged, block_size {bs}", sum(-(-n // bs) * bs for n in request_lens))
        for bs in block_sizes
    ]
    rows = [
        {
            "layout": name,
            "reserved_tokens": res,
            "used_tokens": used,
            "wasted_tokens": res - used,
            "wasted_MiB": (res - used) * per_token / 2**20,
            "waste_pct": 100.0 * (res - used) / res,
        }
        for name, res in schemes
    ]
    return Result(
        f"KV memory for {len(request_lens)} requests of {model}",
        "planned",
        rows,
        note=f"{per_token:,} KV bytes per token ({model}, kv_cache_dtype "
        f"{kv_cache_dtype}); max_model_len {max_model_len}",
    )


# One colour per sequence, kept from figure to figure (free and null blocks grey).
SEQUENCE_COLORS = ("#4c6ef5", "#f76707", "#2b8a3e", "#ae3ec9", "#e03131", "#1098ad",
                   "#f59f00", "#5c940d", "#d6336c", "#495057")
FREE_COLOR = "#e9ecef"


def sequence_color(cache: PagedKVCache, seq: str) -> str:
    """The colour `seq` has in every block-map figure of `cache` (by order of first write)."""
    return SEQUENCE_COLORS[cache.sequences.index(seq) % len(SEQUENCE_COLORS)]


def block_map_figure(cache: PagedKVCache, columns: int = 8) -> Any:
    """The pool as a grid: each physical block coloured by the sequence that owns it and
    labelled 'A0' (sequence A, logical block 0). A sequence keeps its colour in every
    figure of the same cache, whoever else comes and goes."""
    import plotly.graph_objects as go

    owners = cache.owners()
    rows = -(-cache.num_blocks // columns)
    z = [[0] * columns for _ in range(rows)]
    text = [[""] * columns for _ in range(rows)]
    for b in range(cache.num_blocks):
        r, c = divmod(b, columns)
        if b in owners:
            s, i = owners[b]
            k = cache.sequences.index(s) % len(SEQUENCE_COLORS) + 1
            z[r][c], text[r][c] = k, f"#{b}<br>{s}{i}"
        else:
            text[r][c] = f"#{b}<br>{'null' if b == 0 else 'free'}"
    # Discrete colours: value k sits in the middle of band k of the scale.
    palette = (FREE_COLOR, *SEQUENCE_COLORS)
    n = len(palette)
    scale = [[edge / n, color] for k, color in enumerate(palette) for edge in (k, k + 1)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            showscale=False,
            colorscale=scale,
            zmin=-0.5,
            zmax=n - 0.5,
            xgap=2,
            ygap=2,
            hoverinfo="text",
        )
    )
    fig.update_layout(
        title="KV pool: physical blocks (label: sequence + logical block)",
        height=60 * rows + 120,
        yaxis=dict(autorange="reversed", visible=False),
        xaxis=dict(visible=False),
    )
    return fig


def fragmentation_figure(result: Result) -> Any:
    """Used vs wasted tokens per layout (stacked bars)."""
    import plotly.graph_objects as go

    x = result.column("layout")
    fig = go.Figure()
    fig.add_bar(x=x, y=result.column("used_tokens"), name="used")
    fig.add_bar(x=x, y=result.column("wasted_tokens"), name="reserved but unused")
    fig.update_layout(
        barmode="stack",
        title=f"{result.label}: {result.title}",
        yaxis_title="KV tokens",
        height=380,
    )
    return fig
