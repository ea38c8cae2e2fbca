"""Model shapes: vLLM's weight / KV arithmetic, presets, config.json round trips, model dirs."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from labfixtures import FIXTURES

from labkit.models import (
    PRESETS,
    ModelShape,
    build_tokenizer,
    from_hf_config,
    get_model,
    kv_dtype_bytes,
    normalize_kv_dtype,
    write_model_dir,
)

GiB = 1 << 30


def test_llama_8b_kv_bytes_per_token_bf16_and_fp8():
    m = PRESETS["llama-3.1-8b"]
    assert m.kv_bytes_per_token() == 131_072  # 2 * 32 layers * 8 kv heads * 128 * 2 B
    assert m.kv_bytes_per_token("bfloat16") == 131_072
    assert m.kv_bytes_per_token("fp8") == 65_536
    assert m.kv_bytes_per_token("fp8_e5m2") == 65_536


def test_llama_8b_params():
    assert PRESETS["llama-3.1-8b"].num_params() == pytest.approx(8.03e9, rel=2e-3)
    assert PRESETS["llama-3.1-70b"].num_params() == pytest.approx(70.55e9, rel=2e-3)
    assert PRESETS["qwen2.5-0.5b"].num_params() == pytest.approx(0.494e9, rel=5e-3)


def test_tp_halves_kv_and_replicates_beyond_kv_heads():
    m = PRESETS["llama-3.1-8b"]  # 8 KV heads
    assert m.kv_bytes_per_token(tp=2) == m.kv_bytes_per_token() // 2
    assert m.kv_bytes_per_token(tp=8) == m.kv_bytes_per_token() // 8
    # tp=16 > 8 KV heads: each rank keeps one (replicated) KV head, not half a head
    assert m.kv_bytes_per_token(tp=16) == m.kv_bytes_per_token(tp=8)
    assert m.kv_heads_per_rank(16) == 1


def test_pp_splits_layers_like_vllm_get_pp_indices():
    m = PRESETS["llama-3.1-8b"]
    assert m.layers_per_stage(2) == [16, 16]
    # vllm/distributed/utils.py get_pp_indices: remainder to stages before the last
    assert m.layers_per_stage(3) == [11, 11, 10]
    assert PRESETS["llama-3.1-70b"].layers_per_stage(6) == [13, 13, 13, 14, 14, 13]
    assert sum(PRESETS["qwen2.5-7b"].layers_per_stage(5)) == 28
    assert m.kv_bytes_per_token(pp=2) == m.kv_bytes_per_token() // 2
    assert m.kv_bytes_per_token(pp=3) == 131_072 * 11 // 32  # the largest stage
    with pytest.raises(ValueError):
        m.layers_per_stage(33)


def test_weight_bytes_split_over_tp_and_pp():
    m = PRESETS["llama-3.1-8b"]
    (whole,) = m.weight_bytes()
    assert whole == m.num_params() * 2
    first, last = m.weight_bytes(pp=2)
    emb = 128_256 * 4096 * 2
    assert first + last == whole
    assert last - first == 4096 * 2  # the final norm is on the last stage, embed/lm_head one each
    assert first > emb
    (t2,) = m.weight_bytes(tp=2)
    assert whole / 2 < t2 < whole / 2 + 4 * 1024 * 1024  # only norms are replicated


def test_tied_embeddings_counted_once_and_on_last_stage_with_pp():
    m = PRESETS["llama-3.2-1b"]
    emb = 128_256 * 2048 * 2
    (whole,) = m.weight_bytes()
    assert whole == m.num_params() * 2
    first, last = m.weight_bytes(pp=2)
    assert first + last == whole + emb  # vLLM keeps a copy for the tied lm_head on the last stage


def test_lab_1b_weights_match_what_vllm_logged():
    (w,) = PRESETS["lab-1b"].weight_bytes()
    assert round(w / GiB, 2) == 1.65
    log = (FIXTURES / "logs" / "nixl-prefill.log").read_text()
    logged = float(re.search(r"([\d.]+) GiB for weight", log).group(1))
    assert round(w / GiB, 2) == logged


def test_lab_1b_kv_bytes_match_nixl_transfer_fixture():
    # DESIGN: 864,026,624 B moved for 13,184 tokens = 64 KiB per token
    assert PRESETS["lab-1b"].kv_bytes_per_token() * 13_184 == 864_026_624


def test_kv_dtype_names():
    assert normalize_kv_dtype("bf16") == "bfloat16"
    assert normalize_kv_dtype("FP16") == "float16"
    assert normalize_kv_dtype("fp8") == "fp8"
    assert kv_dtype_bytes("auto", "float16") == 2
    assert kv_dtype_bytes("fp8_e4m3") == 1
    assert kv_dtype_bytes("auto", "float32") == 4
    with pytest.raises(ValueError, match="int3"):
        normalize_kv_dtype("int3")


def test_flops():
    m = PRESETS["llama-3.1-8b"]
    per_tok = m.matmul_flops_per_token()
    # 2 * (params - embedding) (the lm_head matmul is counted, the embedding lookup is not)
    assert per_tok == pytest.approx(2 * (m.num_params() - 128_256 * 4096), rel=1e-6)
    # decode: one query over 1,000 keys; prefill of 1,000: 1000*1001/2 pairs
    one = 4 * 32 * 32 * 128
    assert m.attention_flops(1, 1000) == one * 1000
    assert m.attention_flops(1000, 1000) == one * 1000 * 1001 // 2
    assert m.attention_flops(100, 1100) == one * (100 * 1000 + 100 * 101 // 2)


def test_from_hf_config_defaults():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 1024,
        "num_attention_heads": 8,
        "num_hidden_layers": 4,
        "intermediate_size": 2816,
        "vocab_size": 32000,
        "torch_dtype": "float16",
    }
    m = from_hf_config(cfg)
    assert m.head_dim == 128 and m.num_kv_heads == 8 and m.dtype == "float16"
    assert m.kv_bytes_per_token() == 2 * 4 * 8 * 128 * 2
    m2 = from_hf_config({**cfg, "head_dim": 64, "num_key_value_heads": 2})
    assert (m2.head_dim, m2.num_kv_heads) == (64, 2)


def test_presets_round_trip_through_config_json(tmp_path):
    for shape in PRESETS.values():
        back = from_hf_config(shape.to_hf_config(), name=shape.name)
        for f in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "tie_word_embeddings",
            "qkv_bias",
            "dtype",
            "max_position_embeddings",
            "architecture",
        ):
            assert getattr(back, f) == getattr(shape, f), (shape.name, f)


def test_get_model_by_key_hf_name_and_path(tmp_path):
    assert get_model("lab-1b") is PRESETS["lab-1b"]
    assert get_model("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    cfg = PRESETS["qwen2.5-7b"].to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for where in (tmp_path, tmp_path / "config.json"):
        m = get_model(str(where))
        assert m.num_kv_heads == 4 and m.architecture == "Qwen2ForCausalLM" and m.qkv_bias
    with pytest.raises(KeyError, match="unknown model"):
        get_model("no-such-model")


def test_write_model_dir_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    shape = PRESETS["lab-1b"]
    d = write_model_dir(shape, tmp_path / "lab")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["num_key_value_heads"] == 8 and cfg["max_position_embeddings"] == 8192
    assert (
        json.loads((d / "generation_config.json").read_text())["eos_token_id"]
        == cfg["eos_token_id"]
    )
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == shape.vocab_size
    text = "The prefill engine sends its KV cache to decode. Ünïcode ok?"
    enc = tok.encode(text)
    assert enc.ids[0] == cfg["bos_token_id"]
    assert tok.decode(enc.ids) == text
    assert len(enc.ids) < len(text.encode()) / 2  # merges make common words one token
    # every id decodes (dummy weights sample any of them)
    assert all(isinstance(tok.decode([i]), str) for i in range(0, shape.vocab_size, 997))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert "messages" in tc["chat_template"]
    back = get_model(str(d))
    assert back.name == "lab-1b" and back.synthetic


def test_tokenizer_is_deterministic_and_sized():
    a, b = build_tokenizer(1000), build_tokenizer(1000)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 1000
    assert build_tokenizer(151_936).get_vocab_size() == 151_936
    with pytest.raises(ValueError):
        build_tokenizer(100)


def test_transformers_loads_the_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    for key in ("lab-tiny", "qwen2.5-0.5b"):
        d = write_model_dir(PRESETS[key], tmp_path / key)
        config = transformers.AutoConfig.from_pretrained(str(d))
        assert config.num_hidden_layers == PRESETS[key].num_layers
        tok = transformers.AutoTokenizer.from_pretrained(str(d))
        ids = tok("hello world")["input_ids"]
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "hello world"
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert chat.endswith("<|assistant|>\n") and "hi" in chat


def test_model_shape_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["lab-1b"].num_layers = 3  # type: ignore[misc]
    assert isinstance(PRESETS["lab-tiny"], ModelShape)
