"""bin/serve as a user runs it: a real server process on 127.0.0.1, driven by the official `openai` client
(and raw HTTP for what a client library would not send). Every wait is bounded in count and time."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from powerinfer_jax.chat import ChatFormatter
from powerinfer_jax.errors import ArgumentError
from powerinfer_jax.server import StopMatcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(REPO, "bin", "serve")
MODEL = "shakespeare-relu-llama"
MAX_SEQ_LEN = 256
START_TIMEOUT_S = 180
# Sixteen different prompts (one per concurrent client), of different lengths.
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "MENENIUS:", "KING RICHARD III:\nNow is the winter",
           "GLOUCESTER:", "Second Servingman:", "LADY CAPULET:\nWhat say you?", "DUKE VINCENTIO:", "Nurse:",
           "BUCKINGHAM:\nMy lord,", "CORIOLANUS:", "QUEEN ELIZABETH:", "PETRUCHIO:\nCome, come,",
           "HERMIONE:", "The king hath"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _post(port: int, path: str, body, timeout: float = 60.0) -> tuple[int, dict]:
    """POSTs raw bytes, or an object as JSON; returns (status, parsed body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log_path: str):
        self.port, self.proc, self.log_path = port, proc, log_path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def health(self) -> dict:
        status, body = _get(self.port, "/health")
        assert status == 200, body
        return body

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Polls /health (bounded) until no request is active, waiting or in flight."""
        deadline, body = time.monotonic() + timeout, {}
        for _ in range(int(timeout / 0.1) + 1):
            body = self.health()
            b = body["batcher"]
            if body["requests_in_flight"] == 0 and b["active"] == 0 and b["waiting"] == 0:
                return body
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise AssertionError(f"the server did not become idle within {timeout} s: {body}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = str(tmp_path_factory.mktemp("serve") / "serve.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, SERVE, "--port", str(port), "--max_seq_len", str(MAX_SEQ_LEN)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    srv = Server(port, proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"bin/serve exited with {proc.returncode}:\n{srv.log()}"
            try:
                if _get(port, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"bin/serve not up within {START_TIMEOUT_S} s:\n{srv.log()}"
            time.sleep(0.25)
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            rc = "killed after 30 s"
    assert rc == 0, f"bin/serve did not exit cleanly on SIGTERM ({rc}):\n{srv.log()}"
    assert "Traceback" not in srv.log(), srv.log()


def _greedy(client, prompt: str, max_tokens: int, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def _prompt_tokens(text: str) -> int:
    from powerinfer_jax import default_model_dir, load_config
    from powerinfer_jax.tokenizer import Tokenizer

    cfg = load_config(default_model_dir())
    return len(Tokenizer(default_model_dir(), cfg.bos_token_id, cfg.eos_token_ids).encode(text))


def test_freeze_startup_heap():
    """Objects alive at startup leave the collector's passes (gc.get_objects lists what a full pass walks)."""
    import gc

    from powerinfer_jax.server import freeze_startup_heap

    made_before = [object()]  # a tracked container
    try:
        frozen, seconds = freeze_startup_heap()
        # frozen objects that die later leave the permanent generation (other threads free some): the count only shrinks
        assert 0 < gc.get_freeze_count() <= frozen and seconds >= 0
        assert not any(o is made_before for o in gc.get_objects())
        made_after = [object()]
        assert any(o is made_after for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is made_before for o in gc.get_objects())


# ---- the server ---------------------------------------------------------------------------------------------
def test_models_and_health(server):
    assert "serving shakespeare-relu-llama on http://127.0.0.1:" in server.log()
    assert re.search(r"froze \d+ startup objects", server.log())
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    body = server.health()
    assert body["status"] == "ok" and body["model"] == MODEL


def test_completion_max_tokens_and_usage(server):
    res = _greedy(server.client(), "ROMEO:", 12)
    choice = res.choices[0]
    assert res.object == "text_completion" and res.model == MODEL and res.id
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    assert res.usage.completion_tokens == 12
    assert res.usage.prompt_tokens == _prompt_tokens("ROMEO:")
    assert res.usage.total_tokens == res.usage.prompt_tokens + 12
    # A list of one prompt is the same request; greedy is deterministic.
    again = _greedy(server.client(), ["ROMEO:"], 12)
    assert again.choices[0].text == choice.text


def test_streaming_joins_to_the_non_streamed_text(server):
    client = server.client()
    whole = _greedy(client, "JULIET:", 16)
    chunks = list(_greedy(client, "JULIET:", 16, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_chat_completion(server):
    messages = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak, man."}]
    res = server.client().chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                  temperature=0.8, top_p=0.9, seed=7, extra_body={"top_k": 40})
    assert res.object == "chat.completion" and res.model == MODEL
    msg = res.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert res.choices[0].finish_reason in ("stop", "length") and 1 <= res.usage.completion_tokens <= 10
    # The bundled model has no chat template: the documented plain one, with BOS.
    from powerinfer_jax import default_model_dir, load_config
    from powerinfer_jax.tokenizer import Tokenizer

    cfg = load_config(default_model_dir())
    fmt = ChatFormatter(Tokenizer(default_model_dir(), cfg.bos_token_id, cfg.eos_token_ids), default_model_dir())
    assert fmt.kind == "plain"
    assert res.usage.prompt_tokens == len(fmt.prompt_ids(messages))
    # Same seed, same settings: the same sampled text.
    again = server.client().chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                    temperature=0.8, top_p=0.9, seed=7, extra_body={"top_k": 40})
    assert again.choices[0].message.content == msg.content


def test_stop_sequences(server):
    client = server.client()
    full = _greedy(client, "MENENIUS:", 24).choices[0].text
    assert len(full) > 12, full
    # A stop string from the middle of the text (several characters: it may span tokens).
    start = len(full) // 2
    stop = full[start:start + 4]
    expected = full[:full.find(stop)]
    res = _greedy(client, "MENENIUS:", 24, stop=[stop, "never in this text \u2603"])
    assert res.choices[0].text == expected and res.choices[0].finish_reason == "stop"
    assert res.usage.completion_tokens < 24
    pieces = [c.choices[0].text for c in _greedy(client, "MENENIUS:", 24, stop=stop, stream=True)]
    assert "".join(pieces) == expected and not any(stop in p for p in pieces)
    server.wait_idle()  # the stop cancelled the request in the batcher too


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    ok = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [  # (path, body, status, param)
        ("/v1/completions", b'{"model": "x", "prompt": ', 400, None),  # invalid JSON
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", b"", 400, None),
        ("/v1/completions", {**ok, "model": "gpt-4"}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {**chat, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         400, "messages.0.content"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {**ok, "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat, "max_tokens": 10 * MAX_SEQ_LEN}, 400, "max_tokens"),
        ("/v1/completions", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {**ok, "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {**ok, "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {**ok, "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {**ok, "top_k": -1}, 400, "top_k"),
        ("/v1/completions", {**ok, "n": 2}, 400, "n"),
        ("/v1/completions", {**ok, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ("/v1/chat/completions", {**chat, "presence_penalty": -1.0}, 400, "presence_penalty"),
        ("/v1/completions", {**ok, "logit_bias": {"50": 10}}, 400, "logit_bias"),
        ("/v1/completions", {**ok, "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {**ok, "prompt": [1, 10**9]}, 400, None),  # a token id outside the vocabulary
        ("/v1/completions", {**ok, "prompt": "ROMEO: " * 150_000}, 400, "prompt"),  # a 1 MB prompt
        ("/v1/completions", b'{"model": "%s", "prompt": "a", "temperature": NaN}' % MODEL.encode(), 400,
         "temperature"),
        ("/v1/nowhere", ok, 404, None),
    ]
    for path, body, status, param in cases:
        got, reply = _post(server.port, path, body)
        assert got == status, (path, body if len(str(body)) < 300 else "(long)", reply)
        err = reply["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], reply
        assert err["param"] == param, (body if len(str(body)) < 300 else "(long)", reply)
        if err["param"] in ("max_tokens", "prompt") and got == 400 and "context" in err["message"]:
            assert err["code"] == "context_length_exceeded"
    # The real client raises its typed errors for these.
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=MAX_SEQ_LEN)
    # Still serving.
    assert _greedy(client, "ROMEO:", 3).usage.completion_tokens == 3
    server.wait_idle()


def test_sixteen_concurrent_streams_each_get_their_own_greedy_text(server):
    client = server.client()
    alone = [_greedy(client, p, 8).choices[0].text for p in PROMPTS]
    assert len(set(alone)) >= 8, alone  # different prompts, mostly different texts: mixing would show
    got: dict[int, str] = {}
    errors: list[str] = []
    barrier = threading.Barrier(len(PROMPTS), timeout=60)

    def stream(i: int) -> None:
        try:
            c = server.client()
            barrier.wait()
            got[i] = "".join(ch.choices[0].text for ch in _greedy(c, PROMPTS[i], 8, stream=True))
        except Exception as err:  # noqa: BLE001  (reported by the main thread)
            errors.append(f"client {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a streaming client did not finish within 120 s"
    assert not errors, errors
    assert [got[i] for i in range(len(PROMPTS))] == alone
    server.wait_idle()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    client = server.client()
    before = server.wait_idle()["batcher"].get("tokens_generated", 0)
    max_tokens = MAX_SEQ_LEN - 16
    stream = _greedy(client, "ROMEO:", max_tokens, stream=True)
    for n, _chunk in enumerate(stream):
        if n == 1:
            break
    stream.close()  # the client goes away after two chunks
    after = server.wait_idle(timeout=20)["batcher"].get("tokens_generated", 0)
    assert after - before < max_tokens // 4, "the request kept generating after its client left"
    # A non-streaming client that gives up: its request is cancelled too.
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"model": MODEL, "prompt": "JULIET:", "max_tokens": max_tokens, "temperature": 0}).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(200):  # bounded: until the request is generating (or 10 s)
        if server.health()["batcher"]["active"] or server.health()["batcher"].get("tokens_generated", 0) > after:
            break
        time.sleep(0.05)
    conn.close()
    final = server.wait_idle(timeout=20)["batcher"].get("tokens_generated", 0)
    assert final - after < max_tokens // 4, "the request kept generating after its client left"
    # The next request is admitted and completes.
    assert _greedy(client, "ROMEO:", 4).usage.completion_tokens == 4


# ---- pieces without a server --------------------------------------------------------------------------------
def test_stop_matcher_cuts_and_holds_back():
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(hits)] if hits else text
        m, out, stopped, pos = StopMatcher(stops), [], False, 0
        while pos < len(text) and not stopped:  # random piece sizes, some empty
            step = rng.randint(0, 3)
            piece, stopped = m.push(text[pos:pos + step])
            pos += step
            out.append(piece)
            assert not any(s in "".join(out) for s in stops), (text, stops, out)
        if not stopped:
            piece, stopped = m.finish(text)
            out.append(piece)
        assert "".join(out) == expected and stopped == bool(hits), (text, stops, out)


def test_chat_template_from_the_model(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system messages') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    fmt = ChatFormatter(None, str(tmp_path))
    assert fmt.kind == "model"
    assert fmt.render([{"role": "user", "content": "hi"}]) == "<s><|user|>hi</s><|assistant|>"
    with pytest.raises(ArgumentError, match="no system messages"):
        fmt.render([{"role": "system", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}))
    with pytest.raises(ArgumentError):  # the sandbox refuses it
        ChatFormatter(None, str(tmp_path)).render([{"role": "user", "content": "x"}])
    plain = ChatFormatter(None, None)
    assert plain.kind == "plain"
    assert plain.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == \
        "System: S\n\nUser: U\n\nAssistant:"


def test_serve_flags_are_checked_before_the_model_loads():
    out = subprocess.run([sys.executable, SERVE, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode in (0, 1), out.stderr
    for name in ("model", "bundle_model", "sparsity", "device_memory_budget", "threshold", "dtype", "quantize",
                 "kv_dtype", "host", "port", "max_batch", "max_seq_len", "prefill_chunk", "model_name"):
        line = next((l for l in out.stdout.splitlines() if l.startswith(f"  --{name}:") or
                     l.startswith(f"  --[no]{name}:")), None)
        assert line and line.split(":", 1)[1].strip(), f"--{name} undocumented in --help"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        out = subprocess.run([sys.executable, SERVE, "--port", str(busy.getsockname()[1])], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "cannot listen on" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, SERVE, "--port", "70000"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 2 and "error:" in out.stderr, out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_model_compiles_is_not_lost(sig):
    """SIGTERM or Ctrl-C during the startup compiles (a minute for a 7B model) stops the server then: it never
    starts listening, says "interrupted" and exits 130, without a traceback."""
    proc = subprocess.Popen([sys.executable, SERVE, "--port", "0", "--max_seq_len", str(MAX_SEQ_LEN)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    deadline = threading.Timer(START_TIMEOUT_S, proc.kill)  # bounds the reads below: a hung server is killed
    deadline.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("compiling the decode steps"):
                proc.send_signal(sig)
                break
        rc = proc.wait(timeout=60)
        log = "".join(seen) + proc.stderr.read()
    finally:
        deadline.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert rc == 130 and "interrupted" in log, (rc, log)
    assert "serving" not in log and "Traceback" not in log, log
