"""
Benchmarks of the recipe's scripts on this machine: too slow or too noisy to be tests.

    python bench.py rouge       # generate_instructions.py's ROUGE-L filter over 52K instructions vs the reference
    python bench.py train       # train.py's packed rows vs the original recipe's padded batches
    python bench.py sample      # sample.py's decode speed against the memory-bandwidth roofline; --in items/s
    python bench.py watermark   # watermark.py: detection rates on the tiny model (the paper's Table 2), decode overhead
"""
import argparse


def bench_rouge(args):
    """The whole ROUGE-L near-duplicate filter of generate_instructions.py over a synthetic 52K corpus."""
    import time

    import numpy as np
    from rouge_score import rouge_scorer

    from generate_instructions import RougeIndex, rouge_tokens

    # Synthetic instructions: Zipf-distributed words (so common words are shared, as in real text), log-normal
    # lengths with mean ~13 tokens and a tail to ~150, capitalized and punctuated to exercise the tokenizer.
    rng = np.random.default_rng(args.seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    lengths = np.clip(np.round(rng.lognormal(2.4, 0.6, args.n)), 4, 150).astype(int)
    lengths[rng.choice(args.n, 20, replace=False)] = rng.integers(100, 151, 20)
    words = rng.choice(vocab, lengths.sum(), p=zipf / zipf.sum())
    ends = np.cumsum(lengths)
    corpus = [" ".join(words[e - n:e]).capitalize() + rng.choice([".", "?", ":", ", please!"])
              for e, n in zip(ends, lengths)]
    print(f"corpus: {len(corpus)} instructions, {lengths.mean():.1f} tokens on average, max {lengths.max()}")

    def run_filter(texts, scores_against_kept, keep_scores=False):
        """generate_instructions.py's filter: keep a text unless its ROUGE-L to one kept before is above 0.7."""
        kept, all_scores, pairs = [], [], 0
        for text in texts:
            scores = scores_against_kept(text, kept)
            pairs += len(kept)
            if keep_scores:
                all_scores.append(scores)
            if len(kept) == 0 or scores.max() <= 0.7:
                if len(kept):  # what a kept record carries: its top-10 neighbours and the mean score
                    np.argsort(-scores, kind="stable")[:10], scores.mean()
                kept.append(text)
        return kept, all_scores, pairs

    index = RougeIndex()

    def fast(text, kept):
        while index.size < len(kept):
            index.add(kept[index.size])
        return index.scores(text)

    kept_tokens = []

    def reference(text, kept):  # the original recipe: rouge_score's _score_lcs for every pair
        while len(kept_tokens) < len(kept):
            kept_tokens.append(rouge_tokens(kept[len(kept_tokens)]))
        tokens = rouge_tokens(text)
        return np.array([rouge_scorer._score_lcs(tokens, other).fmeasure for other in kept_tokens])

    subset = corpus[:args.subset]
    start = time.perf_counter()
    ref_kept, ref_scores, ref_pairs = run_filter(subset, reference, keep_scores=True)
    ref_seconds = time.perf_counter() - start
    ref_pairs_per_s = ref_pairs / ref_seconds
    fast_kept, fast_scores, _ = run_filter(subset, fast, keep_scores=True)
    identical = fast_kept == ref_kept and all(np.array_equal(a, b) for a, b in zip(fast_scores, ref_scores))
    print(f"reference on the first {len(subset)}: {ref_pairs} pairs in {ref_seconds:.1f}s = "
          f"{ref_pairs_per_s:,.0f} pairs/s; identical decisions and scores: {identical}")

    index = RougeIndex()
    start = time.perf_counter()
    kept, _, pairs = run_filter(corpus, fast)
    seconds = time.perf_counter() - start
    reference_seconds = pairs / ref_pairs_per_s
    # Also check the full index (all its length groups and long posting lists) on a sample of pairs.
    for text in corpus[-5:]:
        sample = rng.choice(len(kept), min(2000, len(kept)), replace=False)
        tokens = rouge_tokens(text)
        expected = np.array([rouge_scorer._score_lcs(tokens, rouge_tokens(kept[i])).fmeasure for i in sample])
        identical &= bool(np.array_equal(fast(text, kept)[sample], expected))
    print(f"RougeIndex on all {len(corpus)}: {seconds:.1f}s, {len(corpus) / seconds:,.0f} instructions/s, "
          f"{pairs / seconds:,.0f} pairs/s, kept {len(kept)}")
    print(f"reference extrapolated: {reference_seconds:,.0f}s for the same {pairs} pairs")
    print(f"rouge_52k_seconds={seconds:.1f} speedup_vs_reference={reference_seconds / seconds:.0f} "
          f"identical={str(identical).lower()}")


def bench_train(args):
    """Training throughput: our packed rows against the original recipe's padded batches (on our model, and on
    Hugging Face's LlamaForCausalLM where transformers is installed), same examples; then train.py's whole process
    on those examples (start-up to the printed answers) against those padded passes, which leave out start-up and
    saving, so that ratio is a lower bound."""
    import json
    import os
    import statistics
    import subprocess
    import sys
    import tempfile
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F

    from train import (ModelArgs, Tokenizer, Transformer, ffn_hidden_dim, flops_of, format_prompt, make_batch,
                       measure_peak_flops, pack, tokenize_example, train_tokenizer)

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    config = {"bench": dict(dim=512, n_layers=8, n_heads=8), "1b": dict(dim=2048, n_layers=16, n_heads=16)}
    model_args = ModelArgs(**config[args.config], vocab_size=32000, max_seq_len=512)
    model = Transformer(model_args).to(dev)
    model.init_weights()
    folder = tempfile.mkdtemp(prefix="bench_train_")  # the same model and examples as files, for train.py
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(folder, "consolidated.00.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump({**config[args.config], "vocab_size": 32000, "multiple_of": 256, "max_seq_len": 512}, f)
    if args.compile:
        for layer in model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")

    # Alpaca-shaped examples: Alpaca's prompt around a short instruction, an input 40% of the time, and a response
    # with a long tail, as in the 52K set (means ~80 prompt / ~70 response tokens). The words are random; a
    # tokenizer trained on them makes most of them one piece.
    rng = np.random.default_rng(args.seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(1000)]
    records = []
    for _ in range(args.examples):
        n_input = int(rng.lognormal(3.0, 0.8)) if rng.random() < 0.4 else 0
        lengths = (int(rng.lognormal(2.7, 0.5)) + 1, n_input, int(rng.lognormal(3.9, 0.8)) + 1)
        records.append(dict(zip(("instruction", "input", "output"), (" ".join(rng.choice(words, n)) for n in lengths))))
    with open(os.path.join(folder, "data.json"), "w") as f:
        json.dump(records, f)
    train_tokenizer([format_prompt(r["instruction"], r["input"]) + r["output"] for r in records],
                    os.path.join(folder, "tokenizer.model"), 4000)
    tokenizer = Tokenizer(os.path.join(folder, "tokenizer.model"))
    examples = [tokenize_example(tokenizer, r, 512, {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0})
                for r in records]
    real_tokens = sum(len(ids) - 1 for ids, _ in examples)
    print(f"{args.examples} examples, {real_tokens / args.examples:.0f} tokens each on average "
          f"({sum(n for _, n in examples) / args.examples:.0f} prompt); model {args.config}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {dev.type}, bf16 autocast")

    def packed():  # train.py's way: rows of 512, examples kept apart by the mask, output layer on responses only
        rows = pack(examples, 512)
        for i in range(0, len(rows), args.micro_batch_size):
            tokens, targets, positions, mask = make_batch(rows[i:i + args.micro_batch_size], examples, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(tokens, positions, mask, targets)
            loss.backward()

    order = rng.permutation(len(examples))

    def padded_batches():  # the original recipe's way: shuffled batches of 4 padded to the longest
        for i in range(0, len(order), 4):
            batch = [examples[j] for j in order[i:i + 4]]
            length = max(len(ids) for ids, _ in batch)
            tokens = torch.zeros(len(batch), length, dtype=torch.long)
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            attention = torch.zeros(len(batch), length, dtype=torch.long)  # Hugging Face's padding mask
            for r, (ids, n_prompt) in enumerate(batch):
                tokens[r, :len(ids)] = torch.tensor(ids)
                labels[r, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
                attention[r, :len(ids)] = 1
            yield tokens.to(dev), labels.to(dev), attention.to(dev)

    def padded():  # ... on our model, logits everywhere
        for tokens, labels, _ in padded_batches():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten()).backward()

    runs = {"packed": (packed, optimizer), "padded": (padded, optimizer)}
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: no Hugging Face path")
    else:
        hf = LlamaForCausalLM(LlamaConfig(
            hidden_size=model_args.dim, num_hidden_layers=model_args.n_layers, num_attention_heads=model_args.n_heads,
            intermediate_size=ffn_hidden_dim(model_args), vocab_size=32000, max_position_embeddings=512)).to(dev)

        def hugging_face():  # ... on Hugging Face's LLaMA, as Alpaca's train.py ran it (Trainer, bf16)
            for tokens, labels, attention in padded_batches():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = hf(input_ids=tokens, attention_mask=attention, labels=labels).loss
                loss.backward()
        runs["hugging_face"] = (hugging_face, torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=dev.type == "cuda"))

    def whole_process():  # train.py from start-up to its printed answers, on the same model and examples
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                   f"--init={folder}", f"--data={folder}/data.json", "--epochs=1", f"--out_dir={folder}/out",
                   f"--device={args.device}"] + ["--compile"] * args.compile
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"train.py failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        whole_process.summary = result.stdout.strip().splitlines()[-1]

    def timed_step(run, optimizer):  # one optimizer step of run()'s gradients, in seconds
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    useful_flops = flops_of(pack(examples, 512), examples, model_args)
    peak = measure_peak_flops(dev, torch.bfloat16)
    times = {name: [] for name in [*runs, "whole_process"]}
    for rep in range(args.repeats + 1):  # in turns, so a busy moment slows all alike; pass 0 warms up kernels
        for name, (run, opt) in runs.items():
            seconds = timed_step(run, opt)
            if rep:
                times[name].append(seconds)
        if rep:
            t0 = time.perf_counter()
            whole_process()
            times["whole_process"].append(time.perf_counter() - t0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    for name in runs:
        print(f"{name}: {real_tokens / seconds[name]:,.0f} real tokens/s, MFU "
              f"{100 * useful_flops / seconds[name] / peak:.1f}% (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in times[name])} s)")
    print(f"whole process (python train.py --init=... --data=... --epochs=1): {seconds['whole_process']:.1f} s (median "
          f"of {args.repeats}: {', '.join(f'{t:.1f}' for t in times['whole_process'])} s); {whole_process.summary}")
    print(f"peak used for MFU: {peak / 1e12:.2f} TFLOP/s ({'spec sheet' if dev.type == 'cuda' else 'measured'})")
    print(f"speedup_packed_vs_padded={seconds['padded'] / seconds['packed']:.2f}")
    for name in [name for name in runs if name != "packed"]:  # the baseline's steps alone vs our whole process
        print(f"speedup_whole_process_vs_{name}={seconds[name] / seconds['whole_process']:.2f}")

    if args.lora_rank:  # LoRA (train.py's defaults but the rank) next to full fine-tuning, on the same packed passes
        import ctypes
        import gc

        import train

        def reset_peak_memory():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            else:  # hand freed memory back to the OS, then restart the peak resident set (Linux's clear_refs)
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")

        def peak_memory():
            if dev.type == "cuda":
                return torch.cuda.max_memory_allocated(dev)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

        figures = {}
        for name in ("full", "lora"):
            if name == "lora":  # as train.py: the frozen model in the compute dtype (bf16), fp32 adapters and Adam
                del optimizer
                gc.collect()
                model.to(torch.bfloat16)
                model.load_state_dict(train.add_lora(model, args.lora_rank, train.lora_alpha, train.lora_dropout,
                                                     train.lora_targets.split(","), args.seed), strict=False)
                model.to(dev)
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                              fused=dev.type == "cuda")
            reset_peak_memory()
            times = []
            for rep in range(args.repeats + 1):
                seconds = timed_step(packed, optimizer)
                if rep:
                    times.append(seconds)
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
            figures[name] = real_tokens / statistics.median(times), peak_memory()
            print(f"{name if name == 'full' else f'LoRA rank {args.lora_rank} ({train.lora_targets})'}: "
                  f"{figures[name][0]:,.0f} real tokens/s, peak memory {figures[name][1] / 2**30:.2f} GiB "
                  f"({'max_memory_allocated' if dev.type == 'cuda' else 'RSS'}), {n_trainable / 1e6:.2f}M trainable "
                  f"parameters, optimizer state {state_bytes / 2**20:.1f} MiB")
        print(f"lora_vs_full_tokens_per_s={figures['lora'][0] / figures['full'][0]:.2f} "
              f"lora_vs_full_peak_memory={figures['lora'][1] / figures['full'][1]:.2f}")


def bench_sample_processes(args):
    """sample.py --in as a user runs it, timed as whole processes (start-up, loading, tokenizing and writing
    included): items/s with one process and with torchrun's two, on the bench model with random weights (so every
    answer runs to --new_tokens) and the first --items instances of seed_tasks.jsonl."""
    import dataclasses
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    import torch

    from train import ModelArgs, Transformer, read_examples, train_tokenizer

    folder = tempfile.mkdtemp(prefix="bench_sample_")
    examples = read_examples("seed_tasks.jsonl")
    train_tokenizer([e["instruction"] + e["input"] + e["output"] for e in examples], f"{folder}/tokenizer.model",
                    vocab_size=2000)  # the model's 32000 ids past the tokenizer's are banned, as for padded vocabularies
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024))
    model.init_weights()
    with open(f"{folder}/params.json", "w") as f:
        json.dump(dataclasses.asdict(model.args), f)
    torch.save(model.state_dict(), f"{folder}/consolidated.00.pth")
    with open(f"{folder}/eval.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples[:args.items])
    common = ["sample.py", f"--checkpoint={folder}", f"--in={folder}/eval.jsonl", f"--out={folder}/out.json",
              f"--max_new_tokens={args.new_tokens}", "--temperature=0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {"1 process": ([sys.executable], {}),
            "1 process, 1 thread": ([sys.executable], {"OMP_NUM_THREADS": "1"}),
            "2 processes (torchrun, 1 thread each)": ([*torchrun, "--nproc_per_node=2"], {})}
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, (launcher, env) in runs.items():  # in turns, so a busy moment slows all alike
            for ext in (".json", ".jsonl"):
                if os.path.exists(f"{folder}/out{ext}"):
                    os.remove(f"{folder}/out{ext}")
            start = time.perf_counter()
            subprocess.run([*launcher, *common], check=True, capture_output=True, env={**os.environ, **env})
            times[name].append(time.perf_counter() - start)
            outputs[name] = open(f"{folder}/out.jsonl", "rb").read()
    print(f"sample.py --in: {args.items} items x {args.new_tokens} new tokens (greedy, batch 16), whole process, "
          f"median of {args.repeats} runs taken in turns")
    for name, t in times.items():
        median = sorted(t)[len(t) // 2]
        same = "same outputs" if outputs[name] == outputs["1 process"] else "OUTPUTS DIFFER from 1 process"
        print(f"  {name:40s} {args.items / median:6.2f} items/s ({median:.1f} s; {same})", flush=True)
    shutil.rmtree(folder)


def bench_sample(args):
    """Decode tokens/s of sample.generate at batch 1 and 16, in bf16 and fp32, against the roofline for batch 1:
    each decode step reads every weight once (the embedding only one row), so tokens/s cannot beat
    measured memory bandwidth / bytes of weights. Then (or only, --part=processes) bench_sample_processes."""
    if args.part != "decode":
        bench_sample_processes(args)
    if args.part == "processes":
        return
    import time

    import torch

    from sample import generate
    from train import ModelArgs, Transformer

    device = args.device
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def median_times(runs, repeats):
        # Runs take turns, so a busy moment on a shared machine slows all of them alike.
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and not cuda:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True  # as sample.py --compile does on CPU
    print(f"device {device}, {torch.get_num_threads()} threads, {args.new_tokens} decode steps per run, "
          f"median of {args.repeats} runs" + (", compiled" if args.compile else ""))

    configs = [("bench", dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000), ["bfloat16", "float32"])]
    if cuda:
        configs.append(("7B", dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000), ["bfloat16"]))
    steps = args.new_tokens
    for name, shape, dtypes in configs:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(0)
            with torch.device(device):
                model = Transformer(ModelArgs(**shape, max_seq_len=1024))
            model.init_weights()
            model = model.to(dtype).eval()
            weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                               if n != "tok_embeddings.weight")
            if args.compile:
                model = torch.compile(model, dynamic=True)
            # Summing a buffer as large as the weights reads it as a decode step reads them: from DRAM, or from
            # a cache that holds it (this machine's L3 holds the bench model). It is timed in turns with decoding.
            buffer = torch.ones(min(weight_bytes, 2**30) // 4, device=device)
            print(f"{name} model, {dtype_name}: {weight_bytes / 1e6:.0f} MB of weights read per step", flush=True)
            for batch in (1, 16):
                prompts = [[1 + (i * 7 + j) % 31000 for j in range(args.prompt_len)] for i in range(batch)]

                def run(n, processor=None):
                    return lambda: generate(model, prompts, n, temperature=0, logits_processor=processor)

                run(steps)()  # warm up kernels and allocator
                # Decode time alone: a run of 1 + steps tokens minus a run of 1 token (prefill and first sample).
                # A logits processor of the watermark's call shape that does nothing gives the hook's own cost.
                runs = {"prefill": run(1), "decode": run(1 + steps)}
                if batch == 1:
                    runs["hooked"] = run(1 + steps, lambda prev_tokens, logits: logits)
                    runs["read"] = buffer.sum
                t = median_times(runs, args.repeats)
                decode = t["decode"] - t["prefill"]
                tokens_per_s = batch * steps / decode
                line = f"  batch {batch:2d}: {tokens_per_s:8.1f} tokens/s ({1e3 * decode / steps:.2f} ms/step)"
                if batch == 1:
                    bandwidth = buffer.numel() * 4 / t["read"]
                    roofline = bandwidth / weight_bytes
                    line += (f"; bandwidth {bandwidth / 1e9:.1f} GB/s, roofline {roofline:.0f} tokens/s, reached "
                             f"{100 * tokens_per_s / roofline:.0f}%; a no-op logits hook adds "
                             f"{1e3 * (t['hooked'] - t['decode']) / steps:+.3f} ms/step")
                print(line, flush=True)
            del model, buffer


def bench_watermark(args):
    """Table 2 of the watermark paper on the tiny model: how often watermarked text is detected at z > 4 for
    several gamma and delta; how often the same model's plain text and human text are flagged, over many keys and
    both countings; then the watermark's cost on batch-1 decode of the bench model (dim 512, 8 layers, vocab
    32000)."""
    import math
    import os
    import time

    import numpy as np
    import torch

    import train
    import watermark as wm
    from sample import generate
    from train import ModelArgs, Tokenizer, Transformer, format_prompt, read_examples

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, key {args.key}, z threshold 4")

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    if args.part in ("all", "table"):
        tokenizer = Tokenizer(os.path.join(args.checkpoint, "tokenizer.model"))
        model = Transformer.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        vocab = model.args.vocab_size
        examples = read_examples(args.data)
        # train.py's held-out split (its default seed and val_fraction), so "unseen" prompts really are unseen.
        order = np.random.default_rng(train.seed).permutation(len(examples))
        n_val = min(len(examples) - 1, max(1, round(train.val_fraction * len(examples))))
        held_out, seen = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
        # The tiny model has memorised its training answers: on seen instructions it is nearly deterministic (low
        # entropy), and a watermark can only move text where the model hesitates. Unseen prompts show the other
        # case; as only a few tasks are held out, more are spliced from two seen instructions (the first half of
        # one's words, the second half of the other's, with the second one's input).
        rng = np.random.default_rng(args.seed)
        unseen = list(held_out)
        while len(unseen) < args.prompts:
            a, b = (seen[i] for i in rng.choice(len(seen), 2, replace=False))
            wa, wb = a["instruction"].split(), b["instruction"].split()
            unseen.append({"instruction": " ".join(wa[:len(wa) // 2] + wb[len(wb) // 2:]), "input": b["input"]})
        prompt_sets = {"seen": seen[:args.prompts], "unseen": unseen[:args.prompts]}
        ending = "stopping at EOS" if args.stop_at_eos else "EOS banned (the paper has T = 200 +- 5)"
        print(f"{args.checkpoint}: vocab {vocab}; {len(prompt_sets['seen'])} seen prompts, {n_val} held-out + "
              f"{len(unseen) - n_val} spliced unseen prompts; multinomial sampling at temperature "
              f"{args.temperature}, {args.max_new_tokens} new tokens, {ending}", flush=True)

        def sample_texts(prompts, scheme, gamma, delta):
            """Generated ids for each prompt, and the mean entropy and spike entropy (Theorem 4.2) of the
            distributions they were sampled from, taken before the watermark changes them."""
            watermark = wm.WatermarkProcessor(vocab, gamma, delta, scheme, args.key) if delta else None
            alpha = math.exp(delta / args.temperature)  # the watermark adds delta before the temperature divides
            modulus = (1 - gamma) * (alpha - 1) / (1 + (alpha - 1) * gamma)
            entropy, spike, outputs = [], [], []
            for start in range(0, len(prompts), args.batch_size):
                batch = [tokenizer.encode(format_prompt(e["instruction"], e["input"]), bos=True)
                         for e in prompts[start:start + args.batch_size]]
                finished = set()

                def process(history, logits):
                    logits[:, tokenizer.vocab_size:] = float("-inf")
                    if not args.stop_at_eos:
                        logits[:, tokenizer.eos_id] = float("-inf")
                    probs = torch.softmax(logits.float() / args.temperature, dim=-1)
                    for row, ids in enumerate(history):
                        if ids[-1] == tokenizer.eos_id and len(ids) > len(batch[row]):
                            finished.add(row)
                    live = [row for row in range(len(history)) if row not in finished]
                    p = probs[live]
                    entropy.extend((-(p * p.clamp_min(1e-30).log()).sum(-1)).tolist())
                    spike.extend((p / (1 + modulus * p)).sum(-1).tolist())
                    return logits if watermark is None else watermark(history, logits)

                seeds = [args.seed + start + i for i in range(len(batch))]
                outputs += generate(model, batch, args.max_new_tokens, args.temperature, 0, 1.0, seeds, process,
                                    tokenizer.eos_id if args.stop_at_eos else None)
            return outputs, mean(entropy), mean(spike), alpha

        def score(texts, scheme, gamma, key=args.key, counting="pairs"):
            results = [wm.detect(ids, vocab, gamma, scheme, key, counting=counting) if ids else None for ids in texts]
            return {"T": mean([len(ids) for ids in texts]), "zs": [r["z_score"] for r in results if r],
                    "scored": mean([r["num_tokens_scored"] if r else 0 for r in results]),
                    "z": mean([r and r["z_score"] for r in results]),
                    "flagged": mean([bool(r and r["prediction"]) for r in results]),
                    "hits": sum(bool(r and r["prediction"]) for r in results),
                    "green": mean([r and r["green_fraction"] for r in results])}

        settings = [("lefthash", gamma, delta) for gamma in args.gammas for delta in args.deltas]
        settings += [("selfhash", gamma, delta) for gamma, delta in args.selfhash]
        rows, unwatermarked = [], {"human": [tokenizer.encode(e["output"]) for e in examples]}
        start_time = time.perf_counter()
        for set_name, prompts in prompt_sets.items():
            unwatermarked[set_name], plain_entropy, _, _ = sample_texts(prompts, "lefthash", 0.25, 0)
            for scheme, gamma, delta in settings:
                texts, entropy, spike, alpha = sample_texts(prompts, scheme, gamma, delta)
                stats = score(texts, scheme, gamma)
                # Theorem 4.2: the expected green fraction is at least gamma alpha S / (1 + (alpha - 1) gamma).
                bound = gamma * alpha * spike / (1 + (alpha - 1) * gamma)
                rows.append((set_name, scheme, gamma, delta, stats, entropy, bound))
                print(f"  {set_name} {scheme} gamma {gamma} delta {delta}: z {stats['z']:.1f}, "
                      f"{time.perf_counter() - start_time:.0f}s", flush=True)
            print(f"  {set_name}, no watermark: mean entropy {plain_entropy:.2f} nats", flush=True)
        print("\n| prompts | scheme | gamma | delta | T | T scored | z mean | TPR z>4 | green fraction | "
              "bound (Thm 4.2) | entropy |")
        print("|---" * 11 + "|")
        for set_name, scheme, gamma, delta, s, entropy, bound in rows:
            print(f"| {set_name} | {scheme} | {gamma} | {delta:g} | {s['T']:.0f} | {s['scored']:.0f} | {s['z']:.1f} | "
                  f"{s['flagged']:.2f} | {s['green']:.2f} | {bound:.2f} | {entropy:.2f} |")
        print(f"table: {time.perf_counter() - start_time:.0f}s\n", flush=True)
        del model

        # False positives: the unwatermarked texts (the model's plain samples and the human seed outputs) scored
        # under many random keys, with each counting. The z-test promises P(z > 4) = 3.2e-5 and z with mean 0
        # and SD 1 (at most: repeats skipped make it smaller); one key's verdicts on the same texts are not
        # independent, so many keys are needed to see the rate.
        keys = [int(k) for k in np.random.default_rng(args.seed).integers(1, 2**62, args.fpr_keys)]
        print("| scheme | gamma | counting | keys | " + " | ".join(
            f"FPR z>4 {name} (T, z mean, z SD)" for name in unwatermarked) + " |")
        print("|---" * (4 + len(unwatermarked)) + "|")
        for scheme, gamma in dict.fromkeys((scheme, gamma) for scheme, gamma, _ in settings):
            for counting in ("pairs", "ngrams"):
                cells = []
                for texts in unwatermarked.values():
                    runs = [score(texts, scheme, gamma, key, counting) for key in keys]
                    zs = np.array([z for r in runs for z in r["zs"] if z is not None])  # None: nothing scored
                    cells.append(f"{sum(r['hits'] for r in runs)}/{len(texts) * len(keys)} ({runs[0]['T']:.0f}, "
                                 f"{zs.mean():.2f}, {zs.std():.2f})")
                print(f"| {scheme} | {gamma} | {counting} | {len(keys)} | " + " | ".join(cells) + " |", flush=True)
        print(f"table and false positives: {time.perf_counter() - start_time:.0f}s\n", flush=True)

    if args.part in ("all", "overhead"):
        # Decode cost of the watermark at batch 1, the case where its per-row Python work weighs most. The runs
        # take turns (plain, cold, warm) so machine load hits all alike. Sampling at temperature 1 from random
        # weights picks a new previous token at almost every step, so a cold green-list cache (cleared before the
        # run) misses almost always: the worst case. Warm reruns the same tokens with every list cached.
        worst = 0.0
        for dtype_name in ("float32", "bfloat16"):
            torch.manual_seed(0)
            model = Transformer(ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024))
            model.init_weights()
            model = model.to(getattr(torch, dtype_name)).eval()
            prompt = [[1 + (7 * j) % 31000 for j in range(32)]]

            def decode(n, watermarked=False, cold=False):
                if cold:
                    wm.lefthash_mask.cache_clear()
                processor = wm.WatermarkProcessor(32000, 0.25, 2.0, "lefthash", args.key) if watermarked else None
                return lambda: generate(model, [list(p) for p in prompt], n, 1.0, 0, 1.0, 0, processor)

            runs = {"prefill": (1, False, False), "plain": (1 + args.new_tokens, False, False),
                    "cold": (1 + args.new_tokens, True, True), "warm": (1 + args.new_tokens, True, False)}
            decode(1 + args.new_tokens)()  # warm up kernels and allocator
            times = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, (n, watermarked, cold) in runs.items():
                    run = decode(n, watermarked, cold)
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            t = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
            step = (t["plain"] - t["prefill"]) / args.new_tokens
            cold, warm = ((t[k] - t["plain"]) / args.new_tokens for k in ("cold", "warm"))
            worst = max(worst, cold / step)
            print(f"{dtype_name}: plain decode {1e3 * step:.2f} ms/step; watermark adds {1e3 * cold:+.3f} ms/step "
                  f"({100 * cold / step:+.1f}%) with a cold green-list cache, {1e3 * warm:+.3f} ms/step "
                  f"({100 * warm / step:+.1f}%) warm (medians of {args.repeats}, {args.new_tokens} steps)",
                  flush=True)
            del model
        print(f"watermark_overhead_batch1={100 * worst:.1f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rouge_parser = commands.add_parser("rouge", help=bench_rouge.__doc__)
    rouge_parser.add_argument("--n", type=int, default=52000, help="synthetic instructions to filter")
    rouge_parser.add_argument("--subset", type=int, default=600, help="instructions also run the reference way")
    rouge_parser.add_argument("--seed", type=int, default=0)
    rouge_parser.set_defaults(run=bench_rouge)
    train_parser = commands.add_parser("train", help=bench_train.__doc__)
    train_parser.add_argument("--config", choices=["bench", "1b"], default="bench", help="bench: dim 512, 8 layers; 1b: ~1B")
    train_parser.add_argument("--examples", type=int, default=64, help="Alpaca-shaped synthetic examples per pass "
                              "(the whole process: one epoch of them)")
    train_parser.add_argument("--micro_batch_size", type=int, default=4, help="packed rows per forward")
    train_parser.add_argument("--repeats", type=int, default=3, help="timed passes (after one warm-up pass)")
    train_parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    train_parser.add_argument("--compile", action="store_true")
    train_parser.add_argument("--lora_rank", type=int, default=0, help="also LoRA of this rank vs full fine-tuning")
    train_parser.add_argument("--seed", type=int, default=0)
    train_parser.set_defaults(run=bench_train)
    sample_parser = commands.add_parser("sample", help="decode tokens/s vs the memory-bandwidth roofline")
    sample_parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    sample_parser.add_argument("--new_tokens", type=int, default=64, help="decode steps timed per run")
    sample_parser.add_argument("--prompt_len", type=int, default=32)
    sample_parser.add_argument("--repeats", type=int, default=5)
    sample_parser.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    sample_parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sample_parser.add_argument("--part", choices=["all", "decode", "processes"], default="all",
                               help="processes: sample.py --in items/s with 1 and 2 processes")
    sample_parser.add_argument("--items", type=int, default=32, help="processes: eval items (seed tasks)")
    sample_parser.set_defaults(run=bench_sample)
    wm_parser = commands.add_parser("watermark", help="detection rates (the paper's Table 2) and decode overhead")
    wm_parser.add_argument("--part", choices=["all", "table", "overhead"], default="all")
    wm_parser.add_argument("--checkpoint", default="out/tiny", help="the model that writes (python train.py)")
    wm_parser.add_argument("--data", default="seed_tasks.jsonl", help="its training data: prompts and human text")
    wm_parser.add_argument("--prompts", type=int, default=64, help="prompts per set (seen and unseen)")
    wm_parser.add_argument("--gammas", type=float, nargs="+", default=[0.25, 0.5])
    wm_parser.add_argument("--deltas", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    wm_parser.add_argument("--selfhash", type=lambda s: tuple(map(float, s.split(","))), nargs="*",
                           default=[(0.25, 2.0)], help="gamma,delta pairs also run with selfhash")
    wm_parser.add_argument("--max_new_tokens", type=int, default=200)
    wm_parser.add_argument("--temperature", type=float, default=0.7, help="sample.py's default; top_p is 1")
    wm_parser.add_argument("--stop_at_eos", action="store_true", help="end texts at EOS (default: ban EOS)")
    wm_parser.add_argument("--batch_size", type=int, default=32)
    wm_parser.add_argument("--key", type=int, default=2**31 - 1,
                           help="any key measures the same; the public default would print a warning per run")
    wm_parser.add_argument("--fpr_keys", type=int, default=20, help="random keys each unwatermarked text is "
                           "scored with for the false-positive table")
    wm_parser.add_argument("--new_tokens", type=int, default=64, help="overhead: decode steps timed per run")
    wm_parser.add_argument("--repeats", type=int, default=5, help="overhead: runs of each kind, in turns")
    wm_parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); one is "
                           "7x faster than two for the tiny model on a busy 2-core machine")
    wm_parser.add_argument("--seed", type=int, default=1337)
    wm_parser.set_defaults(run=bench_watermark)
    args = parser.parse_args()
    args.run(args)
