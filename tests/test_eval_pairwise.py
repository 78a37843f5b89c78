import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import eval_pairwise as ep

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval_pairwise.py")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def outputs(tmp_path, a_texts, b_texts, ids=True):
    """Two output files in sample.py's format; item i has instruction 'Task i'."""
    def rows(texts, generator):
        return [dict({"id": f"t{i}"} if ids else {}, instruction=f"Task {i}", input="" if i % 2 else f"input {i}",
                     output=text, generator=generator, temperature=0.7) for i, text in enumerate(texts)]
    return (write_jsonl(tmp_path / "a.jsonl", rows(a_texts, "alpaca-ckpt")),
            write_jsonl(tmp_path / "b.jsonl", rows(b_texts, "davinci-003")))


def run_cli(*args, stdin="", columns=80):
    env = dict(os.environ, COLUMNS=str(columns))
    return subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=60)


# Statistics against hand-computed values.

def test_alpaca_headline_90_89_73():
    verdicts = {f"i{k}": v for k, v in enumerate(["a"] * 90 + ["b"] * 89 + ["tie"] * 73)}
    s = ep.summarize(verdicts, None, seed=0)
    assert (s["wins"], s["losses"], s["ties"]) == (90, 89, 73)
    assert round(100 * s["win_rate"], 1) == 50.2  # (90 + 73/2) / 252
    assert s["sign_p"] == 1.0  # 90 vs 89 of 179 decisive: as even as an odd count can be
    mean, mean_sq = 126.5 / 252, (90 + 73 / 4) / 252
    assert s["se"] == pytest.approx(math.sqrt((mean_sq - mean ** 2) * 252 / 251 / 252))
    assert s["ci"][0] < s["win_rate"] < s["ci"][1]
    assert s["ci"][1] - s["ci"][0] == pytest.approx(2 * 1.96 * s["se"], abs=0.015)
    assert s["wilson"][0] < 90 / 179 < s["wilson"][1]


def test_wilson_sign_test_and_kappas_by_hand():
    assert ep.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert ep.sign_test(9, 1) == 2 * (1 + 10) / 1024
    assert ep.sign_test(1, 9) == ep.sign_test(9, 1)
    assert ep.sign_test(0, 0) == 1.0
    assert ep.sign_test(30, 10) < 0.05 < ep.sign_test(25, 15)
    # po = 5/6, pe = (3*2 + 2*3 + 1*1)/36 = 13/36, kappa = (30 - 13) / (36 - 13)
    x, y = ["a", "a", "b", "b", "tie", "a"], ["a", "b", "b", "b", "tie", "a"]
    assert ep.cohen_kappa(x, y) == pytest.approx(17 / 23)
    assert ep.cohen_kappa(x, x) == pytest.approx(1.0)
    assert ep.fleiss_kappa([[3, 0, 0], [0, 3, 0]]) == pytest.approx(1.0)
    assert ep.fleiss_kappa([[2, 1, 0], [1, 2, 0]]) == pytest.approx(-1 / 3)  # P_i = 1/3, P_e = 1/2
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert ep.fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)  # the textbook 14-rater example


def test_logistic_fit_and_length_controlled_win_rate():
    x = np.linspace(-2, 2, 41)
    y = 1 / (1 + np.exp(-(0.3 + 2.0 * x)))
    assert ep.fit_logistic(x, y) == pytest.approx([0.3, 2.0], abs=1e-3)
    # A is longer on 150 items and wins 80% of them; shorter on 50 and wins 20%. Raw win rate 65%, but the
    # saturated fit gives logit(.8) = b0 + c b1, logit(.2) = b0 - c b1, so b0 = 0: 50% at equal length.
    verdicts = {f"i{k}": "a" if (k < 120 or 150 <= k < 160) else "b" for k in range(200)}
    lengths = {f"i{k}": (100, 50) if k < 150 else (50, 100) for k in range(200)}
    s = ep.summarize(verdicts, lengths, seed=0)
    assert s["win_rate"] == pytest.approx(0.65)
    assert s["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert 0.01 < s["lc_se"] < 0.1 and s["length_slope"] > 0
    same_length = ep.summarize(verdicts, {k: (10, 10) for k in lengths}, seed=0)
    assert same_length["lc_win_rate"] == pytest.approx(0.65, abs=1e-3)
    always_longer = ep.summarize(verdicts, {k: (60, 10) for k in lengths}, seed=0)
    assert math.isnan(always_longer["lc_win_rate"])  # no variation in length: the effect can't be estimated


# Alignment.

def test_alignment_on_id_text_and_eval_set(tmp_path):
    a, b = outputs(tmp_path, ["x0", "x1", "x2"], ["y0", "y1", "y2"])
    items = ep.align(a, ep.load_outputs(a, None)[1], b, ep.load_outputs(b, None)[1])
    assert [(i["id"], i["out_a"], i["out_b"]) for i in items] == [("t0", "x0", "y0"), ("t1", "x1", "y1"),
                                                                   ("t2", "x2", "y2")]
    assert ep.load_outputs(a, None)[0] == "alpaca-ckpt"
    # B without ids and in another order: aligned on (instruction, input).
    rows_b = [{"instruction": f"Task {i}", "input": "" if i % 2 else f"input {i}", "output": f"y{i}"}
              for i in (2, 0, 1)]
    b2 = write_jsonl(tmp_path / "other_system.jsonl", rows_b)
    name, rows = ep.load_outputs(b2, None)
    assert name == "other_system"
    items = ep.align(a, ep.load_outputs(a, None)[1], b2, rows)
    assert [(i["id"], i["out_b"]) for i in items] == [("t0", "y0"), ("t1", "y1"), ("t2", "y2")]
    # Ids in another scheme (e.g. line numbers): pairing falls back to the text.
    b3 = write_jsonl(tmp_path / "numbered.jsonl", [dict(r, id=str(k)) for k, r in enumerate(rows_b)])
    items = ep.align(a, ep.load_outputs(a, None)[1], b3, ep.load_outputs(b3, None)[1])
    assert [(i["id"], i["out_b"]) for i in items] == [("t0", "y0"), ("t1", "y1"), ("t2", "y2")]
    # Neither file has ids: aligned on the text, with an id from the text that is the same on every run.
    a2 = write_jsonl(tmp_path / "no_ids.jsonl", [dict(r, output=f"x{i}") for i, r in zip((2, 0, 1), rows_b)])
    items = ep.align(a2, ep.load_outputs(a2, None)[1], b2, rows)
    assert [i["out_a"] for i in items] == ["x2", "x0", "x1"] and [i["out_b"] for i in items] == ["y2", "y0", "y1"]
    assert [i["id"] for i in items] == [i["id"] for i in ep.align(a2, ep.load_outputs(a2, None)[1], b2, rows)]
    assert all(i["id"].startswith("h") for i in items)
    # The eval set fixes the order and the ids.
    eval_rows = [{"id": f"user_oriented_task_{i}", "motivation_app": "Grammarly", "instruction": f"Task {i}",
                  "instances": [{"input": "" if i % 2 else f"input {i}", "output": "ref"}]} for i in (1, 2, 0)]
    ev = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    items = ep.align(a, ep.load_outputs(a, None)[1], b2, rows, eval_set=ev)
    assert [(i["id"], i["out_a"], i["out_b"]) for i in items] == [(f"user_oriented_task_{i}", f"x{i}", f"y{i}")
                                                                   for i in (1, 2, 0)]


def test_alignment_problems_are_listed_and_stop(tmp_path):
    a, b = outputs(tmp_path, ["x0", "x1", "x2", "x3"], ["y0", "y1", "y2", "y3"])
    rows_a = ep.load_outputs(a, None)[1]
    rows_b = ep.load_outputs(b, None)[1]
    rows_b[1]["output"] = "   "
    rows_a.append(dict(rows_a[0], where=f"{a}:5"))
    del rows_b[3]
    with pytest.raises(SystemExit) as e:
        ep.align(a, rows_a, b, rows_b)
    message = str(e.value)
    assert f"{a}:5: item 't0' duplicates {a}:1" in message
    assert f"{b}:2: item 't1' has an empty output" in message
    assert f"{a}:4: item 't3' missing from {b}" in message
    assert "--allow_missing" in message
    items = ep.align(a, rows_a, b, rows_b, allow_missing=True)
    assert [i["id"] for i in items] == ["t2"]


def test_bad_input_files_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: field 'output' \(or 'response'\) missing"):
        ep.load_outputs(bad, None)
    a, b = outputs(tmp_path, ["x0"], ["y0"])
    with pytest.raises(SystemExit, match="both models are named"):
        ep.main(["human", "--a", a, "--b", a, "--annotator", "x", "--judgments", str(tmp_path / "j.jsonl")])
    (tmp_path / "list.jsonl").write_text('{"instruction": "x", "output": "y"}\n["x", "y"]\n')
    with pytest.raises(SystemExit, match=r"list.jsonl:2: expected a JSON object"):
        ep.load_outputs(str(tmp_path / "list.jsonl"), None)
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"id": "u0", "instruction": "Task 0", "instances": []}])
    with pytest.raises(SystemExit, match=r"eval.jsonl:1: field 'instances'"):
        ep.load_eval_set(ev)
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"id": "u0", "instruction": ["Task 0"]}])
    with pytest.raises(SystemExit, match=r"eval.jsonl:1: field 'instruction' missing or not a string"):
        ep.load_eval_set(ev)


# Human sessions: piped keystrokes.

def test_human_session_quit_resume_back_bad_key_and_narrow_terminal(tmp_path):
    url = "https://example.com/" + "x" * 60
    a, b = outputs(tmp_path, [f"first model answer {i} with a link {url}" for i in range(5)],
                   [f"second model reply {i}\n  indented line" for i in range(5)])
    judgments = str(tmp_path / "judgments.jsonl")
    args = ["human", "--a", a, "--b", b, "--annotator", "alice", "--judgments", judgments]
    run = run_cli(*args, stdin="1\n2\nb\nt\nq\n", columns=30)
    assert run.returncode == 0, run.stderr
    assert "alpaca" not in run.stdout and "davinci" not in run.stdout  # blind
    for line in run.stdout.replace("[1/2/t/s/b/q] > ", "\n").splitlines():
        assert len(line) <= 30, line
    assert "(your earlier verdict:\nResponse 2; answer again to\nreplace it)" in run.stdout  # b showed item 2 again
    first = {i: ep.order_first(0, "alice", f"t{i}") for i in range(5)}
    records = read_lines(judgments)
    assert [(r["item"], r["verdict"], r["first"]) for r in records] == [
        ("t0", first[0], first[0]), ("t1", ep.OTHER[first[1]], first[1]), ("t1", "tie", first[1])]
    assert all(r["model_a"] == "alpaca-ckpt" and r["model_b"] == "davinci-003" for r in records)
    assert all("time" in r for r in records)

    # Resume: starts at the third item; end of input quits cleanly.
    run = run_cli(*args, stdin="s\n")
    assert run.returncode == 0, run.stderr
    assert "item 3 of 5 (t2)" in run.stdout and "item 1 of 5" not in run.stdout
    assert "3 of 5 items judged; 2 left" in run.stdout
    assert [(r["item"], r["verdict"]) for r in read_lines(judgments)[3:]] == [("t2", "skip")]
    # Back into the last session's verdicts: a later line for the same item, which the report then reads.
    run = run_cli(*args, stdin="b\n1\n")
    assert run.returncode == 0, run.stderr
    assert "item 4 of 5 (t3)" in run.stdout and "(your earlier verdict: skip; answer again" in run.stdout
    assert run.stdout.count("item 4 of 5 (t3)") == 2 and "3 of 5 items judged; 2 left" in run.stdout
    assert [(r["item"], r["verdict"]) for r in read_lines(judgments)[4:]] == [("t2", first[2])]
    alice = ep.report_numbers(ep.load_judgments([judgments]), None, 0)["raters"]["alice"]
    assert (alice["items"], alice["ties"], alice["skips"], alice["wins"]) == (3, 1, 0, [first[0], first[2]].count("a"))

    # A second annotator; a bad key is asked again, b on the first item shows it again.
    run = run_cli("human", "--a", a, "--b", b, "--annotator", "carol", "--judgments", judgments, stdin="x\nb\n2\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("item 1 of 5 (t0)") == 2
    carol = read_lines(judgments)[5:]
    assert [(r["item"], r["verdict"]) for r in carol] == [("t0", ep.OTHER[ep.order_first(0, "carol", "t0")])]


def test_order_is_seeded_per_annotator_and_item():
    alice = [ep.order_first(0, "alice", f"t{i}") for i in range(200)]
    assert alice == [ep.order_first(0, "alice", f"t{i}") for i in range(200)]
    assert 70 < alice.count("a") < 130
    assert alice != [ep.order_first(0, "bob", f"t{i}") for i in range(200)]
    assert alice != [ep.order_first(1, "alice", f"t{i}") for i in range(200)]


def test_torn_last_line_is_cut_before_appending(tmp_path, capsys):
    path = tmp_path / "j.jsonl"
    assert ep.resume_jsonl(str(path)) == [] and not path.exists()  # absent: nothing, and nothing created
    path.write_text('{"x": 1}\n{"x": 2')
    assert [r["x"] for r in ep.read_records(str(path))] == [1]  # reading (report) leaves the file alone
    assert path.read_text() == '{"x": 1}\n{"x": 2'
    assert [(r["x"], r["where"]) for r in ep.resume_jsonl(str(path))] == [(1, f"{path}:1")]
    assert path.read_text() == '{"x": 1}\n' and (
        "j.jsonl: cutting off a torn last line (7 bytes) of a killed run" in capsys.readouterr().err)
    # The one policy of every script: a last line with no newline is a torn write, even if it parses.
    path.write_text('{"x": 1}\n{"x": 2}')
    assert [r["x"] for r in ep.resume_jsonl(str(path))] == [1] and path.read_text() == '{"x": 1}\n'
    path.write_text('{"x": 1}\n{oops\n{"x": 3}\n')  # a complete line that is not JSON is an error, never skipped
    with pytest.raises(SystemExit, match=r"j.jsonl:2: not valid JSON"):
        ep.resume_jsonl(str(path))
    path.write_text('[{"x": 1},\n {"x": 2}]')  # a JSON array (report reads it) is not appended to
    assert [r["x"] for r in ep.read_records(str(path))] == [1, 2]
    with pytest.raises(SystemExit, match="a JSON array cannot be appended to"):
        ep.resume_jsonl(str(path))
    with open(path, "ab", buffering=0) as f:  # appends are whole lines
        ep.append_jsonl(f, {"x": "é"})
    assert path.read_text().endswith('{"x": "é"}\n')


# The LLM judge against a local OpenAI-compatible server.

class FakeJudge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions. The model name picks the behaviour: 'consistent' prefers the response containing
    GOOD, 'biased' always answers [[1]], 'garbage' never gives a verdict, 'flaky' fails twice before answering."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append(body)
            server.times.append(time.monotonic())
            count = len(server.requests)
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "not found"}})
        if count == server.hold_at:  # keep the client waiting until the test lets go
            server.arrived.set()
            server.release.wait(30)
            return
        time.sleep(server.delay)
        model, prompt = body["model"], body["messages"][-1]["content"]
        if model == "flaky" and count <= 2:
            return self.reply(429 if count == 1 else 503, {"error": {"message": "slow down"}},
                              {"Retry-After": "0", "retry-after-ms": "10"})
        response1 = prompt.split("### Response 1\n")[1].split("### Response 2")[0]
        response2 = prompt.split("### Response 2\n")[1]
        if model == "biased":
            answer = "The first one reads better.\n[[1]]"
        elif model == "garbage":
            answer = "Both responses have merits."
        else:
            answer = "Verdict:\n" + ("[[1]]" if "GOOD" in response1 else "[[2]]" if "GOOD" in response2 else "[[T]]")
        self.reply(200, {"id": f"c{count}", "object": "chat.completion", "created": 0, "model": model,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": answer}}],
                         "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}})

    def reply(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # a client killed mid-request
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    httpd.requests, httpd.times, httpd.lock = [], [], threading.Lock()
    httpd.delay, httpd.hold_at, httpd.arrived, httpd.release = 0, None, threading.Event(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


A_TEXTS = ["GOOD answer zero", "plain one", "plain two", "the same text", "GOOD four, a much longer answer", "five"]
B_TEXTS = ["zero", "GOOD one", "also plain", "the same text", "four", "GOOD five"]
EXPECTED = {"t0": "a", "t1": "b", "t2": "tie", "t3": "tie", "t4": "a", "t5": "b"}


def judge_args(server, model, a, b, judgments, *extra):
    return ["judge", "--a", a, "--b", b, "--model", model, "--judgments", judgments, "--concurrency", "3",
            "--base_url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--price_in", "1", "--price_out", "2",
            *extra]


def test_consistent_judge_both_orders_cache_and_report(tmp_path, server, capsys):
    a, b = outputs(tmp_path, A_TEXTS, B_TEXTS)
    judgments = str(tmp_path / "judgments.jsonl")
    ep.main(judge_args(server, "consistent", a, b, judgments))
    assert len(server.requests) == 10  # 5 different pairs x 2 orders; identical outputs need no call
    orders = {(m["content"].split("### Response 1\n")[1][:4]) for r in server.requests for m in r["messages"][-1:]}
    assert {"GOOD", "zero"} <= orders  # item 0 was asked both ways round
    printed = capsys.readouterr().out
    assert "10 API calls" in printed and "cost $0.0120" in printed  # 10 x (1000 x $1 + 100 x $2) / 1M
    records = read_lines(judgments)
    assert {r["item"]: r["verdict"] for r in records} == EXPECTED
    assert all(r["annotator"] == "judge:consistent" and r["prompt_version"] == ep.PROMPT_VERSION for r in records)
    t0 = next(r for r in records if r["item"] == "t0")
    assert [(o["first"], o["verdict"]) for o in t0["orders"]] == [("a", "a"), ("b", "a")]
    assert "[[1]]" in t0["orders"][0]["answer"] and "[[2]]" in t0["orders"][1]["answer"]

    ep.main(judge_args(server, "consistent", a, b, judgments))  # rerun: everything already judged
    assert len(server.requests) == 10 and len(read_lines(judgments)) == 6
    os.remove(judgments)  # a fresh judgments file: answers come from the cache (judgments.cache.jsonl)
    ep.main(judge_args(server, "consistent", a, b, judgments))
    assert len(server.requests) == 10
    assert {r["item"]: r["verdict"] for r in read_lines(judgments)} == EXPECTED

    capsys.readouterr()
    ep.main(["report", "--judgments", judgments, "--a", a, "--b", b, "--json", str(tmp_path / "r.json")])
    report = json.load(open(tmp_path / "r.json"))["raters"]["judge:consistent"]
    assert (report["wins"], report["losses"], report["ties"]) == (2, 2, 2)
    assert report["position_consistency"] == 1.0 and report["first_position_share"] == 0.5
    assert "alpaca-ckpt wins 2 versus 2 for davinci-003, with 2 ties" in capsys.readouterr().out


def test_position_biased_judge_is_all_ties(tmp_path, server, capsys):
    a, b = outputs(tmp_path, A_TEXTS, B_TEXTS)
    judgments = str(tmp_path / "judgments.jsonl")
    ep.main(judge_args(server, "biased", a, b, judgments))
    assert {r["verdict"] for r in read_lines(judgments)} == {"tie"}
    ep.main(["report", "--a", a, "--b", b, "--judgments", judgments, "--json", str(tmp_path / "r.json")])
    report = json.load(open(tmp_path / "r.json"))["raters"]["judge:biased"]
    assert report["position_consistency"] == 0.0 and report["first_position_share"] == 1.0
    assert report["decisive_answers"] == 10 and report["pairs_in_both_orders"] == 5
    assert report["win_rate"] == 0.5 and report["sign_p"] == 1.0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| judge:biased | 6 |"))
    assert row.endswith("| 100.0% | 0.0% of 5 |")


def test_unparseable_judge_fails_unless_allowed(tmp_path, server, capsys):
    a, b = outputs(tmp_path, A_TEXTS, B_TEXTS)
    judgments = str(tmp_path / "judgments.jsonl")
    with pytest.raises(SystemExit) as e:
        ep.main(judge_args(server, "garbage", a, b, judgments))
    assert "5 item(s) with an unparseable judge answer" in str(e.value)
    assert [r["item"] for r in read_lines(judgments)] == ["t3"]  # only the identical pair, decided without a call
    ep.main(judge_args(server, "garbage", a, b, judgments, "--allow_failures"))
    assert len(server.requests) == 20  # unparseable answers are not cached: asked again


def test_judge_retries_and_budget(tmp_path, server, capsys):
    a, b = outputs(tmp_path, A_TEXTS, B_TEXTS)
    judgments = str(tmp_path / "judgments.jsonl")
    with pytest.raises(SystemExit, match="judge API error on item t0"):  # --max_retries reaches the client
        ep.main(judge_args(server, "flaky", a, b, judgments, "--concurrency", "1", "--max_retries", "1"))
    assert len(server.requests) == 2  # the 429 retried once, then the 503 stops the run
    assert read_lines(judgments) == []  # judgments are written in the items' order: the run stopped at t0
    server.requests.clear()
    server.times.clear()
    ep.main(judge_args(server, "flaky", a, b, judgments, "--concurrency", "1"))
    assert len(server.requests) == 12  # a 429 and a 503, then 10 answers
    # retry-after-ms: 10 was honoured; the client's own backoff waits 0.375-0.5 s, then 0.75-1 s.
    assert server.times[1] - server.times[0] < 0.3 and server.times[2] - server.times[1] < 0.3
    assert {r["item"]: r["verdict"] for r in read_lines(judgments)} == EXPECTED

    server.requests.clear()
    judgments = str(tmp_path / "budget.jsonl")
    with pytest.raises(SystemExit, match="budget --max_usd=0.0025 reached: 7 calls not made, 4 items not judged"):
        ep.main(judge_args(server, "consistent", a, b, judgments, "--concurrency", "1", "--max_usd", "0.0025"))
    assert len(server.requests) == 3  # $0.0012 a call: the third crosses the budget
    ep.main(judge_args(server, "consistent", a, b, judgments))
    assert len(server.requests) == 10
    assert {r["item"]: r["verdict"] for r in read_lines(judgments)} == EXPECTED


# The report: headline, annotators, agreement, and errors in judgments files.

def make_judgments(path, annotators):
    rows = []
    for name, verdicts in annotators.items():
        rows += [{"annotator": name, "item": f"u{k}", "model_a": "alpaca", "model_b": "davinci", "first": "a",
                  "verdict": v} for k, v in enumerate(verdicts)]
    return write_jsonl(path, rows)


def report_outputs(tmp_path, n):
    """--a and --b for make_judgments' items u0 .. u<n-1>."""
    return [f"--{m}=" + write_jsonl(tmp_path / f"{name}.jsonl", [
        {"id": f"u{k}", "instruction": f"Task {k}", "output": " ".join(["word"] * (40 + k % 7)), "generator": name}
        for k in range(n)]) for m, name in (("a", "alpaca"), ("b", "davinci"))]


def test_report_headline_agreement_and_files(tmp_path, capsys):
    alice = ["a"] * 90 + ["b"] * 89 + ["tie"] * 73
    bob = alice[:200] + ["a"] * 52
    carol = ["b"] + alice[1:]
    judge = alice[:5] + ["b"] + alice[6:]
    judgments = make_judgments(tmp_path / "j.jsonl", {"alice": alice, "bob": bob, "carol": carol, "judge:x": judge})
    js = str(tmp_path / "report.json")
    ep.main(["report", *report_outputs(tmp_path, 252), "--judgments", judgments, "--json", js])
    out = capsys.readouterr().out
    assert "- alice: alpaca wins 90 versus 89 for davinci, with 73 ties; no significant difference" in out
    assert "| alice | 252 | 90 | 89 | 73 | 0 | 50.2% (" in out and "p = 1.000" in out
    summary = json.load(open(js))
    assert summary["items"] == 252 and summary["judgments"] == 4 * 252
    # The humans as one rater: item 0 is a, a, b -> a; the last 52 tie, a, tie -> tie; so alice's verdicts.
    assert "| humans (majority) | 252 | 90 | 89 | 73 | 0 | 50.2% (" in out
    assert list(summary["raters"]) == ["alice", "bob", "carol", "judge:x", "humans (majority)"]
    pairs = {tuple(p["raters"]): p for p in summary["agreement"]}
    assert pairs["judge:x", "humans (majority)"]["agreement"] == pytest.approx(251 / 252)
    assert list(pairs) == [("alice", "bob"), ("alice", "carol"), ("bob", "carol"), ("judge:x", "alice"),
                           ("judge:x", "bob"), ("judge:x", "carol"), ("judge:x", "humans (majority)")]
    assert [ep.majority(v) for v in (["a", "b", "tie"], ["a", "b"], ["b", "skip", None], ["b", "a", "b"])] == [
        "tie", "tie", "b", "b"]  # a draw is a tie; skips do not vote
    # bob agrees on the first 200 items and says 'a' where alice said 'tie' on the last 52.
    observed, expected = 200 / 252, (90 * 142 + 89 * 89 + 73 * 21) / 252 ** 2
    assert pairs["alice", "bob"]["agreement"] == pytest.approx(observed)
    assert pairs["alice", "bob"]["cohen_kappa"] == pytest.approx((observed - expected) / (1 - expected))
    counts = [[[alice[k], bob[k], carol[k]].count(c) for c in ("a", "b", "tie")] for k in range(252)]
    assert summary["fleiss_kappa"] == pytest.approx(ep.fleiss_kappa(counts))


def test_report_latest_judgment_wins(tmp_path):
    path = make_judgments(tmp_path / "j.jsonl", {"alice": ["a", "b", "tie"]})
    with open(path, "a") as f:
        f.write(json.dumps({"annotator": "alice", "item": "u1", "model_a": "alpaca", "model_b": "davinci",
                            "first": "b", "verdict": "a", "len_a": 51, "len_b": 41}) + "\n")
    summary = ep.report_numbers(ep.load_judgments([path]), None, 0)
    assert (summary["raters"]["alice"]["wins"], summary["raters"]["alice"]["losses"]) == (2, 0)
    assert list(summary["raters"]) == ["alice"]  # one human: no majority row


def test_report_errors_name_file_and_line(tmp_path):
    path = make_judgments(tmp_path / "j.jsonl", {"alice": ["a", "b", "tie"]})
    lines = open(path).read().splitlines()

    outputs_ = report_outputs(tmp_path, 3)

    def report_error(text, *extra):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            ep.main(["report", "--judgments", str(bad), *(extra or outputs_)])
        return str(e.value)

    assert "bad.jsonl:2: not valid JSON" in report_error("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    wrong = json.dumps(dict(json.loads(lines[2]), model_b="gpt-4"))
    assert "bad.jsonl:3: this judgment compares 'alpaca' (A) with 'gpt-4' (B)" in \
        report_error("\n".join(lines[:2] + [wrong]) + "\n")
    no_verdict = json.loads(lines[1])
    del no_verdict["verdict"]
    assert "bad.jsonl:2: field 'verdict' missing" in report_error("\n".join([lines[0], json.dumps(no_verdict)]))
    assert "bad.jsonl:1: field 'first' is 'c'" in report_error(json.dumps(dict(json.loads(lines[0]), first="c")))
    a, b = outputs(tmp_path, ["x0", "x1"], ["y0", "y1"])
    unknown = json.dumps(dict(json.loads(lines[0]), item="t7"))
    assert "bad.jsonl:1: unknown item 't7'" in report_error(unknown + "\n", "--a", a, "--b", b, "--name_a", "alpaca",
                                                            "--name_b", "davinci")
    # A torn last line from a killed writer is tolerated.
    torn = tmp_path / "torn.jsonl"
    torn.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    summary = ep.report_numbers(ep.load_judgments([str(torn)]), None, 0)
    assert summary["raters"]["alice"]["items"] == 2


def test_help_runs():
    run = run_cli("--help")
    assert run.returncode == 0 and "human" in run.stdout and "judge" in run.stdout and "report" in run.stdout


# The field's files: self-instruct's eval set and predictions, sample.py's ids, alpaca_eval's JSON.

def self_instruct_set(tmp_path):
    """Three tasks as in self-instruct's user_oriented_instructions.jsonl, and the (id, instruction, input) of their
    items with the ids sample.py gives them (<id>#<k> for the k-th of a task's several instances)."""
    tasks = [{"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "Fix the grammar.",
              "instances": [{"input": "She no went.", "output": "She did not go."}]},
             {"id": "user_oriented_task_1", "motivation_app": "Gmail", "instruction": "Write a subject line.",
              "instances": [{"input": "Dinner on Friday?", "output": "Dinner"},
                            {"input": "Report due", "output": "Due"}]},
             {"id": "user_oriented_task_2", "motivation_app": "Twitter", "instruction": "Write a tweet about tea.",
              "instances": [{"input": "", "output": "Tea time!"}]}]
    items = [(t["id"] if len(t["instances"]) == 1 else f"{t['id']}#{k}", t["instruction"], x["input"])
             for t in tasks for k, x in enumerate(t["instances"])]
    return write_jsonl(tmp_path / "user_oriented_instructions.jsonl", tasks), items


def test_self_instruct_predictions_sample_ids_and_alpaca_eval_outputs_align(tmp_path, capsys):
    ev, items = self_instruct_set(tmp_path)
    # sample.py's records: the eval set's ids and its settings, here in reverse order.
    a = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"id": i, "instruction": ins, "input": inp, "output": f"alpaca {k}", "generator": "alpaca-7b",
         "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 512, "seed": 0}
        for k, (i, ins, inp) in enumerate(reversed(items))])
    # self-instruct's human_eval/predictions: no id, text in `response`, instructions with a trailing newline.
    b = write_jsonl(tmp_path / "text-davinci-003_predictions.jsonl", [
        {"prompt": f"{ins}\n\nInput: {inp}\nOutput:", "instruction": ins + "\n", "input": inp,
         "response": f" davinci {k}", "target": "ref"} for k, (i, ins, inp) in enumerate(items)])
    name_b, rows_b = ep.load_outputs(b, None)
    aligned = ep.align(a, ep.load_outputs(a, None)[1], b, rows_b)  # on the text, in A's order, with A's ids
    assert [(x["id"], x["out_a"], x["out_b"]) for x in aligned] == [
        (i, f"alpaca {k}", f" davinci {3 - k}") for k, (i, _, _) in enumerate(reversed(items))]
    assert [i for i, _, _ in items] == ["user_oriented_task_0", "user_oriented_task_1#0", "user_oriented_task_1#1",
                                        "user_oriented_task_2"]
    assert name_b == "text-davinci-003_predictions" and "on (instruction, input)" in capsys.readouterr().err
    aligned = ep.align(a, ep.load_outputs(a, None)[1], b, rows_b, eval_set=ev)  # the eval set's order and ids
    assert [(x["id"], x["out_a"], x["out_b"]) for x in aligned] == [
        (i, f"alpaca {3 - k}", f" davinci {k}") for k, (i, _, _) in enumerate(items)]

    # Two sample.py files: aligned on the ids, for single- and multi-instance tasks alike.
    a2 = write_jsonl(tmp_path / "llama.jsonl", [dict(json.loads(line), output="llama", generator="llama-7b")
                                                for line in open(a)])
    aligned = ep.align(a, ep.load_outputs(a, None)[1], a2, ep.load_outputs(a2, None)[1])
    assert [x["id"] for x in aligned] == [i for i, _, _ in reversed(items)]
    assert "4 items on id" in capsys.readouterr().err
    aligned = ep.align(a, ep.load_outputs(a, None)[1], a2, ep.load_outputs(a2, None)[1], eval_set=ev)
    assert [x["id"] for x in aligned] == [i for i, _, _ in items] and "4 items on id" in capsys.readouterr().err
    # Both outputs files must be complete against the eval set, and hold nothing else.
    rows_a2 = [r for r in ep.load_outputs(a2, None)[1] if r["id"] != "user_oriented_task_1#0"]
    rows_a2.append(dict(rows_a2[0], id="user_oriented_task_9", where=f"{a2}:5"))
    with pytest.raises(SystemExit) as e:
        ep.align(a, ep.load_outputs(a, None)[1], a2, rows_a2, eval_set=ev)
    assert f"{ev}:2: item 'user_oriented_task_1#0' missing from {a2}\n" in str(e.value)
    assert f"{a2}:5: item 'user_oriented_task_9' missing from {ev}\n" in str(e.value)
    assert f"{a2}:5: item 'user_oriented_task_9' missing from {a}\n" in str(e.value)
    with pytest.raises(SystemExit, match=r"user_oriented_instructions.jsonl:2: item 'Write a subject line.' "
                       r"\(user_oriented_task_1#0\) missing from .*predictions.jsonl"):
        ep.align(a, ep.load_outputs(a, None)[1], b, rows_b[:1] + rows_b[2:], eval_set=ev)
    # The flag, through the command line: the session goes in the eval set's order.
    run = run_cli("human", "--a", a, "--b", a2, "--eval_set", ev, "--annotator", "x", "--judgments",
                  str(tmp_path / "j.jsonl"), stdin="q\n")
    assert run.returncode == 0 and "item 1 of 4 (user_oriented_task_0)" in run.stdout, run.stderr

    # alpaca_eval's model_outputs.json: a JSON array of {instruction, output, generator, dataset}.
    c = tmp_path / "model_outputs.json"
    c.write_text(json.dumps([{"dataset": "selfinstruct", "instruction": ins, "output": f"gpt {k}",
                              "generator": "text_davinci_003"} for k, (_, ins, inp) in enumerate(items) if not inp],
                            indent=2))
    name_c, rows_c = ep.load_outputs(str(c), None)
    assert name_c == "text_davinci_003" and rows_c[0]["where"] == f"{c}: item 0"
    aligned = ep.align(a, ep.load_outputs(a, None)[1], str(c), rows_c, allow_missing=True)
    assert [(x["instruction"], x["out_b"]) for x in aligned] == [("Write a tweet about tea.", "gpt 3")]
    aligned = ep.align(str(c), rows_c, str(c), rows_c, eval_set=str(c))  # an eval set without ids: the text's id
    assert [x["id"] for x in aligned] == [ep.align(str(c), rows_c, str(c), rows_c)[0]["id"]]
    assert aligned[0]["id"].startswith("h")
    c.write_text('[{"instruction": "x", "output": 3}]')
    with pytest.raises(SystemExit, match=r"model_outputs.json: item 0: field 'output' \(or 'response'\)"):
        ep.load_outputs(str(c), None)


def test_annotations_json_export_for_alpaca_eval(tmp_path, server, capsys):
    a, b = outputs(tmp_path, A_TEXTS, B_TEXTS)
    judgments = str(tmp_path / "judgments.jsonl")
    ep.main(judge_args(server, "consistent", a, b, judgments))
    annotations = str(tmp_path / "annotations.json")
    ep.main(["report", "--judgments", judgments, "--a", a, "--b", b, "--json", str(tmp_path / "r.json"),
             "--annotations", annotations])
    exported = json.load(open(annotations))
    assert [set(x) for x in exported] == [{"instruction", "output_1", "generator_1", "output_2", "generator_2",
                                           "annotator", "preference"}] * 6
    # alpaca_eval's convention: output_1 is the reference (B), output_2 the evaluated model (A); 2 = output_2 better.
    assert [(x["output_1"], x["output_2"], x["preference"]) for x in exported] == [
        (B_TEXTS[k], A_TEXTS[k], {"a": 2, "b": 1, "tie": 1.5}[EXPECTED[f"t{k}"]]) for k in range(6)]
    assert exported[0]["instruction"] == "Task 0\n\ninput 0" and exported[1]["instruction"] == "Task 1"
    assert {(x["generator_1"], x["generator_2"], x["annotator"]) for x in exported} == {
        ("davinci-003", "alpaca-ckpt", "judge:consistent")}
    # alpaca_eval's win rate, mean(preference - 1), is our A win rate.
    ours = json.load(open(tmp_path / "r.json"))["raters"]["judge:consistent"]["win_rate"]
    assert np.mean([x["preference"] - 1 for x in exported]) == pytest.approx(ours)

    with pytest.raises(SystemExit) as e:  # the judgments do not hold the outputs: report needs --a and --b
        ep.main(["report", "--judgments", judgments, "--annotations", annotations])
    assert e.value.code == 2 and "--a" in capsys.readouterr().err


# Nothing lost at any kill: real processes, real SIGKILL, a real HTTP judge.

KILL_A = [f"GOOD answer {i}" if i % 3 == 0 else f"answer {i}" for i in range(10)]
KILL_B = [f"GOOD reply {i}" if i % 3 == 1 else f"reply {i}" for i in range(10)]


def test_kill_9_at_any_moment_then_rerun_gives_the_uninterrupted_files(tmp_path, server):
    server.delay = 0.03  # a judge that takes a moment, so kills land between and inside requests
    a, b = outputs(tmp_path, KILL_A, KILL_B)
    ep.main(judge_args(server, "consistent", a, b, str(tmp_path / "straight.jsonl"), "--concurrency", "1"))
    judgments = str(tmp_path / "killed.jsonl")
    cache = str(tmp_path / "killed.cache.jsonl")
    command = [sys.executable, SCRIPT, *judge_args(server, "consistent", a, b, judgments, "--concurrency", "1")]

    def lines(path):
        return len(open(path).read().splitlines()) if os.path.exists(path) else 0

    def run_and_kill(ready):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not ready() and process.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert process.poll() is None, "the judge finished before the kill point"
        process.kill()  # SIGKILL
        process.wait()

    run_and_kill(lambda: lines(judgments) >= 1)  # after the first judgment line
    before = lines(judgments)
    run_and_kill(lambda: lines(judgments) >= before + 2)  # two more judgments
    before = lines(cache)
    run_and_kill(lambda: lines(cache) >= before + 1)  # right after an answer is cached, before its pair is complete
    server.hold_at = len(server.requests) + 2  # inside a request: the judge waits for an answer that never comes
    run_and_kill(server.arrived.is_set)
    server.release.set()
    # A kill inside write() leaves half a line: cut the last judgment in two, as such a kill would.
    data = open(judgments, "rb").read()
    open(judgments, "wb").write(data[:data.rstrip(b"\n").rfind(b"\n") + 1 + 40])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    def content(path):  # the file's bytes, but for the time of each judgment
        text = open(path, encoding="utf-8").read()
        assert text.endswith("\n")
        return re.sub(r'"time": "[^"]*"', '"time": ""', text)

    killed, straight = content(judgments), content(str(tmp_path / "straight.jsonl"))
    assert len({json.loads(line)["item"] for line in killed.splitlines()}) == killed.count("\n") == 10  # once each
    assert killed == straight  # in the same order, byte for byte: the judge writes judgments in the items' order
    killed_cache, straight_cache = content(cache), content(str(tmp_path / "straight.cache.jsonl"))
    assert len({json.loads(line)["key"] for line in killed_cache.splitlines()}) == killed_cache.count("\n") == 20
    assert killed_cache == straight_cache
