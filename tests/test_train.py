"""Tests for train.py's data pipeline (prompt, tokenization, truncation, packing, masking) and its training loop
run for real: one process vs torchrun with two, micro-batch sizes, exact resume after a crash, the exported
checkpoint, the command line, and the README's default run from a clean clone."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_TASKS = os.path.join(REPO, "seed_tasks.jsonl")


def fresh_stats():
    return {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    examples = train.read_examples(SEED_TASKS)
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    train.train_tokenizer([train.format_prompt(e["instruction"], e["input"]) + e["output"] for e in examples],
                          path, 500)
    return train.Tokenizer(path)


def test_alpaca_prompts_byte_for_byte():
    # Typed out from Stanford Alpaca's train.py: models trained on it expect exactly these bytes.
    assert train.format_prompt("Name a color.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:")
    assert train.format_prompt("Translate to French.", "Good morning") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood morning\n\n### Response:")


def test_demo_tokenizer_keeps_text_as_is(tokenizer):
    # Like LLaMA's tokenizer, the demo's must give back the exact text: newlines and runs of spaces included
    # (the prompt's "\n\n### Response:" cue, poems, code).
    for e in train.read_examples(SEED_TASKS)[:50]:
        text = train.format_prompt(e["instruction"], e["input"]) + e["output"]
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("a\n\n  b\tc")) == "a\n\n  b\tc"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)


def test_example_tokens_eos_and_prompt_mask(tokenizer):
    example = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
    ids, n_prompt = train.tokenize_example(tokenizer, example, 512, fresh_stats())
    prompt_ids = tokenizer.encode(train.format_prompt(example["instruction"], ""), bos=True)
    assert ids[:n_prompt] == prompt_ids and ids[0] == tokenizer.bos_id
    assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]  # EOS is the id, not text
    assert tokenizer.decode(ids[n_prompt:-1]) == "Red."
    tokens, targets, positions, mask = train.make_batch([[0]], [(ids, n_prompt)], "cpu")
    n = len(ids) - 1
    assert tokens[0, :n].tolist() == ids[:-1]
    # No loss on the prompt: the first supervised target is the response's first token, predicted from the
    # prompt's last token; the last one is EOS; padding after it has none either.
    assert (targets[0, :n_prompt - 1] == -100).all()
    assert targets[0, n_prompt - 1:n].tolist() == ids[n_prompt:]
    assert (targets[0, n:] == -100).all()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_read_json_array_jsonl_and_self_instruct_format(tmp_path):
    items = [{"instruction": "A", "input": "", "output": "a"}, {"instruction": "B", "input": "x", "output": "b"}]
    array = tmp_path / "data.json"
    array.write_text(json.dumps(items, indent=2))
    assert train.read_examples(str(array)) == items
    jsonl = write_lines(tmp_path / "data.jsonl", [json.dumps(items[0]), "", json.dumps(items[1])])
    assert train.read_examples(jsonl) == items
    seed = write_lines(tmp_path / "seed.jsonl", [json.dumps(
        {"id": "t1", "instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"output": "0"}],
         "is_classification": False})])
    assert train.read_examples(seed) == [{"instruction": "Add.", "input": "1 2", "output": "3"},
                                         {"instruction": "Add.", "input": "", "output": "0"}]
    assert len(train.read_examples(SEED_TASKS)) >= 175


@pytest.mark.parametrize("lines,message", [
    (['{"instruction": "A", "output": "a"}', '{"instruction": "B", "input": ""}'],
     r"data\.jsonl:2: field 'output' missing"),
    (['{"instruction": "A", "input": 5, "output": "a"}'], r"data\.jsonl:1: field 'input' must be a string"),
    (['{"instruction": "A", "output": "a"}', "", '{"instruction": "B", "output": "b"'],
     r"data\.jsonl:3: not valid JSON"),
    (['{"instruction": "A", "instances": []}'], r"data\.jsonl:1: field 'instances' must be a non-empty list"),
    (['{"instruction": " ", "output": "a"}'], r"data\.jsonl:1: field 'instruction' is empty"),
    (['["A", "a"]'], r"data\.jsonl:1: expected a JSON object"),
    (['{"instruction": "A", "instances": ["a"]}'], r"data\.jsonl:1: field 'instances' must be a non-empty list"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(SystemExit, match=message):
        train.read_examples(write_lines(tmp_path / "data.jsonl", lines))


def test_bad_json_array_names_the_item_and_field(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "A", "output": "a"}, {"instruction": "B", "input": ["x"]}]))
    with pytest.raises(SystemExit, match=r"data\.json: item 1: field 'input' must be a string"):
        train.read_examples(str(path))
    path.write_text('[{"instruction": "A",\n "output": }]')
    with pytest.raises(SystemExit, match=r"data\.json:2: not valid JSON"):
        train.read_examples(str(path))


def test_dolly_records_map_context_and_response(tmp_path, capsys):
    # Lines as in databricks-dolly-15k.jsonl: instruction, context, response, category.
    rows = [{"instruction": "When did Virgin Australia start operating?",
             "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
             "response": "Virgin Australia commenced services on 31 August 2000.", "category": "closed_qa"},
            {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
             "category": "classification"}]
    path = write_lines(tmp_path / "databricks-dolly-15k.jsonl", [json.dumps(r) for r in rows])
    assert train.read_examples(path) == [{"instruction": r["instruction"], "input": r["context"],
                                          "output": r["response"]} for r in rows]
    assert capsys.readouterr().out.count("data: dolly fields (context -> input, response -> output)") == 1
    write_lines(tmp_path / "databricks-dolly-15k.jsonl", [json.dumps(rows[0]), json.dumps(dict(rows[1], context=5))])
    with pytest.raises(SystemExit, match=r"dolly-15k\.jsonl:2: field 'context' must be a string"):
        train.read_examples(path)


def words(n, seed):
    return " ".join(f"w{(i * 7919 + seed) % 1000}" for i in range(n))


def test_truncation_keeps_the_cue_and_supervised_tokens(tokenizer):
    max_len = 128
    short = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    long_input = {"instruction": "Summarize the text.", "input": words(400, 1), "output": "A summary."}
    long_output = {"instruction": "Count.", "input": "", "output": words(400, 2)}
    both_long = {"instruction": "Rewrite.", "input": words(300, 3), "output": words(300, 4)}
    stats = fresh_stats()
    results = {}
    for name, example in [("short", short), ("long_input", long_input), ("long_output", long_output),
                          ("both_long", both_long)]:
        full_ids, full_n_prompt = train.tokenize_example(tokenizer, example, 10 ** 6, fresh_stats())
        ids, n_prompt = train.tokenize_example(tokenizer, example, max_len, stats)
        results[name] = full_ids, full_n_prompt, ids, n_prompt
        assert len(ids) <= max_len and len(ids) - n_prompt >= 1, name
        assert ids[0] == tokenizer.bos_id, name
        # The prompt keeps its start and its end, "### Response:" included: the model sees the cue to answer.
        assert ids[:8] == full_ids[:8], name
        assert ids[n_prompt - 8:n_prompt] == full_ids[full_n_prompt - 8:full_n_prompt], name
        assert tokenizer.decode(ids[:n_prompt]).endswith("\n\n### Response:"), name
    full_ids, full_n_prompt, ids, n_prompt = results["short"]
    assert (ids, n_prompt) == (full_ids, full_n_prompt)
    # A long prompt loses its middle and the response stays whole, EOS included.
    full_ids, full_n_prompt, ids, n_prompt = results["long_input"]
    assert ids[n_prompt:] == full_ids[full_n_prompt:] and len(ids) == max_len
    # A response longer than the row loses its end (and EOS); the prompt keeps at least a quarter of the row.
    for name in ("long_output", "both_long"):
        full_ids, full_n_prompt, ids, n_prompt = results[name]
        assert len(full_ids) - full_n_prompt > max_len
        assert n_prompt == min(full_n_prompt, max_len // 4) and len(ids) == max_len
        assert ids[n_prompt:] == full_ids[full_n_prompt:full_n_prompt + max_len - n_prompt]
        assert ids[-1] != tokenizer.eos_id
    assert results["long_output"][3] == results["long_output"][1] < max_len // 4  # a short prompt stays whole
    assert stats["prompts_cut"] == 2 and stats["responses_cut"] == 2
    assert stats["tokens_dropped"] == sum(len(r[0]) - len(r[2]) for r in results.values())


def test_truncation_on_the_seed_tasks_at_a_short_length(tokenizer):
    stats = fresh_stats()
    for e in train.read_examples(SEED_TASKS):
        ids, n_prompt = train.tokenize_example(tokenizer, e, 64, stats)
        assert len(ids) <= 64 and len(ids) - n_prompt >= 1 and n_prompt >= 16
    assert stats["prompts_cut"] > 100 and stats["responses_cut"] > 10


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = train.Transformer(train.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                              multiple_of=16, norm_eps=1e-6, max_seq_len=128))
    model.init_weights(std=0.2)  # large enough that attention is far from uniform: a mask leak would show
    return model


def synthetic_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, n_prompt in lengths:
        examples.append((torch.randint(3, 128, (n,), generator=g).tolist(), n_prompt))
    return examples


def loss_alone(model, ids, n_prompt):
    # An independent loss: plain cross-entropy of the example's own logits on its response tokens.
    logits = model(torch.tensor([ids[:-1]]))[0]
    return F.cross_entropy(logits[n_prompt - 1:], torch.tensor(ids[n_prompt:]), reduction="sum")


def test_packed_examples_do_not_see_each_other():
    model = tiny_model()
    examples = synthetic_examples([(30, 20), (9, 4), (17, 16), (5, 1), (12, 6), (2, 1), (25, 3), (8, 7)])
    rows = train.pack(examples, 40)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i][0]) - 1 for i in row) <= 40 for row in rows)
    assert len(rows) < len(examples) and any(len(row) > 2 for row in rows)
    tokens, targets, positions, mask = train.make_batch(rows, examples, "cpu")
    assert tokens.shape[1] % 64 == 0
    with torch.no_grad():
        packed = model(tokens, positions, mask)
        for r, row in enumerate(rows):
            t = 0
            for i in row:
                ids, n_prompt = examples[i]
                n = len(ids) - 1
                assert positions[r, t:t + n].tolist() == list(range(n))
                alone = model(torch.tensor([ids[:-1]]))[0]
                torch.testing.assert_close(packed[r, t:t + n], alone, atol=1e-5, rtol=0)
                t += n
        # Without the document mask the same row gives other logits: the comparison can fail.
        leaky = model(tokens, positions, mask=None)
        assert (leaky - packed).abs().max() > 1e-2


def test_packed_loss_is_the_sum_of_example_losses():
    model = tiny_model(1)
    examples = synthetic_examples([(30, 20), (9, 4), (17, 16), (5, 1), (12, 6), (2, 1), (25, 3), (8, 7),
                                   (40, 38), (3, 2)], seed=1)
    rows = train.pack(examples, 48)
    with torch.no_grad():
        expected = sum(loss_alone(model, ids, n_prompt) for ids, n_prompt in examples).item()
        for world_size in (1, 3):
            for micro_batch_size in (1, 2, 4):
                total, n_targets = 0.0, 0
                for rank in range(world_size):
                    for micro in train.split_rows(rows, rank, world_size, micro_batch_size):
                        tokens, targets, positions, mask = train.make_batch(micro, examples, "cpu")
                        total += model(tokens, positions, mask, targets).item()
                        n_targets += (targets != -100).sum().item()
                assert n_targets == sum(len(ids) - n_prompt for ids, n_prompt in examples)
                assert total == pytest.approx(expected, rel=1e-6)


def test_empty_and_padding_rows_carry_no_loss():
    model = tiny_model()
    examples = synthetic_examples([(10, 3), (6, 2)])
    tokens, targets, positions, mask = train.make_batch([[], [0], []], examples, "cpu")
    assert (targets[0] == -100).all() and (targets[2] == -100).all() and (targets[1, 9:] == -100).all()
    assert (targets != -100).sum() == 7
    with torch.no_grad():
        assert model(tokens, positions, mask, targets).item() == pytest.approx(loss_alone(model, *examples[0]).item(),
                                                                              rel=1e-6)
        tokens, targets, positions, mask = train.make_batch([[], []], examples, "cpu")
        loss = model(tokens, positions, mask, targets)
    assert loss.item() == 0.0 and not loss.isnan()


def test_every_process_gets_the_same_number_of_micro_batches():
    rows = [[i] for i in range(7)]
    for world_size in (1, 2, 3, 8):
        for micro_batch_size in (1, 2, 4):
            shares = [train.split_rows(rows, rank, world_size, micro_batch_size) for rank in range(world_size)]
            assert len({len(share) for share in shares}) == 1
            assert all(1 <= len(micro) <= micro_batch_size for share in shares for micro in share)
            # empty rows only for the micro-batches a share lacks: none inside a micro-batch that has real rows
            assert all(all(micro) or micro == [[]] for share in shares for micro in share)
            assert sorted(r[0] for share in shares for micro in share for r in micro if r) == list(range(7))



def test_rope_and_rmsnorm_equal_the_plain_formulas():
    # train.py computes both in fewer, fused operations; these are the textbook formulas they must match.
    torch.manual_seed(0)
    config = train.ModelArgs(dim=64, n_heads=4, rope_theta=10000.0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 40, 511]])
    inv_freq = train.rope_inv_freq(config)
    torch.testing.assert_close(inv_freq.double(), 10000.0 ** (-torch.arange(0, 16, 2).double() / 16))
    angles = positions.float()[..., None] * inv_freq  # in fp32: what the rotation is made of
    cos, sin = angles.cos(), angles.sin()
    rotation = train.rope_rotation(config, positions)  # made once per forward, complex64
    assert rotation.dtype == torch.complex64 and rotation.shape == (1, 8, 1, 8)
    torch.testing.assert_close(rotation[:, :, 0], torch.complex(cos, sin), atol=1e-6, rtol=0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):  # bf16: one rounding of the output
        x = torch.randn(1, 8, 3, 16).to(dtype).requires_grad_()
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        c, s = cos[:, :, None], sin[:, :, None]
        plain = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
        rotated = train.apply_rope(x, rotation)
        assert rotated.dtype == dtype
        torch.testing.assert_close(rotated.float(), plain, atol=tol, rtol=tol)
        g = torch.randn(1, 8, 3, 16)
        (grad,) = torch.autograd.grad(rotated.float(), x, g)
        (plain_grad,) = torch.autograd.grad(plain, x, g)
        torch.testing.assert_close(grad.float(), plain_grad.float(), atol=tol, rtol=tol)
    norm = train.RMSNorm(32, 1e-5)
    norm.weight.data = torch.rand(32) + 0.5
    x = torch.randn(5, 32) * 3
    plain = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), plain, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the statistics stay fp32; only the output is cast
        y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, plain.detach().to(torch.bfloat16))


def test_greedy_answer_with_the_kv_cache_equals_recomputing_every_token(tokenizer):
    torch.manual_seed(0)
    model = train.Transformer(train.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                              vocab_size=tokenizer.vocab_size, multiple_of=16))
    model.init_weights(std=0.2)
    ids = tokenizer.encode(train.format_prompt("Name a colour.", "red or blue"), bos=True)
    with torch.no_grad():
        for _ in range(30):  # the plain way: the whole sequence again for each new token
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    expected = ids[-30:][:ids[-30:].index(tokenizer.eos_id)] if tokenizer.eos_id in ids[-30:] else ids[-30:]
    reply = train.greedy_answer(model, tokenizer, "Name a colour.", "red or blue", "cpu", max_new_tokens=30)
    assert reply == tokenizer.decode(expected) and len(set(expected)) > 3
    # A model computing in bf16 (LoRA's frozen model, or one GPU without FSDP's policy) answers on the same fp32
    # cache: it used to fail there, bf16 queries against fp32 keys.
    model.to(torch.bfloat16)
    ids = ids[:-30]
    with torch.no_grad():
        for _ in range(30):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    expected = ids[-30:][:ids[-30:].index(tokenizer.eos_id)] if tokenizer.eos_id in ids[-30:] else ids[-30:]
    reply = train.greedy_answer(model, tokenizer, "Name a colour.", "red or blue", "cpu", max_new_tokens=30)
    assert reply == tokenizer.decode(expected)


def test_command_line_settings():
    # --help lists every setting with its default: Alpaca's, and the demo's where tiny_recipe replaces it.
    runs = [subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"})
            for args in (["--help"], ["--epochz=3"], ["--epochs=abc"], ["--resume=maybe"], ["epochs=3"], ["--epoch=3"])]
    (out, _), *failures = [run.communicate(timeout=120) for run in runs]
    assert runs[0].returncode == 0
    for name, value in (("learning_rate", 2e-05), ("batch_size", 128), ("epochs", 3), ("init", ""),
                        ("resume", False), ("max_seq_len", 512), ("data", "seed_tasks.jsonl")):
        demo = f"; without --init {train.tiny_recipe[name]!r} (tiny_recipe)" if name in train.tiny_recipe else ""
        metavar = "[true|false]" if isinstance(value, bool) else name.upper()
        assert re.search(rf"^  --{name} {re.escape(metavar)}\s+default {re.escape(repr(value) + demo)}$", out, re.M), name
    assert "learning_rate" in train.tiny_recipe
    assert [run.returncode for run in runs[1:]] == [2, 2, 2, 2, 2]
    assert "unrecognized arguments: --epochz=3" in failures[0][1]
    assert "argument --epochs: invalid int value: 'abc'" in failures[1][1]
    assert "argument --resume: invalid choice: 'maybe' (choose from 'true', 'false', '1', '0')" in failures[2][1]
    assert "unrecognized arguments: epochs=3" in failures[3][1]
    assert "unrecognized arguments: --epoch=3" in failures[4][1]  # no abbreviations: a typo is an error
    assert all("Traceback" not in err for _, err in failures)


def test_settings_resolve_from_the_recipe_then_the_flags():
    demo = train.parse_args(["--epochs=2", "--resume", "--save_hf=false"])
    assert (demo.epochs, demo.resume, demo.save_hf) == (2, True, False)
    assert demo.learning_rate == train.tiny_recipe["learning_rate"] and demo.init == ""
    alpaca = train.parse_args(["--init=/some/llama", "--resume=true"])
    assert all(getattr(alpaca, k) == train.settings[k] for k in train.tiny_recipe)
    assert alpaca.learning_rate == 2e-5 and alpaca.resume is True
    assert train.learning_rate == 2e-5  # parsing leaves the settings block as it is


# The training runs below use 40 seed tasks, the demo's tiny model, 4 steps of 8 examples in fp32 on the CPU.
RUN_FLAGS = ["--dtype=float32", "--device=cpu", "--max_steps=4", "--batch_size=8", "--max_seq_len=256"]

# Runs train.py's main() in a process, recording the in-memory model's logits on fixed tokens (without LoRA's
# dropout) at each save; optionally copying out_dir as it is after a given step's save (what a run killed then
# would leave, to resume from later), or dying (as kill -9 would) right after it.
DRIVER = """
import os, shutil, sys, torch
sys.path.insert(0, {repo!r})
import train
save_checkpoint = train.save_checkpoint

def save_and_record(model, optimizer, step, tokenizer_path, out_dir, *rest):
    save_checkpoint(model, optimizer, step, tokenizer_path, out_dir, *rest)
    model.eval()
    with torch.no_grad():
        torch.save(model(torch.arange(3, 40)[None]), os.path.join(out_dir, f"logits.{{step}}.pt"))
    model.train()
    if step == int(os.environ.get("COPY_AFTER_STEP", -1)):
        shutil.copytree(out_dir, out_dir + f".step{{step}}")
    if step == int(os.environ.get("DIE_AFTER_STEP", -1)):
        os._exit(9)

train.save_checkpoint = save_and_record
sys.argv = ["train.py", *sys.argv[1:]]
train.main()
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    examples = train.read_examples(SEED_TASKS)[:40]
    (folder / "data.json").write_text(json.dumps(examples))
    (folder / "driver.py").write_text(DRIVER.format(repo=REPO))
    return folder


def train_run(run_dir, name, *flags, launcher=(), die_after_step=None):
    out = run_dir / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it; also far faster on a busy machine
    env.pop("DIE_AFTER_STEP", None)
    if die_after_step is not None:
        env["DIE_AFTER_STEP"] = str(die_after_step)
    script = os.path.join(REPO, "train.py") if launcher else str(run_dir / "driver.py")
    command = [*(launcher or [sys.executable]), script, f"--data={run_dir / 'data.json'}", f"--out_dir={out}",
               *RUN_FLAGS, *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=run_dir, env=env)
    if die_after_step is None:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def weights(out):
    return torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)


def assert_same_weights(a, b, atol=1e-6, rare_atol=None):
    """Every weight within atol; with rare_atol, up to one in 10^4 may be off by up to rare_atol instead. Adam
    divides each gradient by its own magnitude, so a weight whose gradient is nearly zero turns float rounding
    (another summation order: more threads, processes or micro-batches) into a visible difference, a few 1e-5 for
    about one weight in a million, while a real difference (a lost micro-batch, a wrong mask) moves most weights
    by about the learning rate (1e-3 here)."""
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[name] - b[name]).abs().flatten() for name in a])
    worst = max(a, key=lambda name: (a[name] - b[name]).abs().max())
    assert diffs.max() <= (rare_atol or atol), f"{worst} differs by {(a[worst] - b[worst]).abs().max():.2e}"
    assert (diffs > atol).sum() <= len(diffs) // 10 ** 4, f"{(diffs > atol).sum()} weights differ by more than {atol}"


@pytest.fixture(scope="module")
def straight_run(run_dir):
    return train_run(run_dir, "straight")


def losses(stdout):
    return [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", stdout, re.M)]


def grad_norms(stdout):
    return [float(x) for x in re.findall(r"^step \d+/\d+ \|.*\| grad norm ([0-9.]+)", stdout, re.M)]


def assert_same_log(stdout, expected_stdout):
    # The log rounds the loss to 4 decimals and the gradient norm to 2.
    assert losses(stdout) == pytest.approx(losses(expected_stdout), abs=1.5e-4)
    assert grad_norms(stdout) == pytest.approx(grad_norms(expected_stdout), abs=0.015)
    assert len(losses(stdout)) == len(grad_norms(stdout)) == 4


def test_exported_checkpoint_loads_with_the_trained_models_logits(straight_run):
    out, result = straight_run
    assert len(losses(result.stdout)) == 4 and "validation loss" in result.stdout
    assert sorted(p for p in os.listdir(out) if not p.startswith("logits")) == \
        ["consolidated.00.pth", "params.json", "resume", "tokenizer.model"]
    params = json.loads((out / "params.json").read_text())
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps"):
        assert isinstance(params[key], (int, float)) and params[key] > 0, key
    assert params["max_seq_len"] >= 256
    tokenizer = train.Tokenizer(str(out / "tokenizer.model"))
    assert params["vocab_size"] == tokenizer.vocab_size
    model = train.Transformer.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(torch.arange(3, 40)[None])
    torch.testing.assert_close(logits, torch.load(out / "logits.4.pt"), atol=1e-6, rtol=0)
    assert losses(result.stdout)[-1] < losses(result.stdout)[0]  # it did train


def test_two_processes_train_the_same_weights_as_one(run_dir, straight_run):
    out, result = train_run(run_dir, "torchrun", launcher=["torchrun", "--standalone", "--nproc_per_node=2"])
    assert "2 process(es)" in result.stdout
    assert_same_weights(weights(straight_run[0]), weights(out), atol=1e-6, rare_atol=1e-4)
    # Adam is blind to a gradient's scale, so the weights would not show a loss scaled wrongly by the number of
    # processes; the logged loss and gradient norm do.
    assert_same_log(result.stdout, straight_run[1].stdout)


def test_micro_batch_size_does_not_change_the_step(run_dir, straight_run):
    # The demo runs micro-batches of 4 rows (a step packs into 2-3, so one forward); one row per forward: the same step.
    out, result = train_run(run_dir, "micro1", "--micro_batch_size=1")
    assert_same_weights(weights(straight_run[0]), weights(out), atol=1e-6, rare_atol=1e-4)
    assert_same_log(result.stdout, straight_run[1].stdout)


def test_resume_after_a_crash_continues_exactly(run_dir, straight_run):
    out, result = train_run(run_dir, "resumed", "--save_interval=2", die_after_step=2)
    assert result.returncode == 9 and len(losses(result.stdout)) == 2
    _, result = train_run(run_dir, "resumed", "--save_interval=2", "--resume")
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert losses(result.stdout) == losses(straight_run[1].stdout)[2:]
    assert_same_weights(weights(straight_run[0]), weights(out), atol=1e-6)


def test_default_run_from_a_clean_clone(tmp_path):
    # What a new user does: clone, then `python train.py` with no flags, as the README says.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", REPO, str(clone)], check=True, timeout=60)
    result = subprocess.run([sys.executable, "train.py"], cwd=clone, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"validation loss \d+\.\d+", result.stdout)
    assert "model's answer:" in result.stdout
    assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= set(os.listdir(clone / "out" / "tiny"))
    train_losses = losses(result.stdout)
    assert len(train_losses) > 10
    assert sum(train_losses[-5:]) / 5 < 0.5 * sum(train_losses[:3]) / 3
    # Both answers come with their ROUGE-L against the reference.
    scores = [float(x) for x in re.findall(r"^ROUGE-L: ([0-9.]+)$", result.stdout, re.M)]
    assert len(scores) == 2 and all(0 <= x <= 1 for x in scores)
