"""Tests for LoRA in train.py: the adapted model starts as the base model, only the adapters train, the merged
checkpoint and the adapters file give the adapted model back, and real runs (one process, torchrun with two, a
resume from the state a run left at step 2) train the same adapters."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

import train
from test_train import DRIVER, REPO, SEED_TASKS, assert_same_weights, grad_norms, losses, synthetic_examples

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def tiny_args(vocab_size=128):
    return train.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                           norm_eps=1e-6, max_seq_len=256)


def lora_model(base, rank=4, alpha=8.0, dropout=0.0, seed=0):
    model = copy.deepcopy(base)
    model.load_state_dict(train.add_lora(model, rank, alpha, dropout, TARGETS, seed), strict=False)
    return model


def batch_loss(model, examples):
    tokens, targets, positions, mask = train.make_batch(train.pack(examples, 64), examples, "cpu")
    return model(tokens, positions, mask, targets)


def test_adapters_start_at_the_base_model_and_only_they_train():
    torch.manual_seed(0)
    base = train.Transformer(tiny_args())
    base.init_weights(std=0.2)
    model = lora_model(base)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" not in name}
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}
    assert frozen.keys() == base.state_dict().keys()
    n_adapters = sum(".lora_" in name for name, _ in model.named_parameters())
    assert n_adapters == 2 * 7 * 2  # A and B for 7 linear layers in each of 2 blocks
    tokens = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))  # B = 0: exactly the base model
    examples = synthetic_examples([(30, 20), (9, 4), (17, 16), (25, 3)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        batch_loss(model, examples).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (".lora_" in name), name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.abs().max() > 0 and not torch.equal(p, initial[name]), name
        else:
            assert torch.equal(p, frozen[name]), name
    # Activation checkpointing recomputes the blocks in the backward pass: the same adapter gradients.
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        batch_loss(model, examples).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == n_adapters
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    # Merged into the weights, the adapters give a plain model with the adapted model's logits.
    merged = train.Transformer(tiny_args())
    merged.load_state_dict(train.merge_lora(copy.deepcopy(model.state_dict()), 8.0 / 4))
    model.eval()
    with torch.no_grad():
        adapted = model(tokens)
        assert (adapted - base(tokens)).abs().max() > 1e-2  # the adapters did change the model
        torch.testing.assert_close(merged(tokens), adapted, atol=1e-5, rtol=1e-5)
    # Dropout acts on the adapters' input in training only.
    dropped = lora_model(base, dropout=0.5)
    dropped.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (dropped(tokens) - adapted).abs().max() > 1e-3
        dropped.eval()
        torch.testing.assert_close(dropped(tokens), adapted, atol=1e-6, rtol=0)
    with pytest.raises(SystemExit, match="--lora_targets=q_proj: expected some of wq,wk"):
        train.add_lora(copy.deepcopy(base), 4, 8.0, 0.0, ["q_proj"], 0)


# Real runs of train.py: a tiny base model given as --init, 4 steps of 8 seed tasks in fp32, LoRA rank 4 on every
# linear layer, with a learning rate high enough that the adapters move far from their start.
LORA_FLAGS = ["--dtype=float32", "--device=cpu", "--max_steps=4", "--batch_size=8", "--max_seq_len=256",
              "--micro_batch_size=2", "--learning_rate=1e-2", "--lora_rank=4", "--lora_alpha=8", "--eval_interval=4",
              "--save_interval=2"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    examples = train.read_examples(SEED_TASKS)[:40]
    (folder / "data.json").write_text(json.dumps(examples))
    (folder / "driver.py").write_text(DRIVER.format(repo=REPO))
    base = folder / "base"
    base.mkdir()
    train.train_tokenizer([train.format_prompt(e["instruction"], e["input"]) + e["output"] for e in examples],
                          str(base / "tokenizer.model"), 400)
    args = tiny_args(train.Tokenizer(str(base / "tokenizer.model")).vocab_size)
    torch.manual_seed(0)
    model = train.Transformer(args)
    model.init_weights()
    torch.save(model.state_dict(), base / "consolidated.00.pth")
    (base / "params.json").write_text(json.dumps(args.__dict__))
    return folder


def lora_run(lora_dir, name, *flags, launcher=(), copy_after_step=None):
    out = lora_dir / name
    script = os.path.join(REPO, "train.py") if launcher else str(lora_dir / "driver.py")
    command = [*(launcher or [sys.executable]), script, f"--init={lora_dir / 'base'}",
               f"--data={lora_dir / 'data.json'}", f"--out_dir={out}", *LORA_FLAGS, *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=lora_dir,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COPY_AFTER_STEP": str(copy_after_step or -1)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def straight(lora_dir):
    return lora_run(lora_dir, "straight", "--lora_dropout=0.1", copy_after_step=2)  # the state a kill would leave


def test_lora_run_writes_merged_weights_and_the_adapters_alone(lora_dir, straight):
    out, result = straight
    assert "trainable (" in result.stdout and "LoRA rank 4 on wq,wk,wv,wo,w1,w2,w3" in result.stdout
    assert len(losses(result.stdout)) == 4 and losses(result.stdout)[-1] < losses(result.stdout)[0]
    # The merged checkpoint reads like a full run's and has the trained (in-memory) model's logits.
    model = train.Transformer.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(torch.arange(3, 40)[None])
    torch.testing.assert_close(logits, torch.load(out / "logits.4.pt"), atol=1e-5, rtol=0)
    # What is not adapted is the base model's, bit for bit; the adapted weights moved.
    base = torch.load(lora_dir / "base" / "consolidated.00.pth", weights_only=True)
    merged = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert merged.keys() == base.keys()
    for name in base:
        adapted = name.split(".")[-2] in TARGETS
        assert torch.equal(merged[name], base[name]) != adapted, name
    # The adapters file, on the base model, gives the merged weights back.
    with safe_open(out / "adapters.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["lora_rank"], float(meta["lora_alpha"]), meta["lora_targets"]) == ("4", 8.0, ",".join(TARGETS))
    assert len(load_file(out / "adapters.safetensors")) == 2 * 7 * 2
    # As the README shows it: merge_lora on the base's weights and the file's adapters, scaled by its metadata.
    rebuilt = train.merge_lora({**base, **load_file(out / "adapters.safetensors")},
                               float(meta["lora_alpha"]) / int(meta["lora_rank"]))
    assert rebuilt.keys() == merged.keys() and all(torch.equal(rebuilt[k], merged[k]) for k in merged)
    # The resume state holds only the adapters (and their optimizer state).
    saved = dcp.FileSystemReader(train.resume_states(str(out))[-1]).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert len(model_keys) == 2 * 7 * 2 and all(".lora_" in k for k in model_keys)


def test_two_processes_train_the_same_adapters_as_one(lora_dir):
    # Dropout masks depend on how rows are shared out, so this comparison is without dropout.
    one, one_result = lora_run(lora_dir, "one", "--lora_dropout=0")
    two, two_result = lora_run(lora_dir, "two", "--lora_dropout=0",
                               launcher=["torchrun", "--standalone", "--nproc_per_node=2"])
    assert "2 process(es)" in two_result.stdout
    assert_same_weights(load_file(one / "adapters.safetensors"), load_file(two / "adapters.safetensors"),
                        atol=1e-6, rare_atol=1e-4)
    assert losses(two_result.stdout) == pytest.approx(losses(one_result.stdout), abs=1.5e-4)
    assert grad_norms(two_result.stdout) == pytest.approx(grad_norms(one_result.stdout), abs=0.015)


def test_lora_resume_continues_exactly(lora_dir, straight):
    # What the straight run left after step 2, resumed: the same losses and adapters, dropout masks included.
    shutil.copytree(straight[0].with_name("straight.step2"), lora_dir / "resumed")
    out, result = lora_run(lora_dir, "resumed", "--lora_dropout=0.1", "--resume")
    assert "at step 2" in result.stdout
    assert losses(result.stdout) == losses(straight[1].stdout)[2:]
    assert_same_weights(load_file(straight[0] / "adapters.safetensors"), load_file(out / "adapters.safetensors"),
                        atol=1e-7)
