"""
Benchmarks of the recipe's scripts on this machine: too slow or too noisy to be tests. Runs take turns, so a busy
moment slows all alike; figures are medians. The watermark's evidence is experiments/watermark_evidence.py.

    python bench.py rouge       # generate_instructions.py's ROUGE-L filter over 52K instructions vs the reference
    python bench.py train       # train.py's packed rows vs the original recipe's padded batches; --lora_rank=16
    python bench.py sample      # sample.py's decode speed against the memory-bandwidth roofline; --part=processes
"""
import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch._inductor.config
import torch.nn.functional as F
from rouge_score import rouge_scorer

import train
from generate_instructions import RougeIndex, rouge_tokens
from sample import generate

ROOT = os.path.dirname(os.path.abspath(__file__))
BENCH_MODEL = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000)  # 60M parameters, LLaMA's vocabulary

def in_turns(runs, repeats, device="cpu", warm_up=()):
    """Seconds of each run (name -> callable), `repeats` times, in turns; warm_up: run once first, untimed."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    for name in warm_up:
        runs[name]()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times

def random_model(shape, max_seq_len, folder=None, device="cpu", seed=0):
    """A model with random weights, written as a Meta folder if folder is given (for train.py, sample.py)."""
    torch.manual_seed(seed)
    config = train.ModelArgs(**shape, max_seq_len=max_seq_len)
    with torch.device(device):
        model = train.Transformer(config)
    model.init_weights()
    if folder:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(folder, "consolidated.00.pth"))
        with open(os.path.join(folder, "params.json"), "w") as f:
            json.dump(vars(config), f)
    return model, config

def reference_scores(kept_tokens, text):  # the original recipe: rouge_score's _score_lcs for every pair
    tokens = rouge_tokens(text)
    return np.array([rouge_scorer._score_lcs(tokens, other).fmeasure for other in kept_tokens])

def run_filter(texts, scores_of, add, keep_scores=False):
    """generate_instructions.py's filter: drop a text if its ROUGE-L to a kept one is above 0.7; note neighbours."""
    kept, neighbours, all_scores, pairs = [], [], [], 0
    for text in texts:
        scores = scores_of(text)
        pairs += len(kept)
        all_scores += [scores] if keep_scores else []
        if len(kept) == 0 or scores.max() <= 0.7:
            neighbours += [(np.argsort(-scores, kind="stable")[:10].tolist(), scores.mean())] if len(kept) else []
            kept.append(text)
            add(text)
    return kept, neighbours, all_scores, pairs

def bench_rouge(args):
    """The whole ROUGE-L near-duplicate filter of generate_instructions.py over a synthetic 52K corpus."""
    # Zipf-distributed words (so common words are shared, as in real text), log-normal lengths with mean ~13 tokens
    # and a tail to ~150, capitalized and punctuated to exercise the tokenizer.
    rng = np.random.default_rng(args.seed)
    vocab, zipf = np.array([f"w{i}" for i in range(20000)]), 1.0 / np.arange(1, 20001) ** 1.1
    lengths = np.clip(np.round(rng.lognormal(2.4, 0.6, args.n)), 4, 150).astype(int)
    lengths[rng.choice(args.n, 20, replace=False)] = rng.integers(100, 151, 20)
    words, ends = rng.choice(vocab, lengths.sum(), p=zipf / zipf.sum()), np.cumsum(lengths)
    corpus = [" ".join(words[e - n:e]).capitalize() + rng.choice([".", "?", ":", ", please!"])
              for e, n in zip(ends, lengths)]
    print(f"corpus: {len(corpus)} instructions, {lengths.mean():.1f} tokens on average, max {lengths.max()}")
    subset, kept_tokens, index, start = corpus[:args.subset], [], RougeIndex(), time.perf_counter()
    ref = run_filter(subset, lambda text: reference_scores(kept_tokens, text),
                     lambda text: kept_tokens.append(rouge_tokens(text)), keep_scores=True)
    ref_seconds = time.perf_counter() - start
    fast = run_filter(subset, index.scores, index.add, keep_scores=True)
    identical = fast[:2] == ref[:2] and all(np.array_equal(a, b) for a, b in zip(fast[2], ref[2]))
    print(f"reference on the first {len(subset)}: {ref[3]} pairs in {ref_seconds:.1f}s = {ref[3] / ref_seconds:,.0f} "
          f"pairs/s; identical decisions, neighbours and scores: {identical}")
    index, start = RougeIndex(), time.perf_counter()
    kept, _, _, pairs = run_filter(corpus, index.scores, index.add)
    seconds, reference_seconds = time.perf_counter() - start, pairs / (ref[3] / ref_seconds)
    for text in corpus[-5:]:  # also check the full index (all its length groups, long posting lists) on samples
        sample = rng.choice(len(kept), min(2000, len(kept)), replace=False)
        expected = reference_scores([rouge_tokens(kept[i]) for i in sample], text)
        identical &= bool(np.array_equal(index.scores(text)[sample], expected))
    print(f"RougeIndex on all {len(corpus)}: {seconds:.1f}s, {len(corpus) / seconds:,.0f} instructions/s, "
          f"{pairs / seconds:,.0f} pairs/s, kept {len(kept)}")
    print(f"reference extrapolated: {reference_seconds:,.0f}s for the same {pairs} pairs")
    print(f"rouge_52k_seconds={seconds:.1f} speedup_vs_reference={reference_seconds / seconds:.0f} "
          f"identical={str(identical).lower()}")

def packed_step(model, optimizer, rows, examples, micro_batch_size, dev):
    """train.py's way: rows of 512, examples kept apart by the mask, the output layer on responses only."""
    for i in range(0, len(rows), micro_batch_size):
        tokens, targets, positions, mask = train.make_batch(rows[i:i + micro_batch_size], examples, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(tokens, positions, mask, targets)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def padded_step(model, optimizer, examples, order, dev, hugging_face=False):
    """The original recipe's shuffled batches of 4 padded to the longest: on our model, or on HF's LLaMA (bf16)."""
    for i in range(0, len(order), 4):
        batch = [examples[j] for j in order[i:i + 4]]
        length = max(len(ids) for ids, _ in batch)
        tokens = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in batch], device=dev)
        labels = torch.tensor([[-100] * n + ids[n:] + [-100] * (length - len(ids)) for ids, n in batch], device=dev)
        attention = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in batch], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = (model(input_ids=tokens, attention_mask=attention, labels=labels) if hugging_face
                   else model(tokens[:, :-1]))
        (out.loss if hugging_face else F.cross_entropy(out.flatten(0, 1), labels[:, 1:].flatten())).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def flops_of(rows, examples, config):
    # 6 per parameter per token for the blocks, the output layer on supervised tokens only, attention 6·L·dim·n².
    q_dim, kv_dim = config.n_heads * config.head_dim, (config.n_kv_heads or config.n_heads) * config.head_dim
    block_params = config.n_layers * config.dim * (2 * q_dim + 2 * kv_dim + 3 * train.ffn_hidden_dim(config))
    sizes = [(len(ids) - 1, len(ids) - n_prompt) for ids, n_prompt in (examples[i] for row in rows for i in row)]
    return sum(6 * (block_params * n + config.dim * config.vocab_size * n_response + config.n_layers * config.dim
                    * n * n) for n, n_response in sizes)

def peak_flops(dev):
    # A GPU's spec sheet (dense bf16). No spec sheet for a CPU: time a large bf16 matmul and call that the peak.
    if dev.type == "cuda":
        return next((v for k, v in {"A100": 312e12, "H100": 989e12, "H200": 989e12}.items()
                     if k in torch.cuda.get_device_name(dev)), np.nan), "spec sheet"
    a, b = torch.randn(1024, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
    return 2 * 1024**3 / min(in_turns({"mm": lambda: a @ b}, 30, warm_up=["mm"] * 10)["mm"]), "measured (best of 30)"

def peak_memory(dev, reset=False):
    """Peak memory since the last reset: allocated on a GPU; the resident set on Linux (after a malloc_trim)."""
    if dev.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(dev) if reset else torch.cuda.max_memory_allocated(dev)
    if not reset:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def bench_train(args):
    """Training throughput: packed rows vs the original recipe's padded batches (our model; HF's LlamaForCausalLM) vs
    train.py's whole process on the same examples (start-up included: a lower bound); --lora_rank=R adds LoRA."""
    from transformers import LlamaConfig, LlamaForCausalLM  # requirements-test.txt
    dev = torch.device(args.device)
    shape = {"bench": BENCH_MODEL, "1b": dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000)}[args.config]
    folder = tempfile.mkdtemp(prefix="bench_train_")  # the same model and examples as files, for train.py
    model, config = random_model(shape, 512, folder, dev, args.seed)
    for layer in model.layers if args.compile else []:
        layer.compile()
    # Alpaca-shaped examples: Alpaca's prompt around a short instruction, an input 40% of the time, a response with a
    # long tail, as in the 52K set (~80 prompt / ~70 response tokens); random words, mostly one piece each.
    rng = np.random.default_rng(args.seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(1000)]
    records = []
    for _ in range(args.examples):
        n_input = int(rng.lognormal(3.0, 0.8)) if rng.random() < 0.4 else 0
        lengths = (int(rng.lognormal(2.7, 0.5)) + 1, n_input, int(rng.lognormal(3.9, 0.8)) + 1)
        records.append(dict(zip(("instruction", "input", "output"), (" ".join(rng.choice(words, n)) for n in lengths))))
    with open(os.path.join(folder, "data.json"), "w") as f:
        json.dump(records, f)
    train.train_tokenizer([train.format_prompt(r["instruction"], r["input"]) + r["output"] for r in records],
                          os.path.join(folder, "tokenizer.model"), 4000)
    tokenizer = train.Tokenizer(os.path.join(folder, "tokenizer.model"))
    examples = [train.tokenize_example(tokenizer, r, 512, {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0})
                for r in records]
    real_tokens = sum(len(ids) - 1 for ids, _ in examples)
    print(f"{args.examples} examples, {real_tokens / args.examples:.0f} tokens each on average "
          f"({sum(n for _, n in examples) / args.examples:.0f} prompt); model {args.config}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {dev.type}, bf16 autocast")
    rows, order = train.pack(examples, 512), rng.permutation(len(examples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    runs = {"packed": lambda: packed_step(model, optimizer, rows, examples, args.micro_batch_size, dev),
            "padded": lambda: padded_step(model, optimizer, examples, order, dev)}
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        intermediate_size=train.ffn_hidden_dim(config), vocab_size=config.vocab_size, max_position_embeddings=512))
    hf_optimizer = torch.optim.AdamW(hf.to(dev).parameters(), lr=1e-5, fused=dev.type == "cuda")
    runs["hugging_face"] = lambda: padded_step(hf, hf_optimizer, examples, order, dev, hugging_face=True)
    steps = list(runs)
    runs["whole_process"] = lambda: subprocess.run(  # train.py from start-up to its printed answers
        [sys.executable, os.path.join(ROOT, "train.py"), f"--init={folder}", f"--data={folder}/data.json", "--epochs=1",
         f"--out_dir={folder}/out", f"--device={args.device}"] + ["--compile"] * args.compile,
        stdout=subprocess.DEVNULL, check=True)
    times = in_turns(runs, args.repeats, dev, warm_up=steps)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    useful_flops, (peak, peak_kind) = flops_of(rows, examples, config), peak_flops(dev)
    for name in steps:
        mfu = 100 * useful_flops / seconds[name] / peak
        print(f"{name}: {real_tokens / seconds[name]:,.0f} real tokens/s, MFU {mfu:.1f}% of {peak / 1e12:.2f} TFLOP/s "
              f"({peak_kind}) (median of {args.repeats}: {', '.join(f'{t:.2f}' for t in times[name])} s)")
    print(f"whole process (python train.py --init=... --data=... --epochs=1): {seconds['whole_process']:.1f} s (median "
          f"of {args.repeats}: {', '.join(f'{t:.1f}' for t in times['whole_process'])} s)")
    print(f"speedup_packed_vs_padded={seconds['padded'] / seconds['packed']:.2f}")
    for name in steps[1:]:  # the baseline's steps alone vs our whole process
        print(f"speedup_whole_process_vs_{name}={seconds[name] / seconds['whole_process']:.2f}")
    if not args.lora_rank:
        return
    # LoRA (train.py's defaults but the rank) vs full fine-tuning, same packed passes; the rest goes, out of both peaks
    figures, runs, hf, hf_optimizer, memory_kind = {}, None, None, None, "allocated" if dev.type == "cuda" else "RSS"
    for name in ("full", "lora"):
        if name == "lora":  # as train.py: the frozen model in the compute dtype (bf16), fp32 adapters and Adam
            model.to(torch.bfloat16)
            model.load_state_dict(train.add_lora(model, args.lora_rank, train.lora_alpha, train.lora_dropout,
                                                 train.lora_targets.split(","), args.seed), strict=False)
            model.to(dev)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-4 if name == "lora" else 1e-5, fused=dev.type == "cuda")
        peak_memory(dev, reset=True)
        times = in_turns({name: lambda: packed_step(model, optimizer, rows, examples, args.micro_batch_size, dev)},
                         args.repeats, dev, warm_up=[name])[name]
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        figures[name] = real_tokens / statistics.median(times), peak_memory(dev)
        print(f"{name if name == 'full' else f'LoRA rank {args.lora_rank} ({train.lora_targets})'}: "
              f"{figures[name][0]:,.0f} real tokens/s, peak memory {figures[name][1] / 2**30:.2f} GiB ({memory_kind}), "
              f"{n_trainable / 1e6:.2f}M trainable parameters, optimizer state {state_bytes / 2**20:.1f} MiB")
    print(f"lora_vs_full_tokens_per_s={figures['lora'][0] / figures['full'][0]:.2f} "
          f"lora_vs_full_peak_memory={figures['lora'][1] / figures['full'][1]:.2f}")

def bench_sample(args):
    """Decode tokens/s of sample.generate at batch 1 and 16, bf16 and fp32, against batch 1's roofline: a step reads
    every weight once, so tokens/s cannot beat memory bandwidth / weight bytes; --part=processes: sample.py --in."""
    if args.part != "decode":
        bench_sample_processes(args)
    if args.part == "processes":
        return
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.compile and not cuda:
        torch._inductor.config.freezing = True  # packs the weights for the CPU matmul kernels once, not each step
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.new_tokens} decode steps per run, "
          f"median of {args.repeats} runs" + (", compiled" if args.compile else ""))
    n, seven_b = args.new_tokens, dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    for name, shape, dtype_name in [("bench", BENCH_MODEL, "bfloat16"), ("bench", BENCH_MODEL, "float32")] + [
            ("7B", seven_b, "bfloat16")] * cuda:
        model = random_model(shape, 1024, device=args.device)[0].to(getattr(torch, dtype_name)).eval()
        weight_bytes = sum(p.numel() * p.element_size() for k, p in model.named_parameters()
                           if k != "tok_embeddings.weight")
        model = torch.compile(model, dynamic=True) if args.compile else model
        # Summing a buffer the size of the weights reads it as a decode step does (from DRAM, or the L3 that holds it)
        buffer = torch.ones(min(weight_bytes, 2**30) // 4, device=args.device)
        print(f"{name} model, {dtype_name}: {weight_bytes / 1e6:.0f} MB of weights read per step", flush=True)
        for batch in (1, 16):
            prompts = [[1 + (i * 7 + j) % 31000 for j in range(args.prompt_len)] for i in range(batch)]
            # Decode alone: 1 + n tokens minus 1 (prefill); a no-op hook of the watermark's shape costs the hook
            runs = {"prefill": lambda: generate(model, prompts, 1, temperature=0),
                    "decode": lambda: generate(model, prompts, 1 + n, temperature=0)}
            if batch == 1:
                runs["hooked"] = lambda: generate(model, prompts, 1 + n, temperature=0,
                                                  logits_processor=lambda prev_tokens, logits: logits)
                runs["read"] = buffer.sum
            t = {k: statistics.median(v) for k, v in in_turns(runs, args.repeats, args.device, ["decode"]).items()}
            tokens_per_s = batch * n / (t["decode"] - t["prefill"])
            line = f"  batch {batch:2d}: {tokens_per_s:8.1f} tokens/s ({1e3 * batch / tokens_per_s:.2f} ms/step)"
            if batch == 1:
                bandwidth = buffer.numel() * 4 / t["read"]
                line += (f"; bandwidth {bandwidth / 1e9:.1f} GB/s, roofline {bandwidth / weight_bytes:.0f} "
                         f"tokens/s, reached {100 * tokens_per_s * weight_bytes / bandwidth:.0f}%; a no-op "
                         f"logits hook adds {1e3 * (t['hooked'] - t['decode']) / n:+.3f} ms/step")
            print(line, flush=True)

def bench_sample_processes(args):
    """sample.py --in as whole processes, as a user runs it: items/s with one process and torchrun's two, on the bench
    model with random weights (every answer runs to --new_tokens) and the first --items seed tasks."""
    folder = tempfile.mkdtemp(prefix="bench_sample_")
    examples = train.read_examples(os.path.join(ROOT, "seed_tasks.jsonl"))
    texts = [e["instruction"] + e["input"] + e["output"] for e in examples]
    train.train_tokenizer(texts, f"{folder}/tokenizer.model", 2000)  # the model's ids past it are banned (padded)
    random_model(BENCH_MODEL, 1024, folder)
    with open(f"{folder}/eval.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples[:args.items])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {"1 process": ([sys.executable], {}), "1 process, 1 thread": ([sys.executable], {"OMP_NUM_THREADS": "1"}),
            "2 processes (torchrun, 1 thread each)": (torchrun, {})}
    times, outputs = {name: [] for name in runs}, {}
    for i in range(args.repeats):
        for j, (name, (launcher, env)) in enumerate(runs.items()):  # in turns, each to a new --out (no resuming)
            out, start = f"{folder}/out{i}-{j}.json", time.perf_counter()
            subprocess.run([*launcher, os.path.join(ROOT, "sample.py"), f"--checkpoint={folder}", f"--out={out}",
                            f"--in={folder}/eval.jsonl", f"--max_new_tokens={args.new_tokens}", "--temperature=0"],
                           check=True, capture_output=True, env={**os.environ, **env})
            times[name].append(time.perf_counter() - start)
            outputs[name] = open(out + "l", "rb").read()  # the working .jsonl next to the --out array
    print(f"sample.py --in: {args.items} items x {args.new_tokens} new tokens (greedy, batch 16), whole process, "
          f"median of {args.repeats} runs taken in turns")
    for name, t in times.items():
        same = "same outputs" if outputs[name] == outputs["1 process"] else "OUTPUTS DIFFER from 1 process"
        print(f"  {name:40s} {args.items / statistics.median(t):6.2f} items/s ({statistics.median(t):.1f} s; {same})",
              flush=True)
    shutil.rmtree(folder)

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("rouge", help=bench_rouge.__doc__)
    p.add_argument("--n", type=int, default=52000, help="synthetic instructions to filter")
    p.add_argument("--subset", type=int, default=600, help="instructions also run the reference way")
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("train", help=bench_train.__doc__)
    p.add_argument("--config", choices=["bench", "1b"], default="bench", help="bench: dim 512, 8 layers; 1b: ~1B")
    p.add_argument("--examples", type=int, default=64, help="synthetic examples per pass (train.py: one epoch)")
    p.add_argument("--micro_batch_size", type=int, default=4, help="packed rows per forward")
    p.add_argument("--lora_rank", type=int, default=0, help="also LoRA of this rank vs full fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("sample", help=bench_sample.__doc__)
    p.add_argument("--new_tokens", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--part", choices=["all", "decode", "processes"], default="all", help="processes: sample.py --in")
    p.add_argument("--items", type=int, default=32, help="processes: eval items (seed tasks)")
    for name, repeats in (("train", 3), ("sample", 5)):  # the flags they share
        p = commands.choices[name]
        p.add_argument("--repeats", type=int, default=repeats, help="timed runs of each kind, in turns")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    args = parser.parse_args()
    {"rouge": bench_rouge, "train": bench_train, "sample": bench_sample}[args.command](args)

if __name__ == "__main__":
    main()
