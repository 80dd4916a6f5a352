"""The OpenAI wire format the server speaks: request models (validated with pydantic), response bodies, errors.

Only what the server implements is accepted. Fields of the OpenAI API that would change the output in a way it does
not implement (tools, ``n`` > 1, log probabilities, stop sequences, penalties, logit bias, structured output) are
refused with a 400 that names the field, instead of being ignored; unknown extra fields are ignored, as clients send
many (``user``, ``metadata``, ...).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = StrictFloat | StrictInt


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    """One part of a message's content given as a list; only text parts are supported."""

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    """A chat message. ``developer`` is rendered as ``system`` (OpenAI's newer name for it)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def rendered(self) -> dict[str, str]:
        """The message as the chat template takes it: role and content as one string."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(field, why)`` for the first field set to something the server does not implement, or ``None``."""
        checks = [
            ("n", self.n not in (None, 1), "only n=1 is supported: send one request per choice"),
            ("stop", bool(self.stop), "stop sequences are not supported: cut the reply on the client"),
            ("logprobs", self.logprobs not in (None, False, 0), "log probabilities are not supported"),
            ("top_logprobs", self.top_logprobs not in (None, 0), "log probabilities are not supported"),
            ("presence_penalty", self.presence_penalty not in (None, 0), "penalties are not supported"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "penalties are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        ]
        return next(((field, why) for field, bad, why in checks if bad), None)

    def token_budget(self, default: int, limit: int) -> int:
        """The reply's maximum length in tokens: ``max_completion_tokens``, else ``max_tokens``, else ``default``.

        Raises:
            APIError: a value below 1 or above ``limit``.
        """
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        value = getattr(self, field)
        if value is None:
            return default
        if not 1 <= value <= limit:
            raise APIError(400, f"{field} must be between 1 and {limit} (this server's --max-tokens-limit), got "
                                f"{value}.", param=field, code="invalid_value")
        return value


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for field in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, field) not in (None, [], "none"):
                return field, "tool and function calling are not supported"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        return super().unsupported()


class CompletionRequest(Sampling):
    """``POST /v1/completions``: one prompt string (or a list holding one)."""

    prompt: StrictStr | list[StrictStr]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "give one prompt per request (a string, or a list of one string)"
        checks = [("echo", self.echo, "echo is not supported"), ("suffix", self.suffix, "suffix is not supported"),
                  ("best_of", self.best_of not in (None, 1), "only best_of=1 is supported")]
        found = next(((field, why) for field, bad, why in checks if bad), None)
        return found or super().unsupported()

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse(model: type[Sampling], data: Any) -> Any:
    """Validate a decoded JSON body as ``model``; a 400 in OpenAI's shape names the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"Invalid field {where}: {first['msg']} (got {first.get('input')!r:.80}).",
                       param=where, code="invalid_value") from None
    bad = request.unsupported()
    if bad is not None:
        raise APIError(400, f"Unsupported field {bad[0]}: {bad[1]}.", param=bad[0], code="unsupported_parameter")
    return request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage block; ``cached_tokens``: prompt tokens the session's cache had consumed (not fed again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def now() -> int:
    return int(time.time())
