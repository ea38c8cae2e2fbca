"""Helpers for the GPU tests: a model directory, vLLM argument lists, results under $OUT.

`labkit.models.write_model_dir` and `labkit.plan` are used when present; the small
fallbacks here only keep the GPU proof runnable while those land.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

OBSERVER = {"kv_connector": "LabkitObserverConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "labkit.pd.observer"}


def out_dir() -> Path:
    """$OUT on the lent GPU machine, else a local folder."""
    path = Path(os.environ.get("OUT") or os.environ.get("LABKIT_GPU_OUT", "/tmp/labkit-gpu-out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_json(name: str, data: Any) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def write_model(path: Path, preset: str = "lab-1b") -> Path:
    """The synthetic model directory vLLM serves with --load-format dummy."""
    try:
        from labkit.models import get_model, write_model_dir

        return write_model_dir(get_model(preset), path)
    except ImportError:
        return _write_model_fallback(path)


def _write_model_fallback(path: Path) -> Path:
    """lab-1b's shape (16 layers, hidden 2048, 16 heads, 8 KV heads, head_dim 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": False, "hidden_act": "silu"}
    (path / "config.json").write_text(json.dumps(cfg))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, 32000):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 4096}))
    return path


def observer_child(endpoint: str, name: str, role: str, bracket: str | None,
                   transfer: str = "") -> dict[str, Any]:
    extra: dict[str, Any] = {"observer_name": name, "observer_role": role,
                             "transfer_connector": transfer}
    if bracket == "open":
        extra = {"observer_bracket": "open"}
    else:
        extra["observer_endpoint"] = endpoint
        if bracket:
            extra["observer_bracket"] = bracket
    return {**OBSERVER, "kv_connector_extra_config": extra}


def example_with_observer(shm: str, endpoint: str, name: str, role: str) -> dict[str, Any]:
    """MultiConnector: observer(open) -> ExampleConnector on /dev/shm -> observer(close)."""
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": shm}}
    return {"kv_connector": "MultiConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"connectors": [
                observer_child(endpoint, name, role, "open"), example,
                observer_child(endpoint, name, role, "close", "ExampleConnector")]}}


def serve_args(model: Path, *, util: float, kv_transfer: dict | None = None,
               kv_events_endpoint: str | None = None, kv_cache_dtype: str = "auto",
               kv_cache_memory: int | None = None, max_model_len: int = 4096,
               eager: bool = True) -> list[str]:
    args = [str(model), "--load-format", "dummy", "--block-size", "16",
            "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(util),
            "--kv-cache-dtype", kv_cache_dtype, "--served-model-name", "lab-1b"]
    if eager:
        args.append("--enforce-eager")
    if kv_cache_memory:
        args += ["--kv-cache-memory", str(kv_cache_memory)]
    if kv_transfer:
        args += ["--kv-transfer-config", json.dumps(kv_transfer)]
    if kv_events_endpoint:
        args += ["--kv-events-config", json.dumps(
            {"enable_kv_cache_events": True, "publisher": "zmq",
             "endpoint": kv_events_endpoint, "topic": "kv"})]
    return args
