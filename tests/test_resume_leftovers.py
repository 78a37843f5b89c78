"""train.py's resume state survives its own leftovers: whatever mix of resume/, resume.tmp/ and resume.old/ a crash
leaves (complete, half-written or half-deleted), --resume reads the newest complete state and the next save works.
Real saves of a tiny model through torch.distributed.checkpoint, in one gloo process."""
import itertools
import os
import shutil

import pytest
import torch
import torch.distributed as dist

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
    train.save_checkpoint(model, optimizer, step, model.args, str(tokenizer), str(out_dir))


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
        shutil.copytree(root / "run" / "resume", root / f"step{step}")
        saved[step] = weights(model)
    mp.undo()
    return root, saved


def place(state_dir, target, kind):
    """Put a copy of a complete state at target: 'complete', or 'partial' (no step.json and a shard missing: a
    save killed inside dcp.save, or an rmtree that stopped half way)."""
    shutil.copytree(state_dir, target)
    if kind == "partial":
        os.remove(target / "step.json")
        shards = sorted(f for f in os.listdir(target) if f.endswith(".distcp"))
        os.remove(target / shards[0])


KINDS = (None, "complete", "partial")


@pytest.mark.parametrize("old,resume,tmp", list(itertools.product(KINDS, repeat=3)))
def test_every_mix_of_leftovers_resumes_and_saves_again(states, tmp_path, monkeypatch, old, resume, tmp):
    root, saved = states
    out = tmp_path / "out"
    os.makedirs(out)
    # Oldest to newest, as save_checkpoint makes them: resume.old is step 1, resume step 2, resume.tmp step 3.
    for name, kind, step in (("resume.old", old, 1), ("resume", resume, 2), ("resume.tmp", tmp, 3)):
        if kind:
            place(root / f"step{step}", out / name, kind)
    newest = next((step for kind, step in ((tmp, 3), (resume, 2), (old, 1)) if kind == "complete"), None)
    if newest is None:
        with pytest.raises(SystemExit, match="no saved state"):
            load(out, monkeypatch)
    else:
        step, w, optimizer = load(out, monkeypatch)
        assert step == newest and torch.equal(w, saved[newest])
        assert optimizer.state  # AdamW moments came back too
    assert not (out / "resume.old").exists() and not (out / "resume.tmp").exists()

    model, optimizer = tiny()
    train_step(model, optimizer)
    save(model, optimizer, 4, out, monkeypatch)  # the save that used to raise ENOTEMPTY
    assert sorted(d for d in os.listdir(out) if d.startswith("resume")) == ["resume"]
    step, w, _ = load(out, monkeypatch)
    assert step == 4 and torch.equal(w, weights(model))


@pytest.mark.parametrize("crash_at", range(6))
def test_crash_at_each_rename_or_delete_of_a_save(states, tmp_path, monkeypatch, crash_at):
    """save_checkpoint dies at its n-th os.replace or shutil.rmtree (the file system operations of the rename
    dance); the next --resume and save then behave as if the crashed save had either finished or never begun."""
    root, saved = states
    out = tmp_path / "out"
    os.makedirs(out)
    place(root / "step1", out / "resume", "complete")
    model, optimizer = tiny()
    train_step(model, optimizer)
    train_step(model, optimizer)
    calls, real_replace, real_rmtree = [], os.replace, shutil.rmtree

    def dying(real):
        def operation(*args, **kwargs):
            if "resume" in str(args[0]):
                calls.append((real.__name__, str(args[0])))
            if "resume" in str(args[0]) and len(calls) == crash_at + 1:
                if real is real_rmtree:  # die half way through the delete
                    shards = [f for f in os.listdir(args[0]) if f.endswith(".distcp")] if os.path.isdir(args[0]) else []
                    if shards:
                        os.remove(os.path.join(args[0], shards[0]))
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)
        return operation

    monkeypatch.setattr(os, "replace", dying(real_replace))
    monkeypatch.setattr(shutil, "rmtree", dying(real_rmtree))
    try:
        save(model, optimizer, 2, out, monkeypatch)
        crashed = False
    except KeyboardInterrupt:
        crashed = True
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    step, w, _ = load(out, monkeypatch)
    assert step in (1, 2) and torch.equal(w, weights(model) if step == 2 else saved[1])
    assert crashed or step == 2
    save(model, optimizer, 3, out, monkeypatch)
    assert sorted(d for d in os.listdir(out) if d.startswith("resume")) == ["resume"]
    assert load(out, monkeypatch)[0] == 3
