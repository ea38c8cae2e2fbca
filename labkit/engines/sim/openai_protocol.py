"""The OpenAI protocol of the simulated engine: request bodies and vLLM's error shape.

Bodies follow vllm/entrypoints/openai/completion/protocol.py and chat_completion/protocol.py
(only the fields the simulator acts on are typed; the rest is accepted and ignored). Errors
follow vllm/entrypoints/openai/engine/protocol.py (ErrorResponse) and the validation handler
of vllm/entrypoints/serve/utils/server_utils.py, so a learner's client sees the same bodies.
"""
from __future__ import annotations

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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


class CompletionRequest(OpenAIRequest):
    # Same union order as vLLM's CompletionRequest.prompt (the error bodies list it).
    prompt: list[NonNegInt] | list[list[NonNegInt]] | str | list[str]
    max_tokens: int | None = 16


class ChatCompletionRequest(OpenAIRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


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
