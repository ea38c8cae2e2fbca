"""Model shapes and the exact memory arithmetic vLLM 0.26 applies to them.

A `ModelShape` holds what decides memory and compute: layers, heads, KV heads, head_dim,
MLP width, vocabulary. From it come the weight bytes each GPU holds under TP/PP and the KV
bytes each token costs, counted the way vLLM counts them (sources cited at each rule).
Synthetic shapes ("lab-1b", "lab-tiny") run in real vLLM with `--load-format dummy` from a
directory `write_model_dir()` writes: config.json plus a tokenizer, no download needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# vLLM's CacheDType spellings (vllm/config/cache.py) that labkit supports, with the aliases
# learners type. fp8 variants store one byte per element.
_KV_DTYPE_ALIASES = {
    "auto": "auto",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "fp8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
}
_VOCAB_PADDING = (
    64  # DEFAULT_VOCAB_PADDING_SIZE, vllm/model_executor/layers/vocab_parallel_embedding.py
)


def normalize_kv_dtype(kv_cache_dtype: str) -> str:
    """vLLM's spelling of a KV-cache dtype ("bf16" -> "bfloat16"); ValueError when unknown."""
    key = str(kv_cache_dtype).strip().lower()
    if key not in _KV_DTYPE_ALIASES:
        known = ", ".join(sorted(set(_KV_DTYPE_ALIASES.values())))
        raise ValueError(f"unknown KV-cache dtype {kv_cache_dtype!r} (known: {known})")
    return _KV_DTYPE_ALIASES[key]


def kv_dtype_bytes(kv_cache_dtype: str, model_dtype: str = "bfloat16") -> int:
    """Bytes per KV element: "auto" follows the model dtype, fp8 variants take 1."""
    name = normalize_kv_dtype(kv_cache_dtype)
    if name == "auto":
        return _DTYPE_BYTES[_normalize_model_dtype(model_dtype)]
    return 1 if name.startswith("fp8") else _DTYPE_BYTES[name]


def _normalize_model_dtype(dtype: str) -> str:
    key = str(dtype).replace("torch.", "").lower()
    key = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }.get(key, key)
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unsupported model dtype {dtype!r} (bfloat16, float16, float32)")
    return key


def pad_vocab(vocab_size: int) -> int:
    return -(-vocab_size // _VOCAB_PADDING) * _VOCAB_PADDING


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only Llama/Qwen2 model that decide memory and FLOPs."""

    name: str
    hf_name: str | None
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    dtype: str = "bfloat16"
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    synthetic: bool = False

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[_normalize_model_dtype(self.dtype)]

    # ---- parameters -------------------------------------------------------------------
    def _layer_params(self, tp: int = 1) -> int:
        """Parameters one TP rank holds for one decoder layer.

        QKVParallelLinear keeps max(1, kv_heads // tp) KV heads per rank (replicated when
        tp > kv_heads); the MLP and o_proj split by tp; the two RMSNorms are replicated.
        """
        h, d = self.hidden_size, self.head_dim
        q_heads = self.num_heads // tp
        kv_heads = max(1, self.num_kv_heads // tp)
        qkv = h * (q_heads + 2 * kv_heads) * d
        if self.qkv_bias:
            qkv += (q_heads + 2 * kv_heads) * d
        o = q_heads * d * h
        mlp = 3 * h * (self.intermediate_size // tp)
        return qkv + o + mlp + 2 * h

    def num_params(self) -> int:
        """Total parameters of the checkpoint (tied embeddings counted once)."""
        emb = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else emb
        return emb + lm_head + self.num_layers * self._layer_params(1) + self.hidden_size

    def layers_per_stage(self, pp: int = 1) -> list[int]:
        """Decoder layers per PP stage, as vLLM's get_pp_indices splits them.

        vllm/distributed/utils.py: num_layers // pp each, and the remainder goes one layer
        each to the stages before the last (partitions[-2], [-3], ...), never the last.
        """
        if pp < 1 or pp > self.num_layers:
            raise ValueError(f"pp={pp} must be in 1..{self.num_layers} (the layers of {self.name})")
        parts = [self.num_layers // pp] * pp
        for i in range(2, self.num_layers % pp + 2):
            parts[-i] += 1
        return parts

    def weight_bytes(self, tp: int = 1, pp: int = 1) -> list[int]:
        """Weight bytes per PP stage; each TP rank of that stage holds this much.

        vllm/model_executor/models/llama.py: the embedding lives on the first stage (and
        on the last when tied), lm_head and the final norm on the last; vocab rows are
        padded to a multiple of 64 and split over TP.
        """
        vocab_rows = pad_vocab(self.vocab_size) // tp
        emb = vocab_rows * self.hidden_size
        out = []
        for stage, layers in enumerate(self.layers_per_stage(pp)):
            first, last = stage == 0, stage == pp - 1
            params = layers * self._layer_params(tp)
            if first or (self.tie_word_embeddings and last):
                params += emb
            if last:
                params += self.hidden_size + (0 if self.tie_word_embeddings else emb)
            out.append(params * self.dtype_bytes)
        return out

    # ---- KV cache ---------------------------------------------------------------------
    def kv_heads_per_rank(self, tp: int = 1) -> int:
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, kv_cache_dtype: str = "auto", tp: int = 1, pp: int = 1) -> int:
        """KV bytes one token costs on one GPU (the largest PP stage).

        vllm/v1/kv_cache_interface.py AttentionSpec.real_page_size_bytes:
        2 * block_size * num_kv_heads * head_size * dtype_size per layer; divided by
        block_size and summed over the stage's layers.
        """
        layers = max(self.layers_per_stage(pp))
        elem = kv_dtype_bytes(kv_cache_dtype, self.dtype)
        return 2 * layers * self.kv_heads_per_rank(tp) * self.head_dim * elem

    # ---- compute ----------------------------------------------------------------------
    def matmul_flops_per_token(self) -> float:
        """2 FLOPs per weight the token passes: all decoder layers plus lm_head."""
        return 2.0 * (self.num_layers * self._layer_params(1) + self.vocab_size * self.hidden_size)

    def attention_flops(self, num_query_tokens: int, context_len: int) -> float:
        """QK^T and PV FLOPs for `num_query_tokens` new tokens ending a causal context.

        `context_len` counts every token attended to, the new ones included: query i
        (1-based) sees context_len - num_query_tokens + i keys.
        """
        q = max(0, num_query_tokens)
        ctx = max(context_len, q)
        pairs = q * (ctx - q) + q * (q + 1) // 2
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers config.json for this shape (LlamaForCausalLM / Qwen2ForCausalLM)."""
        qwen = self.architecture == "Qwen2ForCausalLM"
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "qwen2" if qwen else "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6 if qwen else 1e-5,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": _normalize_model_dtype(self.dtype),
            "vocab_size": self.vocab_size,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if qwen:
            cfg.update(use_sliding_window=False, sliding_window=None, attention_dropout=0.0)
        else:
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=False, pretraining_tp=1)
        return cfg


class ModelConfigError(ValueError):
    """A model's config.json that cannot describe a model: what is wrong (naming the field and
    the file) and what to do. The planner turns it into its ConfigError."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} — {fix}")


# config.json fields every model needs (positive integers), and those that may be absent
_REQUIRED_INT = ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "vocab_size")
_OPTIONAL_INT = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _text_config(cfg: Any, where: str) -> dict:
    """The part of a config.json that describes the language model, its shape checked."""
    fix = "use a transformers config.json of a decoder-only model (Llama, Qwen2, Mistral)"
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{where} holds a JSON {type(cfg).__name__}, not an object", fix)
    text = cfg.get("text_config") or cfg
    if not isinstance(text, dict):
        raise ModelConfigError(
            f"text_config in {where} is a {type(text).__name__}, not an object", fix)
    for fld in (*_REQUIRED_INT, *_OPTIONAL_INT):
        v = text.get(fld)
        if v is None:
            if fld in _REQUIRED_INT:
                raise ModelConfigError(f"{fld} is missing from {where}", fix)
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise ModelConfigError(
                f"{fld}={v!r} in {where} is a {type(v).__name__}, not an integer",
                f"set {fld} to a positive integer")
        if v <= 0:
            raise ModelConfigError(f"{fld}={v} in {where} is not positive",
                                   f"set {fld} to a positive integer")
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    if heads % kv:
        raise ModelConfigError(
            f"num_attention_heads={heads} in {where} is not a multiple of "
            f"num_key_value_heads={kv}", "set num_key_value_heads to a divisor of the heads")
    if not text.get("head_dim") and text["hidden_size"] < heads:
        raise ModelConfigError(
            f"hidden_size={text['hidden_size']} in {where} is smaller than "
            f"num_attention_heads={heads} (head_dim would be 0)",
            "set hidden_size to heads x head_dim, or give head_dim")
    return text


def from_hf_config(cfg: dict, name: str = "custom", source: str | None = None) -> ModelShape:
    """A ModelShape from a transformers config.json dict.

    Missing head_dim means hidden_size // num_attention_heads, missing num_key_value_heads
    means plain multi-head attention (= num_attention_heads), as in transformers.

    Raises:
        ModelConfigError: a field is missing, not a positive integer, or `text_config` is not
            an object (the message names the field and `source`, the file).
    """
    text = _text_config(cfg, source or "the model config")
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    arch = archs[0]
    model_type = str(cfg.get("model_type", ""))
    dtype = text.get("torch_dtype") or text.get("dtype") or "bfloat16"
    return ModelShape(
        name=name,
        hf_name=cfg.get("_name_or_path") or None,
        architecture=arch,
        num_layers=int(text["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate_size=int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        tie_word_embeddings=bool(
            cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        ),
        qkv_bias=bool(
            text.get("attention_bias", model_type.startswith("qwen2") or arch.startswith("Qwen2"))
        ),
        dtype=_normalize_model_dtype(dtype),
        max_position_embeddings=int(text.get("max_position_embeddings") or 8192),
        rope_theta=float(text.get("rope_theta") or 10000.0),
    )


def _preset(
    name: str,
    hf: str | None,
    arch: str,
    layers: int,
    hidden: int,
    heads: int,
    kv: int,
    hd: int,
    inter: int,
    vocab: int,
    **kw: Any,
) -> ModelShape:
    return ModelShape(name, hf, arch, layers, hidden, heads, kv, hd, inter, vocab, **kw)


_L, _Q = "LlamaForCausalLM", "Qwen2ForCausalLM"
# Shapes from each model's Hugging Face config.json.
PRESETS: dict[str, ModelShape] = {
    p.name: p
    for p in [
        _preset(
            "llama-3.1-8b",
            "meta-llama/Llama-3.1-8B",
            _L,
            32,
            4096,
            32,
            8,
            128,
            14336,
            128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
        _preset(
            "llama-3.1-70b",
            "meta-llama/Llama-3.1-70B",
            _L,
            80,
            8192,
            64,
            8,
            128,
            28672,
            128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
        _preset(
            "llama-2-70b",
            "meta-llama/Llama-2-70b-hf",
            _L,
            80,
            8192,
            64,
            8,
            128,
            28672,
            32000,
            dtype="float16",
            max_position_embeddings=4096,
        ),
        _preset(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            _L,
            16,
            2048,
            32,
            8,
            64,
            8192,
            128256,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
        _preset(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B-Instruct",
            _Q,
            24,
            896,
            14,
            2,
            64,
            4864,
            151936,
            tie_word_embeddings=True,
            qkv_bias=True,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
        ),
        _preset(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B-Instruct",
            _Q,
            28,
            3584,
            28,
            4,
            128,
            18944,
            152064,
            qkv_bias=True,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
        ),
        # The shape real vLLM ran for the fixtures (../shared/fixtures/vllm-0.26): 1.65 GiB weights.
        _preset("lab-1b", None, _L, 16, 2048, 16, 8, 128, 5632, 32000, synthetic=True),
        _preset("lab-tiny", None, _L, 4, 256, 4, 2, 64, 704, 32000, synthetic=True),
    ]
}


def get_model(name_or_path: str) -> ModelShape:
    """A preset key ("lab-1b"), an HF name of a preset, a config.json path or a dir holding one."""
    key = str(name_or_path)
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    for shape in PRESETS.values():
        if shape.hf_name and shape.hf_name.lower() == key.lower():
            return shape
    path = Path(key).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{path} is not valid JSON ({exc})",
                                   "give the model's transformers config.json") from None
        shape = from_hf_config(cfg, name=path.parent.name or "custom", source=str(path))
        marker = path.parent / _LABKIT_MARKER
        if marker.is_file():  # a directory write_model_dir() wrote: keep its preset name
            meta = json.loads(marker.read_text())
            shape = replace(
                shape,
                name=meta.get("name", shape.name),
                hf_name=meta.get("hf_name"),
                synthetic=bool(meta.get("synthetic", False)),
            )
        return shape
    known = ", ".join(PRESETS)
    raise KeyError(
        f"unknown model {name_or_path!r}: not a preset ({known}), "
        "a preset's HF name, nor a path to a config.json"
    )


from labkit.tokenizer import BOS_ID, EOS_ID  # noqa: E402

_LABKIT_MARKER = "labkit_model.json"


def write_model_dir(shape: ModelShape, path: str | Path) -> Path:
    """Write a directory `vllm serve DIR --load-format dummy` accepts: config.json,
    generation_config.json and a tokenizer built with `tokenizers` (tokenizer.json,
    tokenizer_config.json with a chat template). Weights stay random (dummy load).

    For a real checkpoint with hub access, serve `shape.hf_name` instead.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shape.to_hf_config(), indent=2))
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "_from_model_config": True}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    build_tokenizer(shape.vocab_size).save(str(out / "tokenizer.json"))
    cfg = _tokenizer_config(shape.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    meta = {"name": shape.name, "hf_name": shape.hf_name, "synthetic": shape.synthetic}
    (out / _LABKIT_MARKER).write_text(json.dumps(meta))
    return out


# The synthetic tokenizer lives in labkit/tokenizer.py; re-exported for existing callers.
from labkit.tokenizer import _CHAT_TEMPLATE, _tokenizer_config, build_tokenizer  # noqa: E402,F401
