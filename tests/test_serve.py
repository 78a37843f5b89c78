"""sample.py --serve: real HTTP requests to the demo on a free local port, the openai client against it, a fake
moderation server, and one end-to-end run in headless chromium (driven through chromedriver's WebDriver API)."""
import base64
import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import torch

import sample
import watermark
from train import ModelArgs, Tokenizer, Transformer, format_prompt, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [format_prompt("Give three tips for staying healthy."), "Eat well, sleep enough and move every day.",
         format_prompt("Translate the sentence.", "Le chat dort."), "The cat is sleeping.",
         "Numbers like 12345 and words like alpaca, llama, vicuna."] * 20
SCRIPT = "<script>window.pwned=1</script>"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    folder.mkdir()
    train_tokenizer(TEXTS, str(folder / "tokenizer.model"), vocab_size=400)
    vocab_size = Tokenizer(str(folder / "tokenizer.model")).vocab_size + 5  # padded: ids past the tokenizer's
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                  multiple_of=16, max_seq_len=256))
    model.init_weights(std=0.2)
    with open(folder / "params.json", "w") as f:
        json.dump(dataclasses.asdict(model.args), f)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    return str(folder)


@pytest.fixture
def start(checkpoint, tmp_path, monkeypatch):
    """start(*flags) -> (base url, demo state); the server runs in this process, on a free port."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    servers = []

    def start(*flags):
        args = sample.parse_args(["--checkpoint", checkpoint, "--serve", "--port", "0", "--flags",
                                  str(tmp_path / "flags.jsonl"), "--max_tokens_cap", "64", *flags])
        model, tokenizer = sample.load(args)
        server = sample.make_server(model, tokenizer, args)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.demo

    yield start
    for server in servers:
        server.shutdown()
        sample.close_server(server)


def post(url, path, body, headers=None):
    """(status, parsed JSON or raw text) of a POST with raw bytes or a JSON-able body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def expected(demo, prompt, max_tokens):
    """What the demo should answer at temperature 0: generate() on the same prompt, with the demo's hook."""
    ids = sample.generate(demo.model, [demo.tokenizer.encode(prompt, bos=True)], max_tokens, temperature=0,
                          logits_processor=demo.logits_processor, eos_id=demo.tokenizer.eos_id)[0]
    return demo.tokenizer.decode(ids), ids


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def test_page_states_terms_filter_and_watermark(start):
    url, demo = start("--gamma", "0.5", "--delta", "3")
    with urllib.request.urlopen(url + "/") as response:
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    assert "research use only" in page
    assert "Content filter:</b> off (no OPENAI_API_KEY" in page
    assert "lefthash, gamma 0.5, delta 3.0, key fingerprint " + watermark.key_fingerprint(15485863) in page
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("style-src")[0]


def test_completions_and_chat_with_the_openai_client(start):
    url, demo = start()
    api = client(url)
    # /v1/completions continues the prompt as raw text
    text, ids = expected(demo, "Numbers like", 12)
    reply = api.completions.create(model="tiny", prompt="Numbers like", max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.model == "tiny" and reply.choices[0].text == text
    assert reply.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(demo.tokenizer.encode(
        "Numbers like", bos=True)), len(ids))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["watermark"] == demo.watermark_params and demo.watermark_params["gamma"] == 0.25
    chunks = list(api.completions.create(model="tiny", prompt="Numbers like", max_tokens=12, temperature=0,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    # /v1/chat/completions: the last user message is the instruction, the system message the input
    text, ids = expected(demo, format_prompt("Translate the sentence.", "Le chat dort."), 16)
    messages = [{"role": "system", "content": "Le chat dort."}, {"role": "user", "content": "Translate the sentence."}]
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                              stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len(chunks) > 3  # streamed in pieces
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    # earlier turns become the input
    text, _ = expected(demo, format_prompt("And now?", "Be brief.\n\nUser: Hi\n\nAssistant: Hello"), 8)
    reply = api.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And now?"}])
    assert reply.choices[0].message.content == text
    # sampling is seeded per request: the same seed gives the same text, and the hook (ban + watermark) holds
    one, two = (api.completions.create(model="tiny", prompt="The cat", max_tokens=20, temperature=1.0, seed=s)
                for s in (5, 5))
    assert one.choices[0].text == two.choices[0].text


def test_stop_strings_end_the_output(start):
    url, demo = start()
    text, _ = expected(demo, "Eat well", 40)
    stop = text[10:13]
    assert stop.strip()
    for stream in (False, True):
        # a client that asks to close after this request still gets its stream (status line and headers first)
        status, body = post(url, "/v1/completions", {"prompt": "Eat well", "max_tokens": 40, "temperature": 0,
                                                      "stop": [stop, "never appears"], "stream": stream},
                            {"Connection": "close"} if stream else None)
        assert status == 200
        if stream:
            events = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
            assert body.endswith("data: [DONE]\n\n")
            got = "".join(e["choices"][0]["text"] for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            got, finish = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
        assert got == text[:text.index(stop)] and finish == "stop"


def test_flagging_appends_to_the_flags_file(start, tmp_path):
    (tmp_path / "flags.jsonl").write_text('{"output": "torn')  # left by a demo killed mid-write: cut at start
    url, demo = start()
    status, body = post(url, "/flag", {"instruction": "Name a colour.", "input": "", "output": "Blue <b>",
                                       "reason": "wrong"})
    assert status == 200 and body == {"flagged": True}
    post(url, "/flag", {"output": "second"})
    with open(demo.args.flags) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["instruction"] == "Name a colour." and records[0]["output"] == "Blue <b>"
    assert records[0]["reason"] == "wrong" and records[0]["flagged_by"] == "user"
    assert records[0]["watermark"] == demo.watermark_params and records[0]["time"].startswith("20")
    assert records[1]["output"] == "second" and records[1]["instruction"] == ""
    for bad in ({"instruction": "no output"}, {"output": 5}, {"output": "x", "reason": ["r"]}, ["output"]):
        status, body = post(url, "/flag", bad)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", bad
    with open(demo.args.flags) as f:
        assert len(f.readlines()) == 2


BAD_REQUESTS = [  # path, body, status, param
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": True}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}, 400,
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", ""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt"),  # more than the model's context
    ("/v1/completions", {"prompt": "x" * 5000}, 413, None),  # more than --max_body_bytes
    ("/v1/nothing", {"prompt": "hi"}, 404, None),
    ("/", {"prompt": "hi"}, 404, None),  # a path with another method: no such endpoint
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(start):
    url, demo = start("--max_body_bytes", "4000")
    for path, body, status, param in BAD_REQUESTS:
        got, reply = post(url, path, body)
        assert got == status, (path, body, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
        assert reply["error"]["message"]
    assert post(url, "/v1/completions", {"prompt": "word " * 300})[1]["error"]["code"] == "context_length_exceeded"
    # what a page on another site could send from the user's browser without a CORS preflight
    assert post(url, "/flag", {"output": "spam"}, {"Content-Type": "text/plain"})[0] == 415
    assert post(url, "/v1/completions", {"prompt": "hi", "top_p": 0, "max_tokens": 2})[0] == 200  # as OpenAI
    # GET on a POST endpoint, a missing page; a body without Content-Length is read as none (chunked: not understood)
    for path, status in (("/v1/completions", 404), ("/nope", 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path)
        assert e.value.code == status and json.loads(e.value.read())["error"]["message"]
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        answer = b"".join(iter(lambda: raw.recv(4096), b""))  # the chunk left over is a bad request: the server closes
        assert answer.startswith(b"HTTP/1.1 400") and b"not valid JSON" in answer
    # the openai client sees these as its own exceptions
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).completions.create(model="tiny", prompt="hi", max_tokens=1000)
    status, reply = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 3


def test_requests_for_more_than_the_server_can_give_are_refused_with_the_most_it_can(start):
    url, demo = start("--max_tokens_cap", "100")
    # past the cap: OpenAI's wording for a model's completion limit, with the field it was sent in
    status, reply = post(url, "/v1/completions", {"prompt": "Numbers like", "max_tokens": 101})
    assert status == 400 and reply["error"] == {
        "message": "max_tokens is too large: 101. This server gives at most 100 completion tokens per request, "
                   "whereas you provided 101.", "type": "invalid_request_error", "param": "max_tokens",
        "code": "integer_above_max_value"}
    messages = [{"role": "user", "content": "Give three tips for staying healthy."}]
    status, reply = post(url, "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 101})
    assert (status, reply["error"]["param"]) == (400, "max_completion_tokens")
    # past the context: a long prompt leaves less room than the cap
    prompt = "Eat well, sleep enough and move every day. " * 8
    n = len(demo.tokenizer.encode(prompt, bos=True))
    room = demo.model.args.max_seq_len - n  # 256 - n
    assert 0 < room < 100
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="tiny", prompt=prompt, max_tokens=room + 1)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "max_tokens")
    assert e.value.body["message"] == (
        f"This model's maximum context length is 256 tokens. However, you requested {n + room + 1} tokens ({n} in "
        f"the prompt, {room + 1} in the completion): after this prompt it gives at most {room} completion tokens. "
        "Please reduce the length of the prompt or completion.")
    # the limits stated are exact: asking for just that much is answered, to the end of the context
    reply = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=room, temperature=0)
    assert reply.usage.completion_tokens == len(expected(demo, prompt, room)[1])
    assert post(url, "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 100,
                                              "stop": ["e"]})[0] == 200
    # without max_tokens the default shrinks to what fits
    assert post(url, "/v1/completions", {"prompt": prompt, "temperature": 0})[1]["usage"]["completion_tokens"] == \
        reply.usage.completion_tokens


def test_an_oversized_body_gets_its_413_and_the_server_goes_on(start):
    url, demo = start("--max_body_bytes", "4000")
    host, port = url.split("//")[1].split(":")
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 2}).encode()  # sent whole before the answer is read
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", big, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and f"the body is {len(big)} bytes; this server takes at most 4000" in \
        json.loads(response.read())["error"]["message"]
    assert response.getheader("Connection") == "close"  # the body was not read, so this connection ends
    conn.close()
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
    # a body of the wrong type is read, so the connection can go on after the 415
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/flag", b'{"output": "x"}', {"Content-Type": "text/plain"})
    response = conn.getresponse()
    assert response.status == 415 and response.read()
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    conn.close()


def test_concurrent_clients_are_batched_while_a_silent_one_holds_a_connection(start, monkeypatch, capfd):
    url, demo = start()
    port = int(url.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port))  # connects and never sends a byte
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 b"{\"prompt\"")  # stalls mid-body
    prompts = [format_prompt(f"Say something about number {i}.") for i in range(8)]
    # Sampled, each with its own seed and length: batched rows must come out exactly as they would alone.
    wanted = [demo.tokenizer.decode(sample.generate(
        demo.model, [demo.tokenizer.encode(p, bos=True)], 6 + i, temperature=1.0, top_p=demo.args.top_p, seed=i,
        logits_processor=demo.logits_processor, eos_id=demo.tokenizer.eos_id)[0]) for i, p in enumerate(prompts)]
    real_generate, batches = sample.generate, []

    def recording_generate(model, prompts, *args, **kwargs):
        batches.append(len(prompts))
        if len(batches) == 1:
            time.sleep(0.5)  # hold the worker so the other clients queue up behind the first
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(sample, "generate", recording_generate)

    def ask(i):
        messages, api = [{"role": "user", "content": f"Say something about number {i}."}], client(url)
        settings = dict(model="tiny", messages=messages, max_tokens=6 + i, temperature=1.0, seed=i)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(**settings,
                                                                                                 stream=True))
        return api.chat.completions.create(**settings).choices[0].message.content

    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == wanted  # each client got its own answer, none mixed up
    assert sum(batches) == 8 and max(batches) > 1, batches
    assert time.time() - started < 20
    silent.close()
    half.close()  # its cut-off body is a 400 the client is gone for: no traceback in the server's log
    time.sleep(0.5)
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_leaves_a_stream_stops_its_generation(start, monkeypatch):
    url, demo = start()
    real_generate, produced = sample.generate, []

    def slow_generate(*args, on_token, **kwargs):  # no EOS and 20 ms a token: the request runs long
        def count(row, token):
            produced.append(token)
            time.sleep(0.02)
            return on_token(row, token)  # true once the job has its answer
        return real_generate(*args, **{**kwargs, "eos_id": None, "on_token": count})

    monkeypatch.setattr(sample, "generate", slow_generate)
    # (a client of a whole reply that leaves is noticed only when its reply is written)
    body = json.dumps({"prompt": "Numbers", "max_tokens": 64, "stream": True}).encode()
    conn = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"\r\n%s" % (len(body), body))
    assert conn.recv(100).startswith(b"HTTP/1.1 200")  # the first events arrive, then the client leaves
    time.sleep(0.3)
    conn.close()
    time.sleep(0.6)
    stopped_at = len(produced)
    time.sleep(0.3)
    assert 0 < stopped_at < 64 and len(produced) == stopped_at  # generation stopped at a write, not finished
    monkeypatch.setattr(sample, "generate", real_generate)
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_closing_the_server_ends_the_batch_being_generated(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args = sample.parse_args(["--checkpoint", checkpoint, "--serve", "--port", "0", "--flags", str(tmp_path / "f")])
    model, tokenizer = sample.load(args)
    real_generate = sample.generate

    def slow_generate(*args, on_token, **kwargs):  # no EOS and 50 ms a token: 200 tokens would take 10 s
        def wait(row, token):
            time.sleep(0.05)
            return on_token(row, token)
        return real_generate(*args, **{**kwargs, "eos_id": None, "on_token": wait})

    monkeypatch.setattr(sample, "generate", slow_generate)
    server = sample.make_server(model, tokenizer, args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = json.dumps({"prompt": "Numbers", "max_tokens": 200, "stream": True}).encode()
    conn = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"\r\n%s" % (len(body), body))
    assert conn.recv(100).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)
    started = time.time()
    server.shutdown()
    sample.close_server(server)
    assert not server.demo.worker.is_alive() and time.time() - started < 3  # the row stopped, not ran to its end
    stream = b""
    while not stream.endswith(b"data: [DONE]\n\n"):
        stream += conn.recv(65536) or pytest.fail(f"the stream ended without its last event: {stream[-200:]}")
    assert b'"finish_reason": "stop"' in stream  # the row ended as a cancelled one does
    conn.close()


def test_a_failed_batch_is_a_500_and_the_demo_goes_on(start, monkeypatch):
    url, demo = start()
    real_generate = sample.generate

    def failing_generate(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sample, "generate", failing_generate)
    status, reply = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert reply["error"]["message"] == "generation failed: RuntimeError: out of memory"
    status, body = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True})
    events = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
    assert status == 200 and events[-1]["error"]["message"] == "generation failed: RuntimeError: out of memory"
    monkeypatch.setattr(sample, "generate", real_generate)
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


class FakeModeration(BaseHTTPRequestHandler):
    """OpenAI's POST /v1/moderations: flags text that contains one of the server's trigger strings."""

    def do_POST(self):
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
        self.server.seen.append(text)
        hit = any(trigger in text for trigger in self.server.triggers)
        categories = {"violence": hit, "self-harm": hit, "hate": False}
        body = json.dumps({"id": "modr-1", "model": "omni-moderation-latest", "results": [
            {"flagged": hit, "categories": categories, "category_scores": {k: float(v) for k, v in
                                                                           categories.items()}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_content_filter_refuses_prompts_and_withholds_outputs(start):
    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeModeration)
    fake.seen, fake.triggers = [], ["forbidden"]
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url, demo = start("--moderation_base_url", f"http://127.0.0.1:{fake.server_address[1]}/v1")
        with urllib.request.urlopen(url + "/") as response:
            assert "Content filter:</b> on" in response.read().decode()
        api = client(url)
        messages = [{"role": "user", "content": "Name a colour."}]
        clean = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        text = clean.choices[0].message.content
        assert text == expected(demo, format_prompt("Name a colour."), 12)[0]
        assert fake.seen == ["Name a colour.", text]  # the prompt, then the finished output

        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model="tiny", max_tokens=12, messages=[
                {"role": "system", "content": "a forbidden input"}, {"role": "user", "content": "Go."}])
        assert refused.value.code == "content_filter" and "self-harm, violence" in refused.value.message

        fake.triggers.append(text)  # now the model's answer itself is flagged: withheld, stream or not
        reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "content_filter"
        assert reply.model_extra["content_filter"] == {"flagged": True, "categories": ["self-harm", "violence"]}
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                  stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        # with the filter on, a clean stream comes whole, after the check
        fake.triggers.pop()
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                  stream=True))
        assert [c.choices[0].delta.content for c in chunks] == [text, None]

        with open(demo.args.flags) as f:
            records = [json.loads(line) for line in f]
        assert [(r["flagged_by"], r["reason"]) for r in records] == [
            ("content_filter", "prompt flagged: self-harm, violence"),
            ("content_filter", "output flagged: self-harm, violence"),
            ("content_filter", "output flagged: self-harm, violence")]
        assert records[0]["input"] == "a forbidden input" and records[1]["output"] == text
    finally:
        fake.shutdown()
        fake.server_close()
    # the filter's endpoint is down: nothing unchecked is shown
    status, reply = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 503 and "content filter is unavailable" in reply["error"]["message"]


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    """A random model whose tokenizer has whole words only: decoding its output and encoding the text again gives
    back the generated ids, as it mostly does for a trained model. With byte pieces a random model's text does not
    survive that round trip, and detection from text would score other tokens than were generated."""
    import io
    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("words") / "tiny"
    folder.mkdir()
    words = [f"w{i}" for i in range(300)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(words[j:j + 10]) for j in range(0, 300, 5)),
                                   model_writer=model_file, model_type="word", vocab_size=len(words) + 3,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=len(words) + 3, multiple_of=16,
                                  max_seq_len=256))
    model.init_weights(std=0.2)
    (folder / "params.json").write_text(json.dumps(dataclasses.asdict(model.args)))
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    return str(folder)


def test_watermark_py_detects_the_demos_outputs(start, word_checkpoint, tmp_path, capsys):
    outputs = tmp_path / "outputs.jsonl"
    for flags in (["--delta", "8"], ["--no_watermark"]):
        url, demo = start("--checkpoint", word_checkpoint, *flags)
        reply = client(url).completions.create(model="tiny", prompt="The cat", max_tokens=64, temperature=1.0,
                                               seed=3)
        with open(outputs, "a") as f:
            f.write(json.dumps({"output": reply.choices[0].text, "watermark": reply.model_extra["watermark"]}) + "\n")
    with open(outputs) as f:
        assert json.loads(f.readline())["watermark"]["delta"] == 8.0 and json.loads(f.readline())["watermark"] is None
    capsys.readouterr()
    watermark.main(["detect", "--tokenizer", os.path.join(demo.args.checkpoint, "tokenizer.model"), "--vocab_size",
                    str(demo.model.args.vocab_size), "--in", str(outputs), "--field", "output", "--json"])
    marked, plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert marked["verdict"] == "watermarked" and marked["z_score"] > 4, marked
    assert plain["verdict"] != "watermarked" and plain["z_score"] < 4, plain


def test_cli_serves_and_stops_cleanly_on_ctrl_c(checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", checkpoint, "--serve",
                                "--port", "0", "--flags", str(tmp_path / "flags.jsonl")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(5)]
        log = "".join(lines)
        assert "Serving tiny at http://127.0.0.1:" in log, log
        assert "content filter: off" in log and "watermark: on" in log
        url = log.split("at ")[1].split("/ ")[0]
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3})[0] == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()


def webdriver(base, method, path, body=None):
    request = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["value"]


def wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if condition():
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"still waiting after {seconds} s")


def test_browser_shows_model_output_as_text(start, monkeypatch, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("this test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver "
                    "(.ci/run does it)")
    url, demo = start()

    def scripted_generate(model, prompts, max_new_tokens, *args, on_token, **kwargs):
        # The page is under test here, not the model: the "model" answers with markup, token by token.
        ids = demo.tokenizer.encode(f"Here: {SCRIPT} <img src=x onerror=window.pwned=2>")[:max_new_tokens]
        for token in ids + [demo.tokenizer.eos_id]:
            time.sleep(0.01)
            on_token(0, token)
        return [ids]

    monkeypatch.setattr(sample, "generate", scripted_generate)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chromedriver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: webdriver(base, "GET", "/status")["ready"])
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1100",
                 "--disable-background-networking", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
        session = webdriver(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": chromium, "args": flags}}}})["sessionId"]
        at = f"/session/{session}"
        try:
            webdriver(base, "POST", f"{at}/url", {"url": url + "/"})

            def element(css):
                found = webdriver(base, "POST", f"{at}/element", {"using": "css selector", "value": css})
                return f"{at}/element/{next(iter(found.values()))}"

            def run(script):
                return webdriver(base, "POST", f"{at}/execute/sync", {"script": script, "args": []})

            webdriver(base, "POST", f"{element('#instruction')}/value", {"text": "Write a poem."})
            webdriver(base, "POST", f"{element('#generate')}/click", {})
            wait_for(lambda: run("return document.getElementById('status').textContent") == "Done.")
            shown = run("return document.getElementById('output').textContent")
            assert shown == demo.tokenizer.decode(demo.tokenizer.encode(
                f"Here: {SCRIPT} <img src=x onerror=window.pwned=2>"))
            assert SCRIPT in shown  # the markup is shown as text...
            assert run("return [typeof window.pwned, document.querySelectorAll('#output *').length]") == [
                "undefined", 0]  # ...and never became elements or ran
            webdriver(base, "POST", f"{element('#flag')}/click", {})
            wait_for(lambda: run("return document.getElementById('status').textContent").startswith("Thank you"))
            with open(demo.args.flags) as f:
                record = json.loads(f.readline())
            assert record["instruction"] == "Write a poem." and record["output"] == shown
            assert record["reason"] == ""  # the page sends none; /flag's 'reason' is tested above
            with open(tmp_path / "page.png", "wb") as f:  # a look at the page, for whoever debugs this test
                f.write(base64.b64decode(webdriver(base, "GET", f"{at}/screenshot")))
        finally:
            webdriver(base, "DELETE", at)
    finally:
        chromedriver.terminate()
        chromedriver.wait(timeout=10)
