"""OpenAI serving for the simulated engine: requests in, engine runs, vLLM's bodies out.

What vllm/entrypoints/openai/completion/serving.py and chat_completion/serving.py do around
the engine: check the model and the token limits, start one engine request per prompt, and
shape the outputs as a JSON answer or an SSE stream (`data: {...}\\n\\n` ... `data: [DONE]`),
matching the captures in ../shared/fixtures/vllm-0.26/http. And what
vllm/entrypoints/serve/tokenize/serving.py does: `/tokenize` turns a prompt or messages into
the very ids a completion or chat request would schedule (one code path for both), so a
router hashing them sees the blocks the engine caches; `/detokenize` turns ids into text.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from labkit.engines.sim.engine import RequestOutput
from labkit.engines.sim.openai_protocol import (
    VLLM_VERSION,
    APIError,
    ChatCompletionRequest,
    ChatTemplateFields,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from labkit.engines.sim.runner import EngineRunner
from labkit.engines.sim.transport import KVLoadError

logger = logging.getLogger("labkit.sim.server")
_TOKENIZE_INLINE = 16 << 10  # characters; longer text is tokenized off the event loop


@dataclass
class _Choice:
    index: int
    prompt_len: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into vLLM's bodies."""

    def __init__(self, runner: EngineRunner) -> None:
        self.runner = runner
        self.created = int(time.time())
        self.fingerprint = f"vllm-{VLLM_VERSION}-sim{uuid.uuid4().hex[:5]}"
        self._max_token_chars: int | None = None

    # -------------------------------------------------------------- shared checks
    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.runner.served_model_name, self.runner.args.model):
            raise APIError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        limit = self.runner.engine.max_model_len
        if requested is not None and requested < 1:
            raise APIError(f"max_tokens must be at least 1, got {requested}. "
                           f"(parameter=max_tokens, value={requested})", param="max_tokens")
        if requested is None:
            if prompt_len >= limit:
                raise APIError(f"This model's maximum context length is {limit} tokens. However, "
                               f"your request has {prompt_len} input tokens. Please reduce the "
                               f"length of the input messages. (parameter=input_tokens, "
                               f"value={prompt_len})", param="input_tokens")
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested} output tokens and your prompt contains {prompt_len} input tokens, "
                f"for a total of {prompt_len + requested} tokens. Please reduce the length of the "
                f"input prompt or the number of requested output tokens. "
                f"(parameter=input_tokens, value={prompt_len})", param="input_tokens")
        return requested

    def _longest_token(self) -> int:
        """Characters of the longest vocabulary entry (byte-level: its bytes)."""
        if self._max_token_chars is None:
            vocab = getattr(self.runner.tokenizer, "get_vocab", lambda: {})()
            self._max_token_chars = max((len(t) for t in vocab), default=64) or 64
        return self._max_token_chars

    def _check_text(self, texts: list[str], *, check_length: bool = True) -> None:
        """Refuse text that cannot fit before tokenizing it: C characters make at least
        C / (longest token) tokens, so a 10 MB prompt is answered at once, not after ~14 s
        of tokenizer work; and a lone surrogate gets a 400, not a 500 echoing the body.
        `check_length=False`: /tokenize, which counts any length (vLLM sets no limit there)."""
        limit = self.runner.engine.max_model_len
        for text in texts:
            at_least = -(-len(text) // self._longest_token())
            if check_length and at_least > limit:
                raise APIError(f"This model's maximum context length is {limit} tokens. However, "
                               f"your request has at least {at_least} input tokens "
                               f"({len(text):,} characters). Please reduce the length of the "
                               f"input prompt. (parameter=input_tokens, value={at_least})",
                               param="input_tokens")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(f"The prompt is not valid Unicode: a lone surrogate at character "
                               f"{exc.start} ({exc.reason}).", param="prompt") from None

    async def _prompts(self, prompt: Any, add_special_tokens: bool = True, *,
                       check_length: bool = True) -> list[list[int]]:
        """A completion's prompt(s) as token ids: text through the tokenizer (BOS added
        unless `add_special_tokens` is off), ids as they are."""
        tok = self.runner.tokenizer
        texts = [prompt] if isinstance(prompt, str) else (
            list(prompt) if prompt and isinstance(prompt[0], str) else None)
        if texts is not None:
            self._check_text(texts, check_length=check_length)
            if sum(map(len, texts)) < _TOKENIZE_INLINE:
                return [tok.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
            # encode_batch releases the GIL: /health and running streams go on meanwhile
            encoded = await asyncio.to_thread(tok.encode_batch, texts,
                                              add_special_tokens=add_special_tokens)
            return [e.ids for e in encoded]
        if prompt and isinstance(prompt[0], list):
            return [list(p) for p in prompt]
        return [list(prompt)]

    def _render_chat(self, messages: list[dict[str, Any]], opts: ChatTemplateFields) -> list[int]:
        """Apply the model's chat template (Jinja, as transformers' apply_chat_template does)
        with the request's switches and tokenize the text (renderers/hf.py render_messages)."""
        r = self.runner
        if not r.chat_template:
            raise APIError("As of transformers v4.44, default chat template is no longer allowed, "
                           "so you must provide a chat template if the tokenizer does not "
                           "define one.")
        if opts.add_generation_prompt and opts.continue_final_message:
            raise APIError("Cannot set both `continue_final_message` and `add_generation_prompt` "
                           "to True.", param="continue_final_message")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        kwargs = {"bos_token": r.bos_token, "eos_token": "</s>",
                  **(opts.chat_template_kwargs or {}),
                  "add_generation_prompt": opts.add_generation_prompt, "messages": messages}
        try:
            text = env.from_string(r.chat_template).render(**kwargs)
        except TemplateError as exc:
            raise APIError(f"The chat template failed on these messages: {exc}") from None
        if opts.continue_final_message:  # transformers: end the text where the last message does
            final = messages[-1].get("content") if messages else None
            final = final.strip() if isinstance(final, str) else ""
            if not final or final not in text:
                raise APIError("continue_final_message is set but the final message does not "
                               "appear in the chat after applying the chat template!",
                               param="continue_final_message")
            text = text[:text.rindex(final) + len(final)]
        return r.tokenizer.encode(text, add_special_tokens=opts.add_special_tokens).ids

    async def _chat_prompt(self, messages: list[dict[str, Any]], opts: ChatTemplateFields, *,
                           check_length: bool = True) -> list[int]:
        """The prompt ids of a chat request, for /v1/chat/completions and /tokenize alike."""
        if opts.chat_template is not None or (opts.chat_template_kwargs or {}).get("chat_template"):
            raise APIError("Chat template is passed with request, but "
                           "--trust-request-chat-template is not set. "
                           "Refused request with untrusted chat template.")
        texts = [m["content"] for m in messages if isinstance(m.get("content"), str)]
        self._check_text(texts, check_length=check_length)
        if sum(map(len, texts)) < _TOKENIZE_INLINE:
            return self._render_chat(messages, opts)
        return await asyncio.to_thread(self._render_chat, messages, opts)

    def _check_sampling(self, body: OpenAIRequest) -> None:
        """SamplingParams._verify_args's check of n (the simulator makes one choice)."""
        if body.n < 1:
            raise APIError(f"n must be at least 1, got {body.n}.", param="n")
        if body.n > 1:
            raise APIError(f"n={body.n}: the simulated engine makes one choice per prompt "
                           f"(n=1)", param="n")

    async def _run(self, req_id: str, index: int, prompt: list[int], max_tokens: int,
                   body: OpenAIRequest) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        choice = _Choice(index, len(prompt), [])
        try:
            gen = self.runner.generate(req_id, prompt, max_tokens, ignore_eos=body.ignore_eos,
                                       kv_transfer_params=body.kv_transfer_params)
            async for out in gen:
                choice.token_ids.extend(out.new_token_ids)
                if out.finished:
                    choice.finish_reason = out.finish_reason
                    choice.kv_transfer_params = out.kv_transfer_params
                yield choice, out
        except ValueError as exc:
            raise APIError(str(exc)) from None

    async def _reach_kv_source(self, body: OpenAIRequest) -> None:
        """nixl decode: the prefill engine holding the KV must answer first (transport
        handshake); if not, vLLM ends the request with an error and answers 500
        (entrypoints/openai/engine/protocol.py GenerationError): here with the reason."""
        if self.runner.transport is None:
            return
        try:
            await self.runner.transport.handshake(body.kv_transfer_params)
        except KVLoadError as exc:
            logger.error("%s", exc)
            raise APIError(str(exc), 500, "InternalServerError", "kv_transfer_params") from None
        except ValueError as exc:  # an address that is not one of the lab's engines
            raise APIError(str(exc), 400, "BadRequestError", "kv_transfer_params") from None

    def _usage(self, choices: list[_Choice]) -> dict[str, int]:
        p = sum(c.prompt_len for c in choices)
        n = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": p, "total_tokens": p + n, "completion_tokens": n}

    def _decode(self, ids: list[int]) -> str:
        return self.runner.tokenizer.decode(ids, skip_special_tokens=True)

    async def _collect(self, runs: list[AsyncIterator[tuple[_Choice, RequestOutput]]]) -> list[_Choice]:
        async def last(it: AsyncIterator[tuple[_Choice, RequestOutput]]) -> _Choice:
            choice = None
            async for item, _ in it:
                choice = item
            assert choice is not None
            choice.text = self._decode(choice.token_ids)
            return choice

        return list(await asyncio.gather(*(last(r) for r in runs)))

    async def _merge(self, runs: list[AsyncIterator[tuple[_Choice, RequestOutput]]]
                     ) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """Interleave several requests' outputs in arrival order (one prompt: no tasks)."""
        if len(runs) == 1:
            async for item in runs[0]:
                yield item
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(it: AsyncIterator[tuple[_Choice, RequestOutput]]) -> None:
            try:
                async for item in it:
                    await queue.put(item)
            except Exception as exc:  # surfaced to the consumer
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(r)) for r in runs]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    # -------------------------------------------------------------- endpoints
    def models(self) -> dict[str, Any]:
        r = self.runner
        perm = {"id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None,
                "is_blocking": False}
        card = {"id": r.served_model_name, "object": "model", "created": self.created,
                "owned_by": "vllm", "root": r.args.model, "parent": None,
                "max_model_len": r.engine.max_model_len, "permission": [perm]}
        return {"object": "list", "data": [card]}

    def _start(self, prefix: str, prompts: list[list[int]], requested: int | None, body: OpenAIRequest
               ) -> tuple[str, list[AsyncIterator[tuple[_Choice, RequestOutput]]]]:
        self._check_model(body.model)
        self._check_sampling(body)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError("Prompt cannot be empty", param="prompt")
        top = max(max(p) for p in prompts)
        if top >= self.runner.shape.vocab_size:  # v1/engine/input_processor.py: a ValueError
            raise APIError(f"Token id {top} is out of vocabulary", param="prompt")
        limits = [self._max_tokens(requested, len(p)) for p in prompts]
        rid = f"{prefix}-{uuid.uuid4().hex[:16]}"
        runs = [self._run(f"{rid}-{i}-{uuid.uuid4().hex[:8]}", i, p, m, body)
                for i, (p, m) in enumerate(zip(prompts, limits, strict=True))]
        return rid, runs

    async def completions(self, body: CompletionRequest) -> Any:
        self._check_model(body.model)
        prompts = await self._prompts(body.prompt, body.add_special_tokens)
        rid, runs = self._start("cmpl", prompts, body.max_tokens, body)
        await self._reach_kv_source(body)
        created = int(time.time())
        model = self.runner.served_model_name
        if body.stream:
            return StreamingResponse(self._completion_stream(rid, created, runs, body),
                                     media_type="text/event-stream")
        choices = await self._collect(runs)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason, "stop_reason": None, "token_ids": None,
                         "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
                        for c in choices],
            "service_tier": None, "system_fingerprint": self.fingerprint,
            "usage": {**self._usage(choices), "prompt_tokens_details": None},
            "kv_transfer_params": choices[0].kv_transfer_params, "ec_transfer_params": None,
            "metrics": None,
        }

    async def _completion_stream(self, rid: str, created: int, runs: list[Any], body: OpenAIRequest
                                 ) -> AsyncIterator[str]:
        model = self.runner.served_model_name
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        texts: dict[int, str] = {}
        seen: dict[int, _Choice] = {}
        async for choice, out in self._merge(runs):
            seen[choice.index] = choice
            text = self._decode(choice.token_ids)
            delta, texts[choice.index] = text[len(texts.get(choice.index, "")):], text
            chunk: dict[str, Any] = {
                "id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": choice.index, "text": delta, "logprobs": None,
                             "finish_reason": out.finish_reason if out.finished else None,
                             "stop_reason": None, "prompt_token_ids": None, "token_ids": None}]}
            if out.finished and not include_usage:
                chunk["system_fingerprint"] = self.fingerprint
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        if include_usage:
            final = {"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [], "usage": self._usage(list(seen.values())),
                     "system_fingerprint": self.fingerprint}
            yield f"data: {json.dumps(final, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    async def chat(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        prompt = await self._chat_prompt(body.messages, body)
        requested = body.max_completion_tokens or body.max_tokens
        rid, runs = self._start("chatcmpl", [prompt], requested, body)
        await self._reach_kv_source(body)
        created = int(time.time())
        model = self.runner.served_model_name
        if body.stream:
            return StreamingResponse(self._chat_stream(rid, created, runs, body),
                                     media_type="text/event-stream")
        (c,) = await self._collect(runs)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text,
                                                 "refusal": None, "annotations": None,
                                                 "audio": None, "function_call": None,
                                                 "reasoning": None},
                         "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": None,
                         "token_ids": None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": self.fingerprint,
            "usage": {**self._usage([c]), "prompt_tokens_details": None},
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": c.kv_transfer_params, "ec_transfer_params": None,
            "metrics": None,
        }

    async def _chat_stream(self, rid: str, created: int, runs: list[Any], body: OpenAIRequest
                           ) -> AsyncIterator[str]:
        model = self.runner.served_model_name
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict[str, Any], finish: str | None) -> str:
            data = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        text, last = "", None
        async for choice, out in self._merge(runs):
            last = choice
            new = self._decode(choice.token_ids)
            delta, text = new[len(text):], new
            yield chunk({"content": delta}, out.finish_reason if out.finished else None)
        if include_usage and last is not None:
            final = {**head, "choices": [], "usage": self._usage([last]),
                     "system_fingerprint": self.fingerprint}
            yield f"data: {json.dumps(final, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"


    # -------------------------------------------------------------- /tokenize, /detokenize
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """ServingTokenization.create_tokenize: the ids the engine would schedule for this
        prompt or these messages, with no length limit (`count` vs `max_model_len` tells)."""
        self._check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = await self._chat_prompt(body.messages, body, check_length=False)
        else:
            (ids,) = await self._prompts(body.prompt, body.add_special_tokens, check_length=False)
        tok = self.runner.tokenizer
        strs = [tok.id_to_token(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.runner.engine.max_model_len,
                "tokens": ids, "token_strs": strs}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        """ServingTokenization.create_detokenize: the text of these ids, special tokens kept
        (transformers' decode default), unknown ids skipped."""
        self._check_model(body.model)
        ids = body.tokens
        decode = self.runner.tokenizer.decode
        try:
            if len(ids) < _TOKENIZE_INLINE:
                text = decode(ids, skip_special_tokens=False)
            else:
                text = await asyncio.to_thread(decode, ids, skip_special_tokens=False)
        except OverflowError as exc:  # an id past u32: vLLM answers a validation error
            raise APIError(f"1 validation error:\n  {exc}", 400, "Bad Request", "tokens") from None
        return {"prompt": text}
