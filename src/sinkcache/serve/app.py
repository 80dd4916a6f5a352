"""The FastAPI routes: ``/v1/chat/completions``, ``/v1/completions`` (streamed as server-sent events or not),
``/v1/models`` and ``/health``. Every error is answered in OpenAI's shape (``protocol.APIError``)."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import protocol
from .engine import Engine, Job, Result, Settings
from .protocol import APIError, ChatRequest, CompletionRequest


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, default_max_tokens: int = 512,
               max_tokens_limit: int = 4096) -> FastAPI:
    """The server's app for ``engine``'s model, served as ``model_name``.

    Args:
        api_key: when set, every ``/v1`` request must carry ``Authorization: Bearer <api_key>`` (else 401).
        default_max_tokens: a reply's length when the request gives no ``max_tokens``.
        max_tokens_limit: the largest ``max_tokens`` accepted (a 400 above it).
    """
    app = FastAPI(title="sinkcache serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = protocol.now()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}",
                                     code=code).body(), status_code=error.status_code)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                why = "No API key given" if not given else "Incorrect API key given"
                return JSONResponse(APIError(401, f"{why}: pass it as 'Authorization: Bearer KEY' (the server was "
                                                  "started with --api-key).", code="invalid_api_key").body(),
                                    status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "sinkcache"}]}

    async def body(request: Request, kind: type[protocol.Sampling]) -> Any:
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"The request body is not valid JSON: {error}.", code="invalid_json") from None
        parsed = protocol.parse(kind, data)
        if parsed.model != model_name:
            raise APIError(404, f"The model {parsed.model!r} does not exist: this server serves {model_name!r} "
                                "(GET /v1/models).", param="model", code="model_not_found")
        return parsed

    def settings(parsed: protocol.Sampling, prompt: str) -> Settings:
        temperature = 1.0 if parsed.temperature is None else float(parsed.temperature)  # OpenAI's default
        return Settings(prompt, parsed.token_budget(default_max_tokens, max_tokens_limit), temperature,
                        1.0 if parsed.top_p is None else float(parsed.top_p), parsed.seed)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        parsed: ChatRequest = await body(request, ChatRequest)
        prompt = engine.render([message.rendered() for message in parsed.messages])
        return await answer(request, engine.submit(settings(parsed, prompt)), parsed, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        parsed: CompletionRequest = await body(request, CompletionRequest)
        return await answer(request, engine.submit(settings(parsed, parsed.text())), parsed, chat=False)

    async def answer(request: Request, job: Job, parsed: protocol.Sampling, chat: bool) -> Any:
        ident = protocol.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            return StreamingResponse(stream(job, ident, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            async for kind, value in job.events():
                if kind == "error":
                    raise value
                if kind == "done":
                    return whole(value, ident, chat)
        finally:
            watcher.cancel()
            job.cancel()  # no-op once done; stops the generation if this handler is torn down
        raise APIError(500, "The request ended without a result.", type="server_error")

    def whole(result: Result, ident: str, chat: bool) -> dict[str, Any]:
        usage = protocol.usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": protocol.now(),
                "model": model_name, "choices": [choice], "usage": usage}

    async def stream(job: Job, ident: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = protocol.now()

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                piece: dict[str, Any] = {} if delta is None else {"content": delta}
                if role:
                    piece["role"] = "assistant"
                choice = {"index": 0, "delta": piece, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model_name, "choices": [choice]}

        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield event(chunk("", None, role=True))
            async for kind, value in job.events():
                if kind == "text":
                    yield event(chunk(value, None))
                elif kind == "error":
                    yield event(value.body())
                    return
                else:
                    yield event(chunk(None, value.finish_reason))
                    if include_usage:
                        usage = protocol.usage(value.prompt_tokens, value.completion_tokens, value.cached_tokens)
                        yield event({**chunk(None, None), "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the response task is cancelled here
            job.cancel()

    return app


async def cancel_on_disconnect(request: Request, job: Job, every_s: float = 0.2) -> None:
    """Cancel ``job`` if the client of a non-streamed request goes away before its reply."""
    while not job.finished:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(every_s)
