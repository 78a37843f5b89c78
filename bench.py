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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rouge = commands.add_parser("rouge", help=bench_rouge.__doc__)
    rouge.add_argument("--n", type=int, default=52000, help="synthetic instructions to filter")
    rouge.add_argument("--subset", type=int, default=600, help="instructions also run the reference way")
    rouge.add_argument("--seed", type=int, default=0)
    rouge.set_defaults(run=bench_rouge)
    args = parser.parse_args()
    args.run(args)
