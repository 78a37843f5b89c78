"""The whole recipe on one machine, as the README's section of that name runs it: every stage a real process that
reads the file the stage before wrote, with sample.py --serve standing in for the OpenAI API (teacher and judge).
A tiny model's tasks and verdicts are noise, so this proves the plumbing, not the model: each stage exits 0 on its
input and says what it did."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The server turns its content filter on when it sees OPENAI_API_KEY; offline, nothing may call OpenAI. One thread
# per process: the server and its clients run at once, and tiny models gain nothing from more.
ENV = {**{k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}, "OMP_NUM_THREADS": "1"}


def run(cwd, script, *flags, stdin=None, key=False):
    """A stage's stdout + stderr; the stage must exit 0."""
    env = dict(ENV, OPENAI_API_KEY="none") if key else ENV
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, env=env, input=stdin,
                            capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} {' '.join(flags)} exited {result.returncode}:\n{log[-3000:]}"
    print(f"{time.monotonic() - start:5.1f} s  {script} {' '.join(flags)}")
    return log


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_the_whole_recipe_on_one_machine(tmp_path):
    shutil.copy(os.path.join(ROOT, "seed_tasks.jsonl"), tmp_path)
    # 1. A tiny LLaMA from scratch on the seed tasks. The teacher's prompt (3 seed tasks and the requirements) is
    #    500-950 tokens in its tokenizer, hence a 2048-token context, LLaMA's.
    log = run(tmp_path, "train.py", "--max_seq_len=2048", "--max_steps=2", "--batch_size=4", "--out_dir=out/tiny")
    assert "saved out/tiny" in log

    # 2. ... served as an OpenAI-compatible API, on a free port, capped below what the generator asks for.
    server_log = tmp_path / "serve.log"  # a file, not a pipe, which a server could fill and block on
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint=out/tiny", "--serve",
                               "--port=0", "--max_tokens_cap=256"], cwd=tmp_path, env=ENV,
                              stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Serving" not in server_log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, server_log.read_text()
            time.sleep(0.1)
        line = next(line for line in server_log.read_text().splitlines() if line.startswith("Serving"))
        assert "Serving tiny at http://127.0.0.1:" in line
        api = line.split(" at ")[1].split(" ")[0].rstrip("/") + "/v1"

        # 3. The teacher writes tasks, through the chat API and then the completions API (the second run resumes
        #    the first's file). It asks for 3072 tokens; the server refuses with its cap, and the generator asks
        #    for that from then on.
        teacher = [f"--base_url={api}", "--model=tiny", "--num_instructions=20", "--max_requests=2",
                   "--concurrency=2"]
        for api_kind, extra in (("chat", []), ("completions", ["--export=alpaca_data.json", "--export_seeds"])):
            log = run(tmp_path, "generate_instructions.py", f"--api={api_kind}", *teacher, *extra, key=True)
            assert log.count("the server gives at most 256 tokens per reply (it refused 3072)") == 1, log
            assert "requests: 2 ok, 0 failed" in log and "stopped after --max_requests=2" in log, log
        seeds, kept = len(read_jsonl(tmp_path / "seed_tasks.jsonl")), len(read_jsonl(tmp_path / "regen.jsonl"))
        assert f"exported {seeds + kept} examples to alpaca_data.json ({seeds} seed tasks, {kept} generated)" in log
        export = json.loads((tmp_path / "alpaca_data.json").read_text())
        assert len(export) == seeds + kept and all(set(r) == {"instruction", "input", "output"} for r in export)

        # 4. Supervised fine-tuning on the export, from the tiny model (at the demo's learning rate: Alpaca's
        #    2e-5 would leave a tiny model's outputs as they were, and the judge with nothing to judge).
        log = run(tmp_path, "train.py", "--init=out/tiny", "--data=alpaca_data.json", "--out_dir=out/tiny-sft",
                  "--max_steps=2", "--batch_size=4", "--learning_rate=2e-3")
        assert "alpaca_data.json" in log and "saved out/tiny-sft" in log

        # 5. Both models answer an eval set in self-instruct's format (single-instance tasks), watermarked.
        with open(tmp_path / "seed_tasks.jsonl") as f, open(tmp_path / "eval_tasks.jsonl", "w") as out:
            out.writelines(f.readlines()[:4])
        outputs = {}
        for name in ("tiny", "tiny-sft"):
            log = run(tmp_path, "sample.py", f"--checkpoint=out/{name}", "--in=eval_tasks.jsonl",
                      f"--out={name}.jsonl", "--max_new_tokens=24", "--watermark")
            outputs[name] = read_jsonl(tmp_path / f"{name}.jsonl")
            assert [r["id"] for r in outputs[name]] == [f"seed_task_{i}" for i in range(4)]
            assert all(r["generator"] == name and r["watermark"]["scheme"] == "lefthash" for r in outputs[name])

        # 6. The detector reads the outputs with the settings they record.
        log = run(tmp_path, "watermark.py", "detect", "--tokenizer=out/tiny-sft/tokenizer.model",
                  "--in=tiny-sft.jsonl", "--json")
        verdicts = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert len(verdicts) == 4 and all(v["verdict"] in ("watermarked", "no watermark", "too short")
                                          for v in verdicts), log

        # 7. The served model judges the pairs (its answers are noise, so unparseable ones are allowed), a human
        #    judges them too (keys piped in), and the report reads both.
        #    A tiny model answers some tasks with EOS at once: --allow_missing leaves those empty outputs out.
        pair = ["--a=tiny.jsonl", "--b=tiny-sft.jsonl", "--judgments=judgments.jsonl", "--allow_missing"]
        answered = [(a["output"].strip(), b["output"].strip()) for a, b in zip(*outputs.values())]
        answered = [(a, b) for a, b in answered if a and b]
        assert answered, outputs
        asked = server_log.read_text().count("POST /v1/chat/completions")
        log = run(tmp_path, "eval_pairwise.py", "judge", *pair, "--model=tiny", f"--base_url={api}",
                  "--max_new_tokens=32", "--allow_failures")
        calls = server_log.read_text().count("POST /v1/chat/completions") - asked
        assert calls == 2 * sum(a != b for a, b in answered), log  # both orders of each pair that differs
        run(tmp_path, "eval_pairwise.py", "human", *pair, "--annotator=me", stdin="1\n2\nt\n1\n")
        assert [r["annotator"] for r in read_jsonl(tmp_path / "judgments.jsonl")].count("me") == len(answered)
        log = run(tmp_path, "eval_pairwise.py", "report", *pair[:2], "--allow_missing", "--judgments=judgments.jsonl",
                  "--json=report.json")
        assert "tiny-sft" in log and json.loads((tmp_path / "report.json").read_text())
    finally:
        server.send_signal(signal.SIGINT)
        try:
            assert server.wait(timeout=30) == 0
        finally:
            server.kill()
