"""train.py's resume state survives its own leftovers: whatever mix of numbered states under resume/ a crash leaves
(complete, half-written or half-deleted), --resume reads the newest complete one and the next save works.
Real saves of a tiny model through torch.distributed.checkpoint, in one gloo process."""
import itertools
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import train


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny():
    torch.manual_seed(0)
    model = train.Transformer(train.ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=16,
                                              max_seq_len=16))
    model.init_weights()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model, optimizer):
    optimizer.zero_grad()
    model(torch.arange(8)[None]).float().pow(2).mean().backward()
    optimizer.step()


def weights(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def save(model, optimizer, step, out_dir, monkeypatch):
    tokenizer = out_dir / "tokenizer.model"
    if not tokenizer.exists():
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.write_bytes(b"not read by these tests")
    train.save_checkpoint(model, optimizer, step, str(tokenizer), str(out_dir))


def load(out_dir, monkeypatch):
    model, optimizer = tiny()
    step = train.load_resume_state(model, optimizer, str(out_dir))
    return step, weights(model), optimizer


@pytest.fixture(scope="module")
def states(group, tmp_path_factory):
    """Complete resume states of steps 1, 2, 3 (as directories) and the weights of each step."""
    root = tmp_path_factory.mktemp("states")
    model, optimizer = tiny()
    saved, mp = {}, pytest.MonkeyPatch()
    for step in (1, 2, 3):
        train_step(model, optimizer)
        save(model, optimizer, step, root / "run", mp)
        (state,) = os.listdir(root / "run" / "resume")  # a save leaves only its own
        assert state == str(step)
        shutil.copytree(root / "run" / "resume" / state, root / f"step{step}")
        saved[step] = weights(model)
    mp.undo()
    return root, saved

def place(state_dir, target, kind):
    """Put a copy of a complete state at target: 'complete', or 'partial' (no .metadata and a shard missing: a
    save killed inside dcp.save, or an rmtree that stopped half way)."""
    shutil.copytree(state_dir, target)
    if kind == "partial":
        os.remove(target / ".metadata")
        shards = sorted(f for f in os.listdir(target) if f.endswith(".distcp"))
        os.remove(target / shards[0])

KINDS = (None, "complete", "partial")

@pytest.mark.parametrize("first,second,third", list(itertools.product(KINDS, repeat=3)))
def test_every_mix_of_leftovers_resumes_and_saves_again(states, tmp_path, monkeypatch, first, second, third):
    root, saved = states
    out = tmp_path / "out"
    os.makedirs(out / "resume")
    for step, kind in ((1, first), (2, second), (3, third)):
        if kind:
            place(root / f"step{step}", out / "resume" / str(step), kind)
    (out / "resume" / "notes.txt").write_text("not a state: left alone")
    newest = next((step for kind, step in ((third, 3), (second, 2), (first, 1)) if kind == "complete"), None)
    if newest is None:
        with pytest.raises(SystemExit, match="no saved state"):
            load(out, monkeypatch)
    else:
        step, w, optimizer = load(out, monkeypatch)
        assert step == newest and torch.equal(w, saved[newest])
        assert optimizer.state  # AdamW moments came back too

    model, optimizer = tiny()
    train_step(model, optimizer)
    save(model, optimizer, 4, out, monkeypatch)
    # Numbered after every leftover, complete or not, so it never writes into one; the leftovers are gone.
    last = max((step for step, kind in ((1, first), (2, second), (3, third)) if kind), default=0)
    assert sorted(os.listdir(out / "resume")) == [str(last + 1), "notes.txt"]
    step, w, _ = load(out, monkeypatch)
    assert step == 4 and torch.equal(w, weights(model))

def test_a_new_state_is_numbered_past_every_leftover(states, tmp_path, monkeypatch):
    root, _ = states
    out = tmp_path / "out"
    place(root / "step1", out / "resume" / "1", "complete")
    place(root / "step2", out / "resume" / "7", "partial")  # a save killed inside dcp.save
    model, optimizer = tiny()
    save(model, optimizer, 5, out, monkeypatch)
    assert os.listdir(out / "resume") == ["8"] and load(out, monkeypatch)[0] == 5

@pytest.mark.parametrize("crash_at", range(3))
def test_crash_at_each_step_of_a_save(states, tmp_path, monkeypatch, crash_at):
    """save_checkpoint dies at its n-th file system step on resume/ (dcp.save, deleting each
    older state, half way through); the next --resume and save then behave as if the crashed save had either
    finished or never begun."""
    root, saved = states
    out = tmp_path / "out"
    place(root / "step1", out / "resume" / "1", "complete")
    place(root / "step2", out / "resume" / "2", "partial")
    model, optimizer = tiny()
    train_step(model, optimizer)
    train_step(model, optimizer)
    calls = []
    real_dcp_save, real_write, real_rmtree = dcp.save, train.write_atomic, shutil.rmtree

    def dying(real, name):
        def operation(*args, **kwargs):
            target = str(kwargs.get("checkpoint_id", args[0]))
            if os.sep + "resume" + os.sep in target:
                calls.append(name)
                if len(calls) == crash_at + 1:
                    if name == "dcp.save":  # half the shards written, no metadata
                        real(*args, **kwargs)
                        os.remove(os.path.join(target, ".metadata"))
                    elif name == "rmtree" and os.path.isdir(target) and os.listdir(target):  # die half way through
                        os.remove(os.path.join(target, sorted(os.listdir(target))[0]))
                    raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)
        return operation

    monkeypatch.setattr(dcp, "save", dying(real_dcp_save, "dcp.save"))
    monkeypatch.setattr(train, "write_atomic", dying(real_write, "write_atomic"))
    monkeypatch.setattr(shutil, "rmtree", dying(real_rmtree, "rmtree"))
    try:
        save(model, optimizer, 2, out, monkeypatch)
        crashed = False
    except KeyboardInterrupt:
        crashed = True
    monkeypatch.undo()
    assert crashed and calls == ["dcp.save", "rmtree", "rmtree"][:crash_at + 1]
    step, w, _ = load(out, monkeypatch)
    assert step == (2 if crash_at >= 1 else 1) and torch.equal(w, weights(model) if step == 2 else saved[1])
    save(model, optimizer, 3, out, monkeypatch)
    assert len(os.listdir(out / "resume")) == 1 and load(out, monkeypatch)[0] == 3
