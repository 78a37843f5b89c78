import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import sample
from sample import generate, sample_next
from train import ModelArgs, Tokenizer, Transformer, format_prompt, train_tokenizer

TEXTS = [format_prompt("Give three tips for staying healthy."), "Eat well, sleep enough and move every day.",
         format_prompt("Translate the sentence.", "Le chat dort."), "The cat is sleeping.",
         "Numbers like 12345 and words like alpaca, llama, vicuna."] * 20
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12], [1, 20, 21, 22, 23], [1, 30, 31]]


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                  multiple_of=16, max_seq_len=256))
    model.init_weights(std=0.2)  # larger than training's init, so random logits are far from uniform
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model and tokenizer saved in the Meta layout that train.py writes."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    folder.mkdir()
    train_tokenizer(TEXTS, str(folder / "tokenizer.model"), vocab_size=400)
    tokenizer = Tokenizer(str(folder / "tokenizer.model"))
    model = tiny_model(tokenizer.vocab_size + 5)  # a padded vocabulary: ids past the tokenizer's must be banned
    with open(folder / "params.json", "w") as f:
        json.dump(dataclasses.asdict(model.args), f)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    return str(folder)


class Recorder:
    """A logits processor that keeps what it was given; optionally bans one token."""

    def __init__(self, ban=None):
        self.calls, self.ban = [], ban

    def __call__(self, prev_tokens, logits):
        self.calls.append(([list(p) for p in prev_tokens], logits.clone()))
        if self.ban is not None:
            logits[:, self.ban] = float("-inf")
        return logits


def test_cached_decode_matches_full_forward_at_every_step(model):
    # Ragged prompts in one batch: the cache, the padding mask and the per-row positions are all exercised.
    recorder = Recorder()
    out = generate(model, PROMPTS, 12, temperature=0, logits_processor=recorder)
    assert len(recorder.calls) == 12
    for step, (prev_tokens, logits) in enumerate(recorder.calls):
        for i, prompt in enumerate(PROMPTS):
            assert prev_tokens[i] == prompt + out[i][:step]  # history handed to the hook: no padding
            with torch.no_grad():
                full = model(torch.tensor([prev_tokens[i]]))[0, -1]
            torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, seed=7),
                                      dict(temperature=0.8, top_k=40, top_p=0.9, seed=3)])
def test_batched_equals_one_at_a_time(model, settings):
    batched = generate(model, PROMPTS, 16, **settings)
    alone = [generate(model, [p], 16, **settings)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(ids) == 16 for ids in batched)
    # per-row seeds: a row's sample depends on its own seed only, not on its neighbours
    if settings["temperature"] > 0:
        seeds = [11, 12, 13, 14]
        batched = generate(model, PROMPTS, 16, **{**settings, "seed": seeds})
        assert batched == [generate(model, [p], 16, **{**settings, "seed": s})[0] for p, s in zip(PROMPTS, seeds)]


def test_bf16_batched_equals_one_at_a_time():
    bf16 = tiny_model(300).to(torch.bfloat16)
    recorder = Recorder()
    batched = generate(bf16, PROMPTS, 8, temperature=0, logits_processor=recorder)
    assert all(logits.isfinite().all() for _, logits in recorder.calls)
    assert batched == [generate(bf16, [p], 8, temperature=0)[0] for p in PROMPTS]


def test_deterministic(model):
    assert generate(model, PROMPTS, 10, temperature=0) == generate(model, PROMPTS, 10, temperature=0)
    a = generate(model, PROMPTS, 10, temperature=1.0, seed=1)
    assert a == generate(model, PROMPTS, 10, temperature=1.0, seed=1)
    assert a != generate(model, PROMPTS, 10, temperature=1.0, seed=2)


def test_top_k_and_top_p_stay_in_their_set():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().expand(4000, 4)
    u = (torch.arange(4000) + 0.5) / 4000  # evenly spread draws: counts follow the probabilities exactly
    cases = [(dict(top_k=2, top_p=1.0), {1: 0.5 / 0.8, 3: 0.3 / 0.8}),
             (dict(top_k=0, top_p=0.7), {1: 0.5 / 0.8, 3: 0.3 / 0.8}),
             (dict(top_k=0, top_p=0.85), {1: 0.5 / 0.95, 3: 0.3 / 0.95, 2: 0.15 / 0.95}),
             (dict(top_k=0, top_p=0.3), {1: 1.0}),
             (dict(top_k=3, top_p=0.6), {1: 0.5 / 0.8, 3: 0.3 / 0.8}),
             (dict(top_k=0, top_p=1.0), {1: 0.5, 3: 0.3, 2: 0.15, 0: 0.05})]
    for settings, expected in cases:
        tokens = sample_next(logits, 1.0, u=u, **settings)
        counts = torch.bincount(tokens, minlength=4) / len(tokens)
        assert set(tokens.unique().tolist()) == set(expected), settings
        for token, p in expected.items():
            assert abs(counts[token].item() - p) < 2e-3, (settings, token)
    # the extremes of u stay inside the set too
    edge = sample_next(logits[:2], 1.0, 0, 0.7, torch.tensor([1e-9, 1.0]))
    assert set(edge.tolist()) <= {1, 3}
    assert sample_next(logits[:1], 0, 0, 1.0, u[:1]).item() == 1


def test_top_p_on_the_model_never_leaves_the_nucleus(model):
    recorder = Recorder()
    out = generate(model, PROMPTS, 12, temperature=1.0, top_p=0.5, top_k=20, seed=5, logits_processor=recorder)
    for step, (_, logits) in enumerate(recorder.calls):
        for i in range(len(PROMPTS)):
            probs, ids = logits[i].softmax(-1).topk(20)
            probs = probs / probs.sum()
            nucleus = ids[(probs.cumsum(-1) - probs) < 0.5].tolist()
            assert out[i][step] in nucleus


def test_hook_bans_token_and_eos_stops_a_row(model):
    greedy = generate(model, PROMPTS, 10, temperature=0)
    banned = greedy[0][0]
    out = generate(model, PROMPTS, 10, temperature=0, logits_processor=Recorder(ban=banned))
    assert all(banned not in ids for ids in out)
    # row 0's third greedy token as EOS: row 0 stops before it (EOS not returned), the other rows go on
    eos = greedy[0][2]
    out = generate(model, PROMPTS, 10, temperature=0, eos_id=eos)
    assert out[0] == greedy[0][:2]
    for ids, full in zip(out[1:], greedy[1:]):
        assert ids == (full[:full.index(eos)] if eos in full else full)
    streamed = []
    generate(model, PROMPTS, 10, temperature=0, eos_id=eos, on_token=lambda i, t: streamed.append((i, t)))
    assert [[t for i, t in streamed if i == row] for row in range(4)] == out
    # on_token returning True ends that row there (the demo's worker ends a job so); the other rows go on
    ended = generate(model, PROMPTS, 10, temperature=0, on_token=lambda i, t: i == 1)
    assert ended[1] == greedy[1][:1] and ended[:1] + ended[2:] == greedy[:1] + greedy[2:]


def test_context_limit(model):
    long_prompt = list(range(1, 251))
    out = generate(model, [long_prompt, [1, 2]], 20, temperature=0)
    assert len(out[0]) == 256 - 250 and len(out[1]) == 20
    with pytest.raises(ValueError):
        generate(model, [list(range(1, 257))], 5)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def read_out(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_batch_file_records_and_settings(checkpoint, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    write_lines(eval_file, [json.dumps({"instruction": f"Say something about number {i}.", "input": "x" * i})
                            for i in range(5)] +
                [json.dumps({"id": "seed_task_0", "instruction": "Translate.",
                             "instances": [{"input": "Le chat.", "output": "The cat."}, {"input": "Le chien."}]})])
    out = tmp_path / "out.jsonl"
    common = ["--checkpoint", checkpoint, "--in", str(eval_file), "--out", str(out), "--max_new_tokens", "12",
              "--batch_size", "3", "--temperature", "0.9", "--top_p", "0.95"]
    sample.main(common)
    full = read_out(out)
    assert [r["id"] for r in full] == ["1", "2", "3", "4", "5", "seed_task_0#0", "seed_task_0#1"]
    assert full[1]["input"] == "x" and full[6]["input"] == "Le chien."
    for r in full:
        assert r["generator"] == "tiny" and r["temperature"] == 0.9 and r["top_p"] == 0.95
        assert r["top_k"] == 0 and r["max_new_tokens"] == 12 and r["seed"] == 1337 and "watermark" not in r
        assert isinstance(r["output"], str) and r["dataset"] == "eval"
    # Resuming after kill -9: the real-process tests below.
    # Other settings into the same file would mix two experiments: refused.
    with pytest.raises(SystemExit, match="out.jsonl:1: written with temperature"):
        sample.main(common + ["--temperature", "0.5"])


def test_json_array_input_and_greedy_cli(checkpoint, tmp_path):
    # alpaca_eval's eval set: records with instruction, output, generator and dataset (our run names its own)
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Blue.",
                                      "generator": "text_davinci_003", "dataset": "helpful_base"},
                                     {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]))
    out = tmp_path / "out.jsonl"
    sample.main(["--checkpoint", checkpoint, "--in", str(eval_file), "--out", str(out), "--temperature", "0",
                 "--max_new_tokens", "8"])
    records = read_out(out)
    assert [r["id"] for r in records] == ["0", "1"]
    assert [(r["dataset"], r["generator"]) for r in records] == [("helpful_base", "tiny"), ("eval", "tiny")]
    # the batch path gives what generate gives for the Alpaca prompt, one prompt at a time
    tokenizer = Tokenizer(os.path.join(checkpoint, "tokenizer.model"))
    model = Transformer.from_pretrained(checkpoint)
    ban_undecodable = Recorder(ban=list(range(tokenizer.vocab_size, model.args.vocab_size)))
    ids = generate(model, [tokenizer.encode(format_prompt("Add the numbers.", "2 and 3"), bos=True)], 8,
                   temperature=0, eos_id=tokenizer.eos_id, logits_processor=ban_undecodable)[0]
    assert records[1]["output"] == tokenizer.decode(ids)


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "ok"}', '{"instruction": "fine", "input": ""}', "not json"], "eval.jsonl:3: not valid JSON"),
    (['{"instruction": "ok"}', '{"input": "no instruction"}'], "eval.jsonl:2: field 'instruction' missing"),
    (['{"instruction": 5}'], "eval.jsonl:1: field 'instruction' must be a string"),
    (['{"instruction": "ok", "input": 3}'], "eval.jsonl:1: field 'input' must be a string"),
    (['{"instruction": "ok", "instances": []}'], "eval.jsonl:1: field 'instances' must be a non-empty list"),
    (['{"id": "a", "instruction": "ok"}', '{"id": "a", "instruction": "again"}'], "eval.jsonl:2: duplicate id 'a'"),
    (['{"id": "a#1", "instruction": "ok"}', '{"id": "a", "instruction": "two", "instances": [{}, {}]}'],
     "eval.jsonl:2: duplicate id 'a#1'"),
    (['{"instruction": "ok", "dataset": 3}'], "eval.jsonl:1: field 'dataset' must be a string"),
])
def test_bad_input_stops_before_any_work(checkpoint, tmp_path, lines, message):
    eval_file, out = tmp_path / "eval.jsonl", tmp_path / "out.jsonl"
    write_lines(eval_file, lines)
    out.write_text('{"id": "earlier", "output": "kept"}\n')
    with pytest.raises(SystemExit, match=message):
        sample.main(["--checkpoint", checkpoint, "--in", str(eval_file), "--out", str(out)])
    assert out.read_text() == '{"id": "earlier", "output": "kept"}\n'


def test_prompt_streams_the_response(checkpoint, capsys):
    sample.main(["--checkpoint", checkpoint, "--prompt", "Give three tips for staying healthy.",
                 "--temperature", "0", "--max_new_tokens", "15"])
    printed = capsys.readouterr().out
    tokenizer = Tokenizer(os.path.join(checkpoint, "tokenizer.model"))
    model = Transformer.from_pretrained(checkpoint)
    prompt_ids = tokenizer.encode(format_prompt("Give three tips for staying healthy."), bos=True)
    banned = list(range(tokenizer.vocab_size, model.args.vocab_size))
    hook = Recorder(ban=banned)
    ids = generate(model, [prompt_ids], 15, temperature=0, eos_id=tokenizer.eos_id, logits_processor=hook)[0]
    assert printed == tokenizer.decode(ids) + "\n"


def test_interactive_loop_answers_and_quits(checkpoint, capsys, monkeypatch):
    answers = iter(["Name a colour.", "", "Translate.", "Le chat.", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    sample.main(["--checkpoint", checkpoint, "--temperature", "0", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.count("Response: ") == 2

    def end_of_input(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", end_of_input)
    sample.main(["--checkpoint", checkpoint])  # Ctrl-D ends cleanly


def test_missing_checkpoint_or_tokenizer(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="no such checkpoint folder"):
        sample.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    os.remove(bare / "tokenizer.model")
    with pytest.raises(SystemExit, match="pass --tokenizer"):
        sample.main(["--checkpoint", str(bare), "--prompt", "hi"])
    sample.main(["--checkpoint", str(bare), "--tokenizer", os.path.join(checkpoint, "tokenizer.model"),
                 "--prompt", "hi", "--max_new_tokens", "3"])


def test_watermark_flag_builds_the_processor_and_records_its_params(checkpoint, tmp_path, monkeypatch):
    # A stand-in with watermark.py's interface (the real module lives on another branch): it bans one token.
    built = []

    class FakeWatermark:
        def __init__(self, vocab_size, gamma, delta, scheme, key):
            self.params = {"gamma": gamma, "delta": delta, "scheme": scheme, "key": key, "vocab_size": vocab_size}
            self.calls = 0
            built.append(self)

        def __call__(self, prev_tokens, logits):
            self.calls += 1
            logits[:, 3] = float("-inf")
            return logits

    monkeypatch.setitem(sys.modules, "watermark", types.SimpleNamespace(WatermarkProcessor=FakeWatermark))
    eval_file, out = tmp_path / "eval.jsonl", tmp_path / "out.jsonl"
    write_lines(eval_file, ['{"instruction": "Name a colour."}', '{"instruction": "Count to three."}'])
    sample.main(["--checkpoint", checkpoint, "--in", str(eval_file), "--out", str(out), "--max_new_tokens", "6",
                 "--watermark", "--gamma", "0.5", "--delta", "4", "--key", "7"])
    vocab_size = Transformer.from_pretrained(checkpoint).args.vocab_size
    assert built[0].calls >= 1 and built[0].params["vocab_size"] == vocab_size
    records = read_out(out)
    assert all(r["watermark"] == {"gamma": 0.5, "delta": 4.0, "scheme": "lefthash", "key": 7,
                                  "vocab_size": vocab_size} for r in records)
    # resuming without the watermark into the same file is refused: the file would mix two kinds of output
    with pytest.raises(SystemExit, match="written with watermark="):
        sample.main(["--checkpoint", checkpoint, "--in", str(eval_file), "--out", str(out), "--max_new_tokens", "6"])


# Batch mode as a user runs it: real processes, real SIGKILL, one process or several under torchrun. Every run must
# end with the files of an uninterrupted run, byte for byte.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_FLAGS = ["--max_new_tokens", "16", "--batch_size", "2", "--temperature", "0.9", "--generator", "tiny-alpaca"]


@pytest.fixture(scope="module")
def batch_run(checkpoint, tmp_path_factory):
    """A self-instruct-style eval set (one to three instances per task) and the files one uninterrupted run writes."""
    folder = tmp_path_factory.mktemp("batch")
    tasks = [{"id": f"user_oriented_task_{t}", "motivation_app": "Notes", "instruction": f"Rewrite note {t}.",
              "instances": [{"input": f"note {t}.{k} " * (1 + (t * 3 + k) % 5), "output": "x"}
                            for k in range(1 + t % 3)]} for t in range(7)]
    write_lines(folder / "user_oriented.jsonl", [json.dumps(task) for task in tasks])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the processes below (OMP_NUM_THREADS=1, torchrun's default)
    try:
        sample.main(["--checkpoint", checkpoint, "--in", str(folder / "user_oriented.jsonl"),
                     "--out", str(folder / "reference.json"), *BATCH_FLAGS])
    finally:
        torch.set_num_threads(threads)
    return folder, (folder / "reference.json").read_bytes(), (folder / "reference.jsonl").read_bytes()


def test_json_out_is_alpaca_eval_array_and_ids_follow_self_instruct(batch_run):
    folder, json_bytes, jsonl_bytes = batch_run
    records = json.loads(json_bytes)
    assert [json.loads(line) for line in jsonl_bytes.decode().splitlines()] == records
    assert [r["id"] for r in records[:4]] == ["user_oriented_task_0", "user_oriented_task_1#0",
                                              "user_oriented_task_1#1", "user_oriented_task_2#0"]
    assert len(records) == 13 and records[2]["input"] == "note 1.1 " * 5
    for r in records:  # alpaca_eval reads instruction, output, generator, dataset
        assert r["dataset"] == "user_oriented" and r["generator"] == "tiny-alpaca"
        assert isinstance(r["instruction"], str) and isinstance(r["output"], str)
    assert sorted(os.listdir(folder)) == ["reference.json", "reference.jsonl", "user_oriented.jsonl"]


def launch(checkpoint, batch_run, folder, launcher=(sys.executable,)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SAMPLE_TEST_RUN": str(folder)}
    command = [*launcher, os.path.join(REPO, "sample.py"), "--checkpoint", checkpoint,
               "--in", str(batch_run[0] / "user_oriented.jsonl"), "--out", str(folder / "out.json"), *BATCH_FLAGS]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def lines_in(*paths):
    return sum(open(p, "rb").read().count(b"\n") for p in paths if os.path.exists(p))


def kill_when(proc, ready, pid=lambda proc: proc.pid, timeout=120):
    """SIGKILL pid(proc) (found first, so the kill follows at once) as soon as ready() holds; proc must not have
    finished before that."""
    deadline, target = time.time() + timeout, None
    while target is None or not ready():
        assert proc.poll() is None, "finished before the kill point:\n" + proc.stdout.read()
        assert time.time() < deadline, "no kill point within the timeout"
        target = target or pid(proc)
        time.sleep(0.002)
    os.kill(target, signal.SIGKILL)
    return proc.communicate(timeout=60)[0]


def finish(proc):
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return output


def assert_final_files(folder, batch_run):
    _, json_bytes, jsonl_bytes = batch_run
    assert (folder / "out.json").read_bytes() == json_bytes
    assert (folder / "out.jsonl").read_bytes() == jsonl_bytes
    assert sorted(os.listdir(folder)) == ["out.json", "out.jsonl"]  # no shard or .tmp left behind


def test_kill_9_at_any_point_then_rerun_gives_the_uninterrupted_files(checkpoint, batch_run, tmp_path, capsys):
    folder, work = tmp_path, tmp_path / "out.jsonl"
    torchrun = ["torchrun", "--standalone", "--nproc_per_node=2"]
    # Killed after the 1st line; the rerun (two processes now) is killed after the 5th, at its rank 0.
    kill_when(launch(checkpoint, batch_run, folder), lambda: lines_in(work) >= 1)
    shards = [folder / f"out.jsonl.rank{r}-of-2" for r in range(2)]
    kill_when(launch(checkpoint, batch_run, folder, launcher=torchrun), lambda: lines_in(work, *shards) >= 5,
              lambda proc: rank_pid(folder, 0))
    assert 5 <= lines_in(work, *shards) < 13 and not os.path.exists(folder / "out.json")
    # A torn last line, as a kill in the middle of a write leaves it, and the leftovers of a kill while the final
    # files were written.
    for path in (work, shards[1]):  # both cut (one policy for every append-only file), then merged
        with open(path, "ab") as f:
            f.write(batch_run[2].splitlines(keepends=True)[-1][:40])
    (folder / "out.jsonl.tmp").write_bytes(batch_run[2][:100])
    (folder / "out.json.tmp").write_bytes(batch_run[1][:100])
    # The rerun (one process again; run here, as above it only reads files) finishes with the same files.
    run_here = ["--checkpoint", checkpoint, "--in", str(batch_run[0] / "user_oriented.jsonl"),
                "--out", str(folder / "out.json"), *BATCH_FLAGS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample.main(run_here)
        assert "out.jsonl: cutting off a torn last line (40 bytes) of a killed run" in capsys.readouterr().err
        assert_final_files(folder, batch_run)
        os.remove(folder / "out.json")  # killed after the JSONL was rewritten: the rerun writes the rest
        sample.main(run_here)
    finally:
        torch.set_num_threads(threads)
    assert_final_files(folder, batch_run)


def rank_pid(folder, rank):
    """The pid of the torchrun worker of this test run with that rank."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"SAMPLE_TEST_RUN={folder}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(pid)


def test_torchrun_two_processes_give_the_files_of_one_and_resume_after_a_kill(checkpoint, batch_run, tmp_path):
    torchrun = ["torchrun", "--standalone", "--nproc_per_node=2"]
    folder = tmp_path
    assert "by 2 processes" in finish(launch(checkpoint, batch_run, folder, launcher=torchrun))
    assert_final_files(folder, batch_run)
    # Kill -9 one worker once its shard has a line; torchrun then stops the other. The same command again
    # finishes the job: the files of one uninterrupted process.
    for name in os.listdir(folder):
        os.remove(folder / name)
    shards = [folder / f"out.jsonl.rank{r}-of-2" for r in range(2)]
    kill_when(launch(checkpoint, batch_run, folder, launcher=torchrun), lambda: lines_in(shards[1]) >= 1,
              lambda proc: rank_pid(folder, 1))
    assert 0 < lines_in(*shards) < 13 and not os.path.exists(folder / "out.json")
    assert "already in" in finish(launch(checkpoint, batch_run, folder, launcher=torchrun))
    assert_final_files(folder, batch_run)
