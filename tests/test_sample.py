import dataclasses
import json
import os
import shutil
import sys
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


def test_batch_file_and_resume(checkpoint, tmp_path, monkeypatch):
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
        assert isinstance(r["output"], str)

    # A kill -9 mid-write: two finished lines and a torn third. The rerun cuts the torn line, redoes only
    # the missing items, and gives exactly the outputs of the uninterrupted run.
    text = open(out).read().splitlines(keepends=True)
    with open(out, "w") as f:
        f.write(text[0] + text[4] + text[2][:15])
    sample.main(common)
    assert read_out(out) == full

    # A run that dies after its first batch keeps that batch; the rerun finishes without duplicates.
    os.remove(out)
    real_generate, calls = sample.generate, []

    def dying_generate(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        sample.main(common)
    assert len(read_out(out)) == 3
    monkeypatch.setattr(sample, "generate", real_generate)
    sample.main(common)
    assert read_out(out) == full

    # Other settings into the same file would mix two experiments: refused.
    with pytest.raises(SystemExit, match="out.jsonl:1: written with temperature"):
        sample.main(common + ["--temperature", "0.5"])


def test_json_array_input_and_greedy_cli(checkpoint, tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"instruction": "Name a colour.", "input": ""},
                                     {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]))
    out = tmp_path / "out.jsonl"
    sample.main(["--checkpoint", checkpoint, "--in", str(eval_file), "--out", str(out), "--temperature", "0",
                 "--max_new_tokens", "8"])
    records = read_out(out)
    assert [r["id"] for r in records] == ["0", "1"]
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
