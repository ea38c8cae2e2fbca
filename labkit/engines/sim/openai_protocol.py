"""The OpenAI protocol of the simulated engine: request bodies and vLLM's error shape.

Bodies follow vllm/entrypoints/openai/completion/protocol.py, chat_completion/protocol.py
and vllm/entrypoints/serve/tokenize/protocol.py (only the fields the simulator acts on are
typed; the rest is accepted and ignored, as vLLM's OpenAIBaseModel does). Errors
follow vllm/entrypoints/openai/engine/protocol.py (ErrorResponse) and the validation handler
of vllm/entrypoints/serve/utils/server_utils.py, so a learner's client sees the same bodies.
"""
from __future__ import annotations

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

VLLM_VERSION = "0.26.0"
NonNegInt = Annotated[int, Field(ge=0)]


# ---------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class OpenAIRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="allow")  # temperature, top_p, seed, ...: accepted, ignored
    model: str | None = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    # Typed so that a wrong type gets vLLM's 400 (the simulator samples nothing with them).
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


class ChatTemplateFields(BaseModel):
    """How messages become a prompt: the chat-template switches that /v1/chat/completions and
    /tokenize (chat) share, with vLLM's defaults (the template adds BOS, so no specials)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def check_generation_prompt(cls, data: Any) -> Any:
        """vLLM's check of the raw body (an omitted add_generation_prompt passes)."""
        if isinstance(data, dict) and data.get("continue_final_message") \
                and data.get("add_generation_prompt"):
            raise ValueError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.")
        return data


class CompletionRequest(OpenAIRequest):
    # Same union order as vLLM's CompletionRequest.prompt (the error bodies list it).
    prompt: list[NonNegInt] | list[list[NonNegInt]] | str | list[str]
    max_tokens: int | None = 16
    add_special_tokens: bool = True  # BOS before a text prompt


class ChatCompletionRequest(ChatTemplateFields, OpenAIRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


# /tokenize and /detokenize (vllm/entrypoints/serve/tokenize/protocol.py)
class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatTemplateFields):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]]
    return_token_strs: bool | None = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class KVReadRequest(BaseModel):
    remote_request_id: str
    block_ids: list[int] = Field(default_factory=list)
    remote_engine_id: str | None = None


class KVHeartbeatRequest(BaseModel):
    """A NIXL heartbeat ("HB:<ids>"): extend the lease on these requests' blocks."""

    req_ids: list[str] = Field(max_length=65536)
    remote_engine_id: str | None = None


# ---------------------------------------------------------------- errors (vLLM's shape)
class APIError(Exception):
    """An error answered as vLLM's ErrorResponse {"error": {message, type, param, code}}."""

    def __init__(self, message: str, code: int = 400, type_: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.type, self.param = message, code, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.code)


def _clean_loc(loc: tuple[Any, ...]) -> str:
    """server_utils.py clean_loc_for_param: drop pydantic's union-branch markers."""
    parts = [str(p) for p in loc if not any(c in str(p) for c in "[]{}()")
             and not str(p).startswith("function-")]
    return ".".join(parts or [str(p) for p in loc])


def _short(value: Any) -> Any:
    """An input echoed in an error: long ones cut (a 10 MB prompt is not sent back)."""
    if isinstance(value, str | list | dict | bytes) and len(value) > 100:
        return f"{type(value).__name__} of length {len(value)}"
    return value


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """server_utils.py validation_exception_handler: "N validation errors:\\n  {err}..."."""
    errors = [{k: (_short(v) if k == "input" else v) for k, v in e.items()
               if k in ("type", "loc", "msg", "input", "ctx")} for e in exc.errors()]
    n = len(errors)
    message = (f"{n} validation {'error' if n == 1 else 'errors'}:\n"
               + "".join(f"  {e}\n" for e in errors)).rstrip() if errors else "Validation error"
    param = _clean_loc(tuple(errors[0]["loc"])) if errors and errors[0].get("loc") else None
    return APIError(message, 400, "Bad Request", param).response()
