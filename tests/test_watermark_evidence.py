import dataclasses
import json
import os
import subprocess
import sys

import torch

from train import ModelArgs, Tokenizer, Transformer, format_prompt, read_examples, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tables(stdout):
    """The markdown tables experiments/watermark_evidence.py prints, each as one dict per row keyed by the header."""
    found, block = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip("|").split("|")])
        elif block:
            found.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return found


def test_watermark_evidence_table_detects_what_it_embeds(tmp_path):
    """End to end on a small random model (high entropy, so the watermark takes hold): strong watermarked text is
    detected, the same model's plain text and the human text are not, and texts have the length asked for."""
    examples = read_examples(os.path.join(ROOT, "seed_tasks.jsonl"))
    texts = [format_prompt(e["instruction"], e["input"]) + e["output"] for e in examples]
    train_tokenizer(texts, str(tmp_path / "tokenizer.model"), vocab_size=400)
    tokenizer = Tokenizer(str(tmp_path / "tokenizer.model"))
    torch.manual_seed(0)
    config = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tokenizer.vocab_size + 5, multiple_of=16,
                       max_seq_len=1024)
    model = Transformer(config)
    model.init_weights(std=0.2)
    with open(tmp_path / "params.json", "w") as f:
        json.dump(dataclasses.asdict(config), f)
    torch.save(model.state_dict(), tmp_path / "consolidated.00.pth")

    result = subprocess.run(
        [sys.executable, "experiments/watermark_evidence.py", "--part=table", f"--checkpoint={tmp_path}", "--prompts=4",
         "--batch_size=4", "--max_new_tokens=24", "--gammas", "0.25", "--deltas", "0.5", "5", "--selfhash",
         "--fpr_keys=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    detection, false_positives = tables(result.stdout)
    rows = {(row["prompts"], float(row["delta"])): row for row in detection}
    assert set(rows) == {(s, d) for s in ("seen", "unseen") for d in (0.5, 5.0)}
    for (prompts, delta), row in rows.items():
        assert float(row["T"]) == 24  # EOS is banned, so every text is as long as asked
        assert 0 < float(row["T scored"]) <= 23  # the first token has no context inside the text
        if delta == 5:
            assert float(row["TPR z>4"]) == 1.0 and float(row["green fraction"]) > 0.6
    for prompts in ("seen", "unseen"):
        assert float(rows[prompts, 5.0]["z mean"]) > float(rows[prompts, 0.5]["z mean"]) + 2
    # Unwatermarked texts under 3 keys: none flagged; both countings agree for lefthash.
    assert [(row["scheme"], row["counting"], row["keys"]) for row in false_positives] == [
        ("lefthash", "pairs", "3"), ("lefthash", "ngrams", "3")]
    assert false_positives[0] == dict(false_positives[1], counting="pairs")
    for name, n in (("human", 3 * len(examples)), ("seen", 12), ("unseen", 12)):
        assert false_positives[0][f"FPR z>4 {name} (T, z mean, z SD)"].startswith(f"0/{n} ("), name
