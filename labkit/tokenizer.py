"""The lab's synthetic tokenizer: what `write_model_dir` saves so vLLM (and the simulator)
can serve a model directory without a download. Built with the `tokenizers` library.
"""
from __future__ import annotations

import json
from typing import Any

BOS_ID, EOS_ID = 1, 2  # <s>, </s>

# ---- the synthetic tokenizer ---------------------------------------------------------------
# Byte-level BPE: every text encodes (one token per byte at worst); merges for common English
# words make prompts cost roughly real-model token counts; the rest of the vocabulary is
# filled with pronounceable pseudo-words so that random (dummy-weight) outputs decode to text.
_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has will would when who more "
    "if no out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three memory cache block token tokens prefill "
    "decode model layer layers request requests transfer engine batch chunk attention head heads "
    "tensor parallel pipeline value key query GPU KV vLLM page pages free used hash prefix"
).split()
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _pseudo_words():
    cons, vows = "bdfghjklmnprstvwz", "aeiou"
    syll = [c + v for c in cons for v in vows]
    for n in (2, 3, 4):
        level = [""]
        for _ in range(n):
            level = [w + s for w in level for s in syll]
        for w in level:
            yield "\u0120" + w  # byte-level spelling of a leading space
            yield w


def build_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` ids (<s>=1, </s>=2)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(_SPECIALS) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} < {len(_SPECIALS) + len(alphabet)} (bytes + specials)"
        )
    # Train merges on the word list (every word with and without a leading space), then
    # pad the vocabulary with pseudo-words that no merge produces but that decode.
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, len(alphabet) + 4096),
        special_tokens=_SPECIALS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    base.train_from_iterator([" ".join(_WORDS), "\n".join(_WORDS)], trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    fill = _pseudo_words()
    while len(vocab) < vocab_size:
        vocab.setdefault(next(fill), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    return tok


def _tokenizer_config(max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATE,
    }
