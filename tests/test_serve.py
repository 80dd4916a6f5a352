"""``python -m sinkcache serve`` (issue 30): live servers on 127.0.0.1 (ephemeral ports) serving a tiny random
chat model, driven by the official ``openai`` client; every load is bounded and stops by itself."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from benchmarks.serve_load import run_load
from sinkcache.serve.launch import Server, serve_command
from tests.serving import ReferenceChat, build_tiny_chat_model, fresh_reply, load_tiny, user_message

W, S, MAX = 32, 4, 8  # each conversation's cache; replies of 8 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def tiny(folder):
    return load_tiny(folder, W, S)


def start(folder, *extra: str) -> Server:
    return Server(serve_command("--model", str(folder), "--window-length", str(W), "--num-sink-tokens", str(S),
                                "--threads", "1", "--served-model-name", "tiny", "--max-tokens", str(MAX),
                                "--max-tokens-limit", "5000", *extra), timeout_s=120)


@pytest.fixture(scope="module")
def server(folder):
    with start(folder) as running:
        yield running


@pytest.fixture
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_turns(api, model, tokenizer, turns: int, client: int, stream_every: int = 2):
    """A ``turns``-turn chat against the server and against the library; yields both per turn."""
    reference = ReferenceChat(model, tokenizer, W, S, MAX)
    messages = []
    for turn in range(turns):
        messages.append({"role": "user", "content": user_message(client, turn)})
        stream = turn % stream_every == 1
        if stream:
            chunks = list(api.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        else:
            response = api.chat.completions.create(model="tiny", messages=messages, temperature=0)
            text, usage = response.choices[0].message.content, response.usage
        yield text, usage, reference.ask(messages[-1]["content"])
        messages.append({"role": "assistant", "content": text})


def test_models_health_and_the_cli_refusing_bad_options(server, api, folder):
    assert [m.id for m in api.models.list().data] == ["tiny"]
    assert server.get("/health")["status"] == "ok"
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "sinkcache", "serve", "--window-length", "0"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--window-length must be at least 1" in bad.stderr


@pytest.mark.parametrize("option, value", [("--mmap-threshold", "-1"), ("--mmap-threshold", "40000"),
                                           ("--session-memory", "-2"), ("--port", "70000")])
def test_the_cli_refuses_out_of_range_options_before_loading_a_model(capsys, option, value):
    from sinkcache.serve import main

    assert main([option, value], prog="sinkcache serve") == 2
    assert f"sinkcache serve: error: {option} must be" in capsys.readouterr().err


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, [64 * 1024]),
    (["--mmap-threshold", "256"], {}, [256 * 1024]),
    (["--mmap-threshold", "0"], {}, []),
    ([], {"MALLOC_MMAP_THRESHOLD_": "131072"}, []),
    ([], {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, []),
])
def test_the_server_fixes_the_mmap_threshold_unless_told_otherwise(monkeypatch, argv, env, expected):
    import sinkcache.serve as serve_cli
    from sinkcache import machine

    for name in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls: list[int] = []
    monkeypatch.setattr(machine, "fix_mmap_threshold", lambda nbytes: calls.append(nbytes) or True)
    monkeypatch.setattr(serve_cli, "serve", lambda args, uvicorn: 0)  # everything but the model and the socket
    assert serve_cli.main(argv) == 0
    assert calls == expected


def test_replies_equal_the_library_turn_by_turn_past_the_window(api, tiny):
    """Item 4: 14 turns (about 600 tokens through a 32-token cache), streamed and not, each reply equal to
    model.generate's on one SinkCache; every turn after the first continues its session."""
    model, tokenizer = tiny
    for turn, (text, usage, (expected, prompt_tokens, seen)) in enumerate(chat_turns(api, model, tokenizer, 14, 0)):
        assert text == expected, f"turn {turn}"
        assert usage.prompt_tokens == prompt_tokens
        assert usage.prompt_tokens_details.cached_tokens == seen and (turn == 0) == (seen == 0)
    assert seen > 10 * W


def test_completions_continue_their_session(api, tiny):
    model, tokenizer = tiny
    reference = ReferenceChat(model, tokenizer, W, S, MAX, template=False)
    prompt = ""
    for turn in range(4):
        prompt += f" turn {turn}: " + user_message(7, turn)
        response = api.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=MAX)
        expected, prompt_tokens, seen = reference.ask(prompt[len(reference.text):])
        assert response.choices[0].text == expected
        assert (response.usage.prompt_tokens, response.usage.prompt_tokens_details.cached_tokens) == (prompt_tokens,
                                                                                                     seen)
        prompt += response.choices[0].text


def test_a_regenerated_or_edited_turn_starts_a_new_session_and_is_right(api, tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": user_message(3, 0)}]
    first = api.chat.completions.create(model="tiny", messages=messages, temperature=0)
    messages += [{"role": "assistant", "content": "(edited) " + first.choices[0].message.content},
                 {"role": "user", "content": user_message(3, 1)}]
    edited = api.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert edited.usage.prompt_tokens_details.cached_tokens == 0
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert edited.choices[0].message.content == fresh_reply(model, tokenizer, text, W, S, MAX)


def test_the_same_conversation_twice_at_once(api, tiny):
    """Two concurrent requests on one conversation never share a SinkCache: one continues the session (the
    library's turn-by-turn reply), the other gets a new one (the reply to the whole prompt prefilled afresh)."""
    model, tokenizer = tiny
    reference = ReferenceChat(model, tokenizer, W, S, MAX)
    messages = [{"role": "user", "content": user_message(4, 0)}]
    expected = [reference.ask(messages[0]["content"])[0]]
    first = api.chat.completions.create(model="tiny", messages=messages, temperature=0).choices[0].message.content
    assert first == expected[0]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": user_message(4, 1)}]
    expected.append(reference.ask(messages[-1]["content"])[0])
    replies: list[tuple[int, str]] = []

    def ask() -> None:
        response = api.chat.completions.create(model="tiny", messages=messages, temperature=0)
        replies.append((response.usage.prompt_tokens_details.cached_tokens, response.choices[0].message.content))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    (fresh, new), (continued, old) = sorted(replies)
    assert fresh == 0 and new == fresh_reply(model, tokenizer, text, W, S, MAX)
    assert continued > 0 and old == expected[1]


def post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}
BAD = [
    ("malformed JSON", "{\"model\": \"tiny\", ", 400, None),
    ("not an object", "[1, 2]", 400, None),
    ("missing messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {**CHAT, "messages": []}, 400, "messages"),
    ("mistyped max_tokens", {**CHAT, "max_tokens": "many"}, 400, "max_tokens"),
    ("mistyped content", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content.str"),
    ("unknown role", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("unknown model", {**CHAT, "model": "gpt-9"}, 404, "model"),
    ("zero max_tokens", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("negative max_tokens", {**CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("absurd max_tokens", {**CHAT, "max_tokens": 10**12}, 400, "max_tokens"),
    ("absurd max_completion_tokens", {**CHAT, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ("temperature out of range", {**CHAT, "temperature": 7}, 400, "temperature"),
    ("tools", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("n > 1", {**CHAT, "n": 3}, 400, "n"),
    ("logprobs", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("stop sequences", {**CHAT, "stop": ["\n"]}, 400, "stop"),
    ("json output", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
]


@pytest.mark.parametrize("body,status,param", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, api, body, status, param):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert api.chat.completions.create(model="tiny", messages=CHAT["messages"], temperature=0, max_tokens=2)


def test_openai_client_raises_on_bad_input_and_unknown_routes_answer_in_shape(server, api):
    with pytest.raises(openai.NotFoundError, match="does not exist: this server serves 'tiny'") as error:
        api.chat.completions.create(model="other", messages=CHAT["messages"])
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="between 1 and 5000"):
        api.completions.create(model="tiny", prompt="x", max_tokens=0)
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def long_prompt(model, tokenizer) -> str:
    """A completion prompt whose greedy reply runs 200 tokens without the end token (checked with the library)."""
    for k in range(20):
        text = " ".join(user_message(9, k) for _ in range(3))
        chat = ReferenceChat(model, tokenizer, W, S, 200, template=False)
        chat.ask(text)
        if len(chat.ids) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 200:
            return text
    raise AssertionError("no prompt without an early end token")


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, api, tiny):
    """Item 5: the generation stops (far short of max_tokens), the server keeps serving, and the next request of
    that conversation is answered right (its session was dropped: it is prefilled again)."""
    model, tokenizer = tiny
    prompt = long_prompt(model, tokenizer)
    before = server.get("/health")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a raw client that hangs up
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 5000, "temperature": 0, "stream": True})
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while received.count(b"data: ") < 4:
            received += sock.recv(4096)
    deadline = time.monotonic() + 30
    while (stats := server.get("/health"))["served"] == before["served"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["served"] == before["served"] + 1 and stats["cancelled"] == before["cancelled"] + 1
    assert stats["last_cancelled_tokens"] < 200  # of 5000 asked: stopped once the disconnect was seen
    response = api.completions.create(model="tiny", prompt=prompt + " again", temperature=0, max_tokens=MAX)
    assert response.usage.prompt_tokens_details.cached_tokens == 0
    assert response.choices[0].text == fresh_reply(model, tokenizer, prompt + " again", W, S, MAX)


def test_load_8_clients_20_turns_every_reply_equals_its_reference(server, tiny):
    """Item 6, short version: 8 concurrent clients x 20 turns, half streamed: no errors, every reply equal to its
    sequential reference, every later turn continued, server memory flat after warm-up."""
    model, tokenizer = tiny
    result = run_load(server.url, "tiny", clients=8, turns=20, max_tokens=MAX, message=user_message,
                      rss=server.rss_bytes, timeout_s=120)
    summary = result.summary()
    print("load (tiny model):", json.dumps(summary))
    assert summary["requests"] == 160 and summary["errors"] == 0
    for client in range(8):
        reference = ReferenceChat(model, tokenizer, W, S, MAX)
        assert result.replies(client) == [reference.ask(user_message(client, t))[0] for t in range(20)]
    assert summary["continued_share"] == 1.0
    assert summary["rss_end_mib"] - summary["rss_after_warmup_mib"] < 16


def test_api_key_and_eviction_under_a_small_budget(folder, tiny):
    """--api-key: requests without it get 401. --session-memory below two sessions: interleaved conversations
    evict each other, and an evicted one is prefilled again from its request, right."""
    model, tokenizer = tiny
    with start(folder, "--api-key", "sesame", "--session-memory", "0.04") as server:
        anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key") as error:
            anonymous.models.list()
        assert error.value.code == "invalid_api_key"
        assert post(server, "/v1/chat/completions", CHAT).status_code == 401
        assert server.get("/health")["status"] == "ok"  # health needs no key
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        chats = {c: [] for c in (5, 6)}
        for turn in range(3):
            for client, messages in chats.items():
                messages.append({"role": "user", "content": user_message(client, turn)})
                response = api.chat.completions.create(model="tiny", messages=messages, temperature=0)
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                assert response.choices[0].message.content == fresh_reply(model, tokenizer, text, W, S, MAX)
                assert response.usage.prompt_tokens_details.cached_tokens == 0
                messages.append({"role": "assistant", "content": response.choices[0].message.content})
        assert server.get("/health")["evicted"] >= 4


def test_example_chat_client_chats_and_its_later_turns_are_cached(server):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "chat_client.py"
    run = subprocess.run([sys.executable, str(script), "--url", server.url, "--turns", "3", "--max-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    usage = [line for line in run.stdout.splitlines() if line.startswith("[usage]")]
    assert len(usage) == 3 and "cached=0 " in usage[0]
    assert all("cached=0 " not in line and "generated=4" in line for line in usage[1:])


def test_a_request_with_nothing_new_to_feed_starts_a_new_session():
    """A request whose ids are all consumed already (a completion's prompt plus its reply that ended on the stop
    token, sent back as is) must not continue the session: generate() would feed the whole prompt again on top of
    the cache. It gets a new session; one token more continues the kept one."""
    import torch

    from sinkcache import CACHE_KWARG, SinkCache, enable_streaming
    from sinkcache.serve.sessions import Session, SessionStore
    from tests.zoo import tiny_model

    def tokenize(text: str) -> list[int]:
        return [3 + ord(character) % 90 for character in text]

    model = enable_streaming(tiny_model("llama"), W, S)
    ids = torch.tensor(tokenize("abcde"))
    cache = SinkCache(W, S)
    with torch.no_grad():
        model(input_ids=ids[None], **{CACHE_KWARG: cache})
    kept = Session(cache)
    kept.extend(ids, b"abcde")
    store = SessionStore(2**30, lambda: SinkCache(W, S))
    store.put(kept)
    claim = store.claim("abcde", tokenize)
    assert claim.session is not kept and claim.session.cache.seen == 0 and len(store) == 1
    claim = store.claim("abcdef", tokenize)
    assert claim.session is kept and claim.ids.tolist() == tokenize("abcdef") and len(store) == 0
