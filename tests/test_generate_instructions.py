"""Tests for generate_instructions.py against a real HTTP server on 127.0.0.1 that speaks the OpenAI API."""
import itertools
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
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from rouge_score import rouge_scorer

import generate_instructions as gi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "generate_instructions.py")

SEEDS = [
    ("Give three tips for staying healthy.", "", "Eat well, sleep enough and move every day."),
    ("Classify the sentiment of the review as positive or negative.", "The soup was cold.", "Negative"),
    ("Translate the sentence into French.", "I like apples.", "J'aime les pommes."),
    ("Suggest a name for a bakery that sells only bread.", "", "Crumb & Crust"),
    ("Sort these numbers from smallest to largest.", "5, 2, 9", "2, 5, 9"),
    ("Explain why the sky looks blue during the day.", "", "Air scatters blue light more than red light."),
]


def write_seeds(path, seeds=SEEDS):
    with open(path, "w") as f:
        for i, (instruction, task_input, output) in enumerate(seeds):
            f.write(json.dumps({"id": f"seed_task_{i}", "name": f"task_{i}", "instruction": instruction,
                                "instances": [{"input": task_input, "output": output}],
                                "is_classification": False}) + "\n")
    return str(path)


def task_block(n, instruction, task_input="<noinput>", output="An answer."):
    return f"{n}. Instruction: {instruction}\n{n}. Input:\n{task_input}\n{n}. Output:\n{output}\n"


def completion_text(tasks, start=4):
    """What a completions model continues with after '...###\\n4. Instruction:'."""
    text = "\n###\n".join(task_block(start + i, *task) for i, task in enumerate(tasks))
    return text[len(f"{start}. Instruction:"):] + "###"


_unique = itertools.count()


def unique_instruction():
    k = next(_unique)
    return f"Describe the tokens q{k}a q{k}b q{k}c q{k}d in detail"


def ok(text, finish_reason="stop", usage=(100, 200)):
    return ("ok", text, finish_reason, usage)


class FakeOpenAI:
    """Answers POST /v1/completions and /v1/chat/completions from a script, then with fresh unique tasks."""

    def __init__(self, script=(), delay=0.0, usage=(100, 200), tasks_per_response=3):
        self.script = list(script)
        self.delay, self.usage, self.tasks_per_response = delay, usage, tasks_per_response
        self.requests, self.times = [], []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.release = threading.Event()  # set at shutdown, so stalled handlers return
        self.stall_after = None  # stop answering after this many requests (to kill the client mid-run)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake.lock:
                    fake.requests.append((self.path, body))
                    fake.times.append(time.monotonic())
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    number = len(fake.requests)
                    item = fake.script.pop(0) if fake.script else None
                try:
                    if fake.stall_after is not None and number > fake.stall_after:
                        fake.release.wait(60)
                        return
                    time.sleep(fake.delay)
                    if self.headers.get("authorization") != "Bearer test":
                        return self.reply(401, {"error": {"message": "Incorrect API key provided",
                                                          "type": "invalid_request_error"}})
                    if item is None:
                        item = ok(completion_text([(unique_instruction(),)
                                                   for _ in range(fake.tasks_per_response)]), usage=fake.usage)
                    if item[0] == "ok":
                        return self.reply(200, fake.body(self.path, *item[1:]))
                    if item[0] == "error":  # ("error", status, headers[, error body])
                        error = item[3] if len(item) > 3 else {"message": "scripted", "type": "x"}
                        return self.reply(item[1], {"error": error}, item[2])
                    if item[0] == "raw":
                        return self.reply(200, item[1])
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def reply(self, status, body, headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def body(self, path, text, finish_reason, usage):
        usage = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
        if path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            return {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice],
                    "usage": usage}
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [choice],
                "usage": usage}

    def prompts(self):
        return [body.get("prompt") or body["messages"][0]["content"] for _, body in self.requests]

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def make_server():
    servers = []

    def make(*args, **kwargs):
        servers.append(FakeOpenAI(*args, **kwargs))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")


def run(tmp_path, server_url, *flags):
    seeds = tmp_path / "seeds.jsonl"
    if not seeds.exists():
        write_seeds(seeds)
    argv = ["--seed_tasks", str(seeds), "--out", str(tmp_path / "out.jsonl"), "--base_url", server_url,
            "--model", "teacher", "--max_retries", "3", "--concurrency", "1", *flags]
    return gi.main(argv)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ROUGE-L: identical to rouge_score

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
PIECES = ["the", "The", "a", "cat", "CAT", "sat", "x1", "1,000", "3.14", "don't", "e-mail", "U.S.A.", "!", "...",
          "é", "café", "naïve", "straße", "İ", "İstanbul", "\u212a", "日本語", "ｆｕｌｌ", "😀", "\t", "\n", "__", "_a_"]


def reference_scores(text, others):
    tokens = SCORER._tokenizer.tokenize(text)
    return np.array([rouge_scorer._score_lcs(tokens, SCORER._tokenizer.tokenize(o)).fmeasure for o in others])


def check_equal(texts, candidates):
    index = gi.RougeIndex()
    for text in texts:
        index.add(text)
    for candidate in candidates:
        ours, reference = index.scores(candidate), reference_scores(candidate, texts)
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max(initial=0) <= 1e-9, candidate
        assert np.array_equal(ours, reference), candidate  # in fact bit for bit


def test_rouge_tokens_are_rouge_scorers():
    text = " ".join(PIECES) + " Hello, WORLD 42nd"
    assert gi.rouge_tokens(text) == SCORER._tokenizer.tokenize(text)


def test_rouge_index_equals_rouge_score_on_random_texts():
    rng = random.Random(0)
    # Lengths around the 64-token word boundaries exercise the carries between uint64 words.
    lengths = [0, 1, 2, 3, 5, 8, 13, 30, 63, 64, 65, 127, 128, 129, 200]
    small_vocab = PIECES[:8]  # few distinct tokens, so long common subsequences are frequent

    def text():
        vocab = small_vocab if rng.random() < 0.5 else PIECES
        return rng.choice([" ", "", "  ", "-"]).join(rng.choice(vocab) for _ in range(rng.choice(lengths)))
    texts = [text() for _ in range(100)]
    check_equal(texts, texts[::5] + [text() for _ in range(10)])


def test_rouge_index_adversarial_strings():
    texts = ["", " ", "!!! ???", "Don't stop", "don t stop", "dont stop", "İstanbul is big", "i̇stanbul",
             "\u212a kelvin", "k kelvin", "straße", "strasse", "3.14 is pi", "3 14 is pi", "a a a a", "a",
             "a b a b a b", "b a b a", "日本語 text", "text", "ｆｕｌｌ width", "full width", "😀 smile", "smile",
             "The cat sat.", "the CAT sat", "sat cat the", "x" * 500, ("x " * 300).strip(), "x " * 64, "x " * 65]
    check_equal(texts, texts + ["never seen tokens", "a " * 129])


def test_rouge_index_empty_and_order():
    index = gi.RougeIndex()
    assert index.scores("anything").shape == (0,)
    for text in ["b c", "", "a b c", "!!"]:
        index.add(text)
    assert list(index.scores("a b c")) == [0.8, 0.0, 1.0, 0.0]
    assert list(index.scores("")) == [0.0] * 4


# Prompt, parsing and filters

def test_encode_prompt_format():
    examples = [{"instruction": "  Sort   these\nnumbers:", "input": "5, 2", "output": "2, 5"},
                {"instruction": "Name a color.", "input": "", "output": "Blue"}]
    prompt = gi.encode_prompt(examples)
    assert prompt.startswith(gi.PREAMBLE)
    assert prompt.endswith("###\n1. Instruction: Sort these numbers\n1. Input:\n5, 2\n1. Output:\n2, 5\n"
                           "###\n2. Instruction: Name a color.\n2. Input:\n<noinput>\n2. Output:\nBlue\n"
                           "###\n3. Instruction:")
    assert "20" in gi.PREAMBLE and "100 words" in gi.PREAMBLE


def test_parse_completion_and_chat_styles():
    tasks = [("Summarize the passage in one sentence please.", "Cats sleep a lot.\nThey also purr.",
              "Cats sleep and purr."),
             ("Name three prime numbers below twenty.", "<noinput>", "2, 3, 5")]
    expected = [{"instruction": tasks[0][0], "input": tasks[0][1], "output": tasks[0][2]},
                {"instruction": tasks[1][0], "input": "", "output": tasks[1][2]}]
    rejected = Counter()
    assert gi.parse_response(completion_text(tasks), "stop", 3, rejected) == expected
    for chat in ["4. Instruction:" + completion_text(tasks), "###\n4. Instruction:" + completion_text(tasks)]:
        assert gi.parse_response(chat, "stop", 3, rejected) == expected
    # A model that forgets the ### separators still gets split on its numbered headers.
    no_separators = "\n".join(task_block(4 + i, *t) for i, t in enumerate(tasks))
    assert gi.parse_response(no_separators, "stop", 3, rejected) == expected
    assert not rejected
    assert gi.parse_response(" Do this thing now\n4. Output:\nno input header\n###", "stop", 3, rejected) == []
    assert rejected == {"unparseable": 1}


def test_parse_drops_task_cut_off_by_length():
    text = completion_text([("First task to keep here.",)]) + "\n5. Instruction: Second task cut off"
    rejected = Counter()
    tasks = gi.parse_response(text, "length", 3, rejected)
    assert [t["instruction"] for t in tasks] == ["First task to keep here."]
    assert rejected == {"truncated": 1}
    rejected = Counter()
    text = completion_text([("First task to keep here.",), ("Second task is complete too.",)])[:-3]
    assert len(gi.parse_response(text, "stop", 3, rejected)) == 2 and not rejected


@pytest.mark.parametrize("instruction,reason", [
    ("Name three colors.", "too_short"),
    ("Name three primary colors.", None),
    (" ".join(["word"] * 150), None),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image in two sentences.", "blocked_word"),
    ("Summarize the plot of Hamlet briefly.", "blocked_word"),
    ("Explain how to GO TO the moon.", "blocked_word"),
    ("Which Graphs are planar among these?", "blocked_word"),
    ("Explain how a mapping between sets works.", None),
    ("Describe your favourite musical instrument.", None),
    ("Write a program that adds two numbers.", "write_a_program"),
    ("write a program that adds two numbers.", None),
    ('"Quote" this sentence back to me.', "starts_with_punctuation"),
    ("(Optional) name a river in Asia.", "starts_with_punctuation"),
    ("Éxplique la frase en inglés, por favor.", "non_ascii_start"),
    ("3 reasons to learn a language?", None),
])
def test_filters_before_rouge(instruction, reason):
    index = gi.RougeIndex()
    index.add("zzz")  # shares no word with any of them: only the cheap filters can reject
    assert gi.filter_task({"instruction": instruction}, index, 0.7) == reason


# End to end against the fake server

def test_generate_completions_end_to_end(tmp_path, make_server):
    good = ["Compose a haiku about autumn leaves falling.", "Give a synonym for the word happy and explain it.",
            "List the planets of the solar system in order."]
    response = [(good[0],), ("Give three tips for staying very healthy.",),  # near-copy of a seed
                ("Describe this picture of a cat please.",), ("Name it now.",),
                ("Write a program to reverse a string in Python.",), ("- Bullet first task here ok",),
                ("Ünicode first letter in this one.",), (good[1], "happy", "Glad: feeling pleasure."),
                ("Compose a haiku about autumn leaves falling down.",),  # near-copy of good[0]
                (good[2],), ("This last one was cut off by the",)]
    server = make_server([ok(completion_text(response)[:-3], finish_reason="length", usage=(1234, 567))])
    stats = run(tmp_path, server.url, "--num_instructions", "3", "--temperature", "0.7", "--max_new_tokens", "999")

    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["instruction"] for r in records] == good
    assert records[1]["input"] == "happy" and records[1]["output"] == "Glad: feeling pleasure."
    assert records[0]["input"] == ""
    assert stats["rejected"] == {"too_similar": 2, "blocked_word": 1, "too_short": 1, "write_a_program": 1,
                                 "starts_with_punctuation": 1, "non_ascii_start": 1, "truncated": 1}
    assert stats["kept"] == 3 and stats["prompt_tokens"] == 1234 and stats["completion_tokens"] == 567
    seen = [s[0] for s in SEEDS]
    for record in records:
        scores = reference_scores(record["instruction"], seen)
        top = sorted(scores, reverse=True)[:10]
        assert sorted(record["most_similar_instructions"].values(), reverse=True) == top
        for text, score in record["most_similar_instructions"].items():
            assert score == reference_scores(record["instruction"], [text])[0]
        assert record["avg_similarity_score"] == pytest.approx(scores.mean(), abs=1e-12)
        seen.append(record["instruction"])

    (path, body), = server.requests
    assert path == "/v1/completions"
    assert body["model"] == "teacher" and body["temperature"] == 0.7 and body["max_tokens"] == 999
    assert body["stop"] == ["\n20", "20."] and body["n"] == 1
    assert body["prompt"].startswith(gi.PREAMBLE) and body["prompt"].endswith("###\n4. Instruction:")
    assert sum(s[0] in body["prompt"] for s in SEEDS) == 3


def test_generate_chat_api(tmp_path, make_server):
    tasks = [("Rewrite the sentence in the passive voice.", "The dog chased the ball.", "The ball was chased.")]
    server = make_server([ok("4. Instruction:" + completion_text(tasks))])
    run(tmp_path, server.url, "--api", "chat", "--num_instructions", "1")
    (path, body), = server.requests
    assert path == "/v1/chat/completions"
    assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"].endswith("4. Instruction:")
    assert read_jsonl(tmp_path / "out.jsonl")[0]["input"] == "The dog chased the ball."


def test_the_client_retries_429_5xx_408_409_as_retry_after_asks(tmp_path, make_server):
    later = {"retry-after-ms": "50"}
    server = make_server([("error", 429, {"Retry-After": "1"}), ("error", 500, later), ("error", 503, later),
                          ("error", 408, later), ("error", 409, later)], tasks_per_response=2)
    stats = run(tmp_path, server.url, "--num_instructions", "2", "--max_retries", "5")
    assert len(server.requests) == 6 and stats["failed"] == 0 and stats["kept"] == 2 and stats["requests"] == 1
    assert server.times[1] - server.times[0] >= 0.95  # waited as the 429 asked, not the client's 0.5 s backoff
    assert all(b - a >= 0.05 for a, b in zip(server.times[1:], server.times[2:]))


def test_a_malformed_reply_is_a_failed_request_and_the_run_goes_on(tmp_path, make_server, capsys):
    server = make_server([("raw", b'{"choices": [{"te'), ("raw", b"<html>bad gateway</html>"),
                          ok(completion_text([(unique_instruction(),)])), ("raw", b"{}")], tasks_per_response=2)
    stats = run(tmp_path, server.url, "--num_instructions", "2", "--max_retries", "5")
    assert len(server.requests) == 5 and stats["failed"] == 3 and stats["kept"] == 2  # none retried by the client
    err = capsys.readouterr().err
    assert err.count("request failed for good: JSONDecodeError") == 2 and "malformed response" in err


def test_failed_request_is_counted_and_the_run_goes_on(tmp_path, make_server, capsys):
    server = make_server([("error", 500, {})] * 3, tasks_per_response=2)
    stats = run(tmp_path, server.url, "--num_instructions", "2", "--max_retries", "2")
    assert stats["failed"] == 1 and stats["kept"] == 2 and len(server.requests) == 4
    assert "request failed for good: InternalServerError: Error code: 500" in capsys.readouterr().err


def test_persistent_errors_give_up_with_one_message(tmp_path, make_server):
    server = make_server([("error", 500, {})] * 100)
    message = r"giving up after [34] requests failed in a row \(last: InternalServerError: Error code: 500"
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, server.url, "--num_instructions", "5", "--max_retries", "1", "--concurrency", "2")
    assert len(server.requests) <= 2 * 4  # at most 4 requests started, each tried twice
    assert read_jsonl(tmp_path / "out.jsonl") == []


def test_wrong_key_is_one_clear_error(tmp_path, make_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    server = make_server()
    with pytest.raises(SystemExit, match="refused the request.*401 - Incorrect API key.*check OPENAI_API_KEY"):
        run(tmp_path, server.url, "--num_instructions", "5", "--concurrency", "3")
    assert len(server.requests) <= 3  # no retries on a wrong key


def test_missing_key_and_unreachable_server_from_the_command_line(tmp_path):
    write_seeds(tmp_path / "seeds.jsonl")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, SCRIPT, "--seed_tasks", str(tmp_path / "seeds.jsonl"), "--out", str(tmp_path / "o.jsonl"),
           "--base_url", f"http://127.0.0.1:{port}/v1", "--max_retries", "1"]
    env = dict(os.environ, OPENAI_API_KEY="test")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert re.search(r"giving up after \d+ requests failed in a row", result.stderr)
    assert "APIConnectionError" in result.stderr
    env.pop("OPENAI_API_KEY")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "OPENAI_API_KEY is not set" in result.stderr


def too_many(message, param="max_tokens", code=None):
    return ("error", 400, {}, {"message": message, "type": "invalid_request_error", "param": param, "code": code})


def test_max_tokens_is_lowered_to_what_the_server_says_it_can_give(tmp_path, make_server, capsys):
    server = make_server([
        # OpenAI's answer to more than a model's completion limit
        too_many("max_tokens is too large: 3072. This model supports at most 2500 completion tokens, whereas you "
                 "provided 3072."),
        # vLLM's when the prompt and max_tokens do not fit the context (param null, code 400)
        too_many("'max_tokens' or 'max_completion_tokens' is too large: 2500. This model's maximum context length "
                 "is 2048 tokens and your request has 700 input tokens (2500 > 2048 - 700).", None, 400),
        # OpenAI's context_length_exceeded, which names the messages as the param
        too_many("This model's maximum context length is 2048 tokens. However, you requested 2248 tokens (900 in "
                 "the messages, 1348 in the completion). Please reduce the length of the messages or completion.",
                 "messages", "context_length_exceeded"),
        too_many("Invalid 'max_tokens': integer above maximum value. Expected a value <= 1000, but got 1148 "
                 "instead.", code="integer_above_max_value"),
        too_many("max_tokens: no"),  # says no number: halve
    ], tasks_per_response=2)
    stats = run(tmp_path, server.url, "--num_instructions", "2")
    assert [body["max_tokens"] for _, body in server.requests] == [3072, 2500, 1348, 1148, 1000, 500]
    assert stats["kept"] == 2 and stats["failed"] == 0
    log = capsys.readouterr().err
    assert "the server gives at most 1348 tokens per reply (it refused 2500): asking for 1348 from now on" in log
    assert log.count("from now on") == 5


def test_a_server_that_can_give_too_few_tokens_stops_the_run(tmp_path, make_server):
    server = make_server([too_many("max_tokens is too large: 3072. This model supports at most 100 completion "
                                   "tokens, whereas you provided 3072.")])
    with pytest.raises(SystemExit, match="gives at most 100 tokens per reply .*fewer than the 256"):
        run(tmp_path, server.url, "--num_instructions", "2")
    server = make_server([too_many("This model's maximum context length is 2048 tokens. However, your messages "
                                   "resulted in 3000 tokens. Please reduce the length of the messages.",
                                   "messages", "context_length_exceeded")])
    with pytest.raises(SystemExit, match="refused the request .*your messages resulted in 3000 tokens"):
        run(tmp_path, server.url, "--num_instructions", "2")  # the prompt alone is too long: not retried
    assert len(server.requests) == 1


def test_budget_stop(tmp_path, make_server, capsys):
    # Each request costs 1000 * $1 / 1M + 1000 * $2 / 1M = $0.003.
    server = make_server(usage=(1000, 1000), tasks_per_response=1)
    stats = run(tmp_path, server.url, "--num_instructions", "100", "--concurrency", "2", "--max_usd", "0.01",
                "--price_in", "1", "--price_out", "2")
    assert len(server.requests) == 3 and stats["kept"] == 3
    assert stats["usd"] == pytest.approx(0.009) and stats["usd"] <= 0.01
    assert "stopped at the budget: spent $0.0090 of --max_usd $0.01" in capsys.readouterr().out


def test_budget_needs_usage_from_the_server(tmp_path, make_server):
    server = make_server(usage=(0, 0))
    with pytest.raises(SystemExit, match="reports no token usage"):
        run(tmp_path, server.url, "--max_usd", "1", "--price_in", "1", "--price_out", "1")
    assert len(server.requests) == 1


def test_concurrency(tmp_path, make_server):
    server = make_server(delay=0.3, tasks_per_response=2)
    start = time.monotonic()
    stats = run(tmp_path, server.url, "--num_instructions", "16", "--concurrency", "4")
    assert stats["kept"] == 16
    assert server.max_in_flight == 4
    assert time.monotonic() - start < 8 * 0.3  # 8 requests, not one after another


def test_seed_makes_prompts_reproducible(tmp_path, make_server):
    prompts = []
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        server = make_server(tasks_per_response=1)
        (tmp_path / name).mkdir()
        write_seeds(tmp_path / name / "seeds.jsonl")
        run(tmp_path / name, server.url, "--num_instructions", "4", "--seed", seed)
        prompts.append(server.prompts())
    assert prompts[0] == prompts[1] and prompts[0] != prompts[2]
    assert len(set(prompts[0])) > 1  # different seed examples from one request to the next


def test_torn_last_line_is_repaired_on_resume(tmp_path, make_server, capsys):
    server = make_server(tasks_per_response=1)
    run(tmp_path, server.url, "--num_instructions", "2")
    out = tmp_path / "out.jsonl"
    before = out.read_text()
    with open(out, "a") as f:
        f.write('{"instruction": "Half writ')
    run(tmp_path, server.url, "--num_instructions", "4")
    assert "out.jsonl: cutting off a torn last line (26 bytes) of a killed run" in capsys.readouterr().err
    records = read_jsonl(out)
    assert out.read_text().startswith(before) and len(records) == 4
    with open(out, "a") as f:
        f.write("not json\n" + json.dumps(records[0]) + "\n")
    with pytest.raises(SystemExit, match=r"out.jsonl:5: not valid JSON"):
        run(tmp_path, server.url, "--num_instructions", "8")
    out.write_text(before + '{"instruction": "Name a task here.", "output": "x"}\n')
    with pytest.raises(SystemExit, match=r"out.jsonl:3: field 'input' missing or not a string"):
        run(tmp_path, server.url, "--num_instructions", "8")
    assert len(server.requests) == 2 + 2  # a file that cannot be resumed stops the run before any request


def test_resume_after_kill_9(tmp_path, make_server):
    """Kill -9 the script while it waits on the server; the rerun keeps everything and adds no duplicates."""
    server = make_server(tasks_per_response=3)
    server.stall_after = 3
    write_seeds(tmp_path / "seeds.jsonl")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, SCRIPT, "--seed_tasks", str(tmp_path / "seeds.jsonl"), "--out", str(out),
           "--base_url", server.url, "--num_instructions", "20", "--concurrency", "2"]
    process = subprocess.Popen(cmd, env=dict(os.environ, OPENAI_API_KEY="test"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text().count("\n") == 9) or len(server.requests) < 5:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    before = read_jsonl(out)
    assert len(before) == 9

    # The teacher repeats two instructions kept before the kill: the resumed filter must know about them.
    repeats = [(before[0]["instruction"],), (before[8]["instruction"],), (unique_instruction(),)]
    server.stall_after = None
    server.script = [ok(completion_text(repeats))]
    stats = run(tmp_path, server.url, "--num_instructions", "20", "--concurrency", "2")
    after = read_jsonl(out)
    assert after[:9] == before and len(after) == 20
    assert len({r["instruction"] for r in after}) == 20
    assert stats["rejected"].get("too_similar") == 2


def test_export_alpaca_json(tmp_path, make_server):
    server = make_server(tasks_per_response=2)
    export = tmp_path / "alpaca_data.json"
    run(tmp_path, server.url, "--num_instructions", "4", "--export", str(export))
    data = json.loads(export.read_text())
    records = read_jsonl(tmp_path / "out.jsonl")
    assert data == [{k: r[k] for k in ("instruction", "input", "output")} for r in records] and len(data) == 4
    assert sorted(os.listdir(tmp_path)) == ["alpaca_data.json", "out.jsonl", "seeds.jsonl"]


def test_a_teacher_that_writes_no_task_stops_at_max_requests_and_exports_the_seeds(tmp_path, make_server, capsys):
    server = make_server([ok("noise, not a task")] * 3)
    export = tmp_path / "alpaca_data.json"
    stats = run(tmp_path, server.url, "--num_instructions", "5", "--max_requests", "3", "--export", str(export),
                "--export_seeds", "--concurrency", "2")
    assert len(server.requests) == 3 and stats["kept"] == 0 and stats["rejected"] == {"unparseable": 3}
    assert json.loads(export.read_text()) == [dict(zip(("instruction", "input", "output"), s)) for s in SEEDS]
    out = capsys.readouterr().out
    assert "stopped after --max_requests=3" in out and "exported 6 examples" in out and "0 generated" in out


def test_dry_run_prints_prompt_and_cost_without_requests(tmp_path, make_server, capsys):
    server = make_server()
    run(tmp_path, server.url, "--dry_run", "--num_instructions", "1000", "--price_in", "1.5", "--price_out", "2")
    printed = capsys.readouterr().out
    assert printed.startswith(gi.PREAMBLE) and "###\n4. Instruction:" in printed
    assert "projected for 1000 more instructions" in printed and "$1.5/$2.0 per 1M tokens" in printed
    assert not server.requests and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("content,message", [
    (None, "seed file not found"),
    ('{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n{oops\n', r"seeds.jsonl:2: not valid JSON"),
    ('\n\n{"instances": [{"input": "", "output": "b"}]}\n', r"seeds.jsonl:3: field 'instruction' missing"),
    ('{"instruction": "a", "instances": []}\n', r"seeds.jsonl:1: field 'instances' missing"),
    ('{"instruction": "a", "instances": [{"input": ""}]}\n', r"seeds.jsonl:1: field 'instances\[0\].output'"),
    ('["a list"]\n', r"seeds.jsonl:1: expected a JSON object"),
    ("", "no seed tasks"),
])
def test_bad_seed_file_names_line_and_field(tmp_path, content, message):
    seeds = tmp_path / "seeds.jsonl"
    if content is not None:
        seeds.write_text(content)
    with pytest.raises(SystemExit, match=message):
        gi.main(["--seed_tasks", str(seeds), "--out", str(tmp_path / "o.jsonl"), "--dry_run"])
