"""
Benchmarks that are too slow or too noisy to be tests. Run one with `python bench.py <name> --help`.
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
    """Training throughput: our packed rows against the original recipe's padded batches, same examples."""
    import statistics
    import time

    import numpy as np
    import torch

    import train
    from train import ModelArgs, Transformer, flops_of, make_batch, measure_peak_flops, pack

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    config = {"bench": dict(dim=512, n_layers=8, n_heads=8), "1b": dict(dim=2048, n_layers=16, n_heads=16)}
    model_args = ModelArgs(**config[args.config], vocab_size=32000, max_seq_len=512)
    model = Transformer(model_args).to(dev)
    model.init_weights()
    if args.compile:
        for layer in model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")

    # Alpaca-shaped examples: a templated prompt (~40 tokens of preamble, a short instruction, an input 40% of
    # the time) and a response with a long tail, as in the 52K set (means ~80 prompt / ~70 response tokens).
    rng = np.random.default_rng(args.seed)
    examples = []
    for _ in range(args.examples):
        n_prompt = 40 + int(rng.lognormal(2.7, 0.5)) + (int(rng.lognormal(3.0, 0.8)) if rng.random() < 0.4 else 0)
        n_response = min(int(rng.lognormal(3.9, 0.8)) + 1, 512 - min(n_prompt, 256))
        ids = rng.integers(3, 32000, min(n_prompt, 256) + n_response).tolist()
        examples.append((ids, min(n_prompt, 256)))
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

    def padded():  # the original recipe's way: shuffled batches of 4 padded to the longest, logits everywhere
        for i in range(0, len(order), 4):
            batch = [examples[j] for j in order[i:i + 4]]
            length = max(len(ids) for ids, _ in batch) - 1
            tokens = torch.zeros(len(batch), length, dtype=torch.long)
            targets = torch.full((len(batch), length), -100, dtype=torch.long)
            for r, (ids, n_prompt) in enumerate(batch):
                tokens[r, :len(ids) - 1] = torch.tensor(ids[:-1])
                targets[r, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])
            tokens, targets = tokens.to(dev), targets.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                logits = model(tokens)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    useful_flops = flops_of(pack(examples, 512), examples, model_args)
    peak = measure_peak_flops(dev, torch.bfloat16)
    results = {}
    for name, run in (("packed", packed), ("padded", padded)):
        times = []
        for rep in range(args.repeats + 1):  # the first pass warms up kernels for every shape
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        results[name] = real_tokens / seconds
        print(f"{name}: {real_tokens / seconds:,.0f} real tokens/s, MFU {100 * useful_flops / seconds / peak:.1f}% "
              f"(median of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)} s)")
    print(f"peak used for MFU: {peak / 1e12:.2f} TFLOP/s ({'spec sheet' if dev.type == 'cuda' else 'measured'})")
    print(f"speedup_packed_vs_padded={results['packed'] / results['padded']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rouge = commands.add_parser("rouge", help=bench_rouge.__doc__)
    rouge.add_argument("--n", type=int, default=52000, help="synthetic instructions to filter")
    rouge.add_argument("--subset", type=int, default=600, help="instructions also run the reference way")
    rouge.add_argument("--seed", type=int, default=0)
    rouge.set_defaults(run=bench_rouge)
    train = commands.add_parser("train", help=bench_train.__doc__)
    train.add_argument("--config", choices=["bench", "1b"], default="bench", help="bench: dim 512, 8 layers; 1b: ~1B")
    train.add_argument("--examples", type=int, default=64, help="Alpaca-shaped synthetic examples per pass")
    train.add_argument("--micro_batch_size", type=int, default=4, help="packed rows per forward")
    train.add_argument("--repeats", type=int, default=3, help="timed passes (after one warm-up pass)")
    train.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    train.add_argument("--compile", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=bench_train)
    args = parser.parse_args()
    args.run(args)
