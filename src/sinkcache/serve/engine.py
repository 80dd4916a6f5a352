"""Generation for the server: one worker thread runs the requests one at a time, in arrival order (a queue).

Why a queue and not batching: each request continues its own SinkCache, whose stream has its own length and
positions; batching several conversations would need one cache per row (a SinkCache holds one stream of a fixed
batch). On CPU a one-token step of a small model costs about the same for 1 row as for a few, so batching would
raise throughput, but at the price of per-row caches that this library does not have. The queue keeps every
reply exactly what ``model.generate`` gives for its conversation alone; measured in ``docs/serve.md``.

A request's tokens travel from the worker to the event loop through ``Job.events`` (thread-safe hand-over with
``loop.call_soon_threadsafe``). Cancelling a job (the client went away) stops its generation at the next step,
through a stopping criterion, and drops its session.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..cache import SinkCache
from ..compat import CACHE_KWARG
from .protocol import APIError
from .sessions import SessionStore

log = logging.getLogger("sinkcache.serve")


@dataclass
class Settings:
    """What a request asks of the model."""

    prompt: str  # the text to continue: the chat template's rendering, or a completion prompt
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Result:
    """A finished reply. ``text`` is what the client received (the decoded reply, without the stop token)."""

    text: str
    finish_reason: str  # "stop" (the model's end token) or "length" (max_tokens)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the session's cache had already consumed: not fed again
    completion_tokens: int  # generated tokens, the stop token included


@dataclass
class Job:
    """One request in flight. ``events`` yields ``("text", delta)`` pieces, then ``("done", Result)`` or
    ``("error", APIError)``."""

    settings: Settings
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def send(self, kind: str, value: Any) -> None:
        """From the worker thread: hand one event to the event loop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def cancel(self) -> None:
        """Stop generating for this job (at the next step); harmless once it is done."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind != "text":
                self.finished = True
                return


class _Cancelled(StoppingCriteria):
    """Ends generation at the next step once the job is cancelled."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class _Replies(BaseStreamer):
    """Receives each generated token from ``generate`` and sends the job the reply's new text.

    The text sent so far is always a prefix of the decoded reply: a piece is held back while the decoded text ends
    in an incomplete character (U+FFFD) or would rewrite what was sent; the rest goes out at the end.
    """

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call gives the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.engine.decode(self.reply_ids())
        if not text.endswith("\ufffd"):
            self.flush(text)

    def reply_ids(self) -> list[int]:
        """The generated ids without a final stop token (which the client does not see)."""
        stop = bool(self.ids) and self.ids[-1] in self.engine.stop_ids
        return self.ids[:-1] if stop else self.ids

    def flush(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.send("text", text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


class Engine:
    """The model, its sessions and the worker thread.

    Args:
        model: an enabled model (``sinkcache.enable_streaming``).
        tokenizer: its tokenizer, with a chat template for chat completions.
        window_length, num_sink_tokens: each session's SinkCache.
        session_budget_bytes: memory the kept sessions may hold together; ``sessions=False`` keeps none (every
            request is prefilled in full, the baseline of ``benchmarks/serve.py``).
        max_queue: requests waiting at most; more are answered 503.
    """

    def __init__(self, model: Any, tokenizer: Any, window_length: int, num_sink_tokens: int, *,
                 session_budget_bytes: int = 1 << 30, sessions: bool = True, max_queue: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.window_length, self.num_sink_tokens = window_length, num_sink_tokens
        self.sessions_on = sessions
        self.store = SessionStore(session_budget_bytes if sessions else 0,
                                  lambda: SinkCache(window_length, num_sink_tokens))
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = next(iter(self.stop_ids), 0)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.served = 0
        self.cancelled = 0  # requests whose client went away
        self.last_cancelled_tokens = 0  # tokens the last cancelled request generated before it stopped
        self._worker = threading.Thread(target=self._run, name="sinkcache-serve-worker", daemon=True)
        self._worker.start()

    # ---- what the routes use ----------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template's text for ``messages``, ending with the assistant's header.

        Raises:
            APIError: the tokenizer has no chat template, or the template refuses the messages.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This model's tokenizer has no chat template: use /v1/completions with a prompt.",
                           param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja's TemplateError and whatever a template raises on purpose
            raise APIError(400, f"The chat template refused these messages: {error}", param="messages") from None

    def submit(self, settings: Settings) -> Job:
        """Queue a request; its events come from ``Job.events`` on the calling event loop.

        Raises:
            APIError: 503 when the queue is full.
        """
        job = Job(settings, asyncio.get_running_loop())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, "The server is busy (its request queue is full); retry later.", type="server_error",
                           code="server_overloaded") from None
        return job

    def tokenize(self, text: str) -> list[int]:
        # no special tokens added: the chat template writes its own, and the same text gives the same ids on every
        # transformers release (5.0's GGUF tokenizer would prepend a BOS that 5.24's does not)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def stats(self) -> dict[str, Any]:
        return {"sessions": len(self.store), "session_bytes": self.store.nbytes, "evicted": self.store.evicted,
                "queued": self.jobs.qsize(), "served": self.served, "cancelled": self.cancelled,
                "last_cancelled_tokens": self.last_cancelled_tokens, "sessions_enabled": self.sessions_on}

    def close(self) -> None:
        self.jobs.put(None)

    # ---- the worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                self.cancelled, self.last_cancelled_tokens, self.served = self.cancelled + 1, 0, self.served + 1
                job.send("error", APIError(499, "The client closed the request.", code="cancelled"))
                continue
            try:
                job.send("done", self._generate(job))
            except APIError as error:
                job.send("error", error)
            except Exception as error:  # keep serving: one failed request must not stop the worker
                log.exception("request failed")
                job.send("error", APIError(500, f"Generation failed: {type(error).__name__}: {error}",
                                           type="server_error"))
            self.served += 1

    def _generate(self, job: Job) -> Result:
        settings = job.settings
        claim = self.store.claim(settings.prompt, self.tokenize)
        session, ids = claim.session, claim.ids
        if ids.numel() == 0:
            raise APIError(400, "The prompt is empty: give at least one token of text.", param="prompt")
        cached = session.cache.seen
        streamer = _Replies(self, job)
        sampling = settings.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_tokens, do_sample=sampling, streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([_Cancelled(job)]),
                                      pad_token_id=self.pad_id)
        if sampling:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)  # the one worker thread samples: the seed alone decides
        prompt = ids[None].to(self.model.device)
        output = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     **{CACHE_KWARG: session.cache}, **kwargs)
        generated = output[0, ids.numel():].tolist()
        reply = generated[:-1] if generated and generated[-1] in self.stop_ids else generated
        text = self.decode(reply)
        if not text.startswith(streamer.sent):  # not seen with byte-level tokenizers; never keep a wrong session
            raise APIError(500, "The reply's text changed while it was streamed.", type="server_error")
        streamer.flush(text)
        if job.cancelled.is_set():  # its cache consumed tokens the client never got: drop the session
            self.cancelled, self.last_cancelled_tokens = self.cancelled + 1, len(generated)
            raise APIError(499, "The client closed the request.", code="cancelled")
        if self.sessions_on:
            session.extend(torch.cat([ids, torch.tensor(reply, dtype=torch.long)]),
                           (settings.prompt + text).encode())
            self.store.put(session)
        finish = "stop" if len(reply) < len(generated) else "length"
        return Result(text, finish, ids.numel(), cached, len(generated))
