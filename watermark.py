"""
The green-list watermark of Kirchenbauer et al. (2023), "A Watermark for Large Language Models".

While sampling, the previous token(s) and a private integer key seed a random generator that splits the vocabulary
into a "green" fraction gamma and a "red" rest; green logits get +delta, so watermarked text holds more green tokens
than chance. Anyone with the key counts green tokens and runs a one-sided z-test; no model is needed to detect.

    sample.py --watermark                     embeds it (sample.py imports WatermarkProcessor from here)
    python watermark.py detect --tokenizer=tokenizer.model --text="..."
    python watermark.py detect --tokenizer=tokenizer.model --in=outputs.jsonl --field=output --json
    python watermark.py detect --vocab_size=32000 --ids="12 873 5 ..." --window

Green lists are bit-for-bit those of the reference code (github.com/jwkirchenbauer/lm-watermarking) and, for
lefthash, of Hugging Face's WatermarkLogitsProcessor when it runs on the CPU, so detectors are interchangeable.
"""
import argparse
import functools
import hashlib
import json
import math
import sys

import numpy as np
import torch

DEFAULT_KEY = 15485863  # the paper's key: it is public, so anyone can detect AND forge text made with it
DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
DEFAULT_Z_THRESHOLD = 4.0

# h in the paper: how many tokens the seed reads. lefthash reads the previous token. selfhash reads the 3 previous
# tokens plus the candidate token itself (the reference's "algorithm-3" = ff-anchored_minhash_prf-4-True-15485863).
CONTEXT_WIDTH = {"lefthash": 1, "selfhash": 4}
SELF_SALTED = {"lefthash": False, "selfhash": True}
# At generation, selfhash tests only the top candidates: the reference tests 41 (its loop breaks after index 40;
# Hugging Face tests 40). Only the generation side depends on this; detection does not.
SELFHASH_CANDIDATES = 41
# selfhash hashes token ids through a fixed random permutation table; the reference seeds it with this prime.
MINHASH_TABLE_SIZE = 1_000_003
MINHASH_TABLE_SEED = 2971215073


def check_params(vocab_size, gamma, scheme, key):
    if scheme not in CONTEXT_WIDTH:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(CONTEXT_WIDTH)}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must lie strictly between 0 and 1, got {gamma}")
    if int(vocab_size * gamma) < 1:
        raise ValueError(f"gamma={gamma} gives an empty green list for vocab_size={vocab_size}")
    if not isinstance(key, int) or not 0 < key < 2**63:
        raise ValueError(f"key must be an integer in [1, 2**63), got {key!r}")


def key_fingerprint(key):
    # Recorded with outputs instead of the key, so the detector can tell "wrong key" from "no watermark". It protects
    # nothing: a small key is found by trying them all, so use a large random one (secrets.randbelow(2**62)).
    return hashlib.sha256(f"watermark-key:{key}".encode()).hexdigest()[:12]


def lefthash_seed(prev_token, key):
    # The paper's Algorithm 2 ("simple_1"): key x previous token. The reference and Hugging Face take it modulo
    # 2**64 - 1 so it fits torch's manual_seed; the oldest reference omits the modulo and agrees whenever the product
    # is below 2**64 - 1 (always, for the default key and any real vocabulary).
    return (key * prev_token) % (2**64 - 1)


@functools.lru_cache(maxsize=1)
def minhash_table():
    generator = torch.Generator(device="cpu")
    generator.manual_seed(MINHASH_TABLE_SEED)
    return torch.randperm(MINHASH_TABLE_SIZE, generator=generator).numpy()


def selfhash_seed(window, key):
    # The reference's anchored min-hash over the 4 tokens [t-3, t-2, t-1, candidate]: each token's hash times the
    # candidate's hash times the key, in torch int64 arithmetic (it overflows and wraps, which we mimic), then the
    # minimum. Taking the minimum keeps the seed unchanged when one context token is edited, which is the robustness
    # Algorithm 3 is after; including the candidate is the "self-salting" that makes the list hard to learn.
    table = minhash_table()
    anchor = int(table[window[-1] % MINHASH_TABLE_SIZE]) + 1
    products = []
    for token in window:
        product = key * (int(table[token % MINHASH_TABLE_SIZE]) + 1) * anchor
        products.append((product + 2**63) % 2**64 - 2**63)
    return min(products) % (2**64 - 1)


def green_ids(seed, vocab_size, gamma):
    # Always a CPU generator: CUDA's randperm gives different numbers for the same seed, so a green list drawn on
    # the model's device would make detection depend on where the model ran (the reference has this flaw).
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)]


def green_list(context, vocab_size, gamma=DEFAULT_GAMMA, scheme="lefthash", key=DEFAULT_KEY):
    """Green token ids (CPU LongTensor) for the tokens the seed reads: for lefthash `context` ends with the previous
    token; for selfhash it is [t-3, t-2, t-1, candidate] and the list is only used to ask "is the candidate green?"."""
    width = CONTEXT_WIDTH[scheme]
    if len(context) < width:
        raise ValueError(f"{scheme} needs {width} tokens of context, got {len(context)}")
    if scheme == "lefthash":
        return green_ids(lefthash_seed(context[-1], key), vocab_size, gamma)
    return green_ids(selfhash_seed(list(context[-width:]), key), vocab_size, gamma)


@functools.lru_cache(maxsize=2048)
def lefthash_mask(prev_token, vocab_size, gamma, key):
    # Cached per previous token: the permutation costs ~0.3 ms (vocab 32000), more than the rest of a watermarked
    # decode step. Masks take vocab_size bytes each (64 MB at most here for a 32000 vocabulary).
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    return mask.index_fill_(0, green_ids(lefthash_seed(prev_token, key), vocab_size, gamma), True)


@functools.lru_cache(maxsize=2**16)
def selfhash_is_green(window, vocab_size, gamma, key):
    return bool((green_ids(selfhash_seed(window, key), vocab_size, gamma) == window[-1]).any())


def is_green(ngram, vocab_size, gamma, scheme, key):
    """Whether ngram[-1] is green after ngram[:-1]; ngram holds h + 1 tokens (lefthash) or h tokens (selfhash)."""
    if scheme == "lefthash":
        return bool(lefthash_mask(ngram[-2], vocab_size, gamma, key)[ngram[-1]])
    return selfhash_is_green(tuple(ngram), vocab_size, gamma, key)


def top_candidates(row_logits, k):
    # The k highest logits, ties at the cut broken towards the lower id so every device and dtype picks the same set
    # (the reference's unstable sort leaves this open; order inside the set does not matter).
    row = row_logits.detach().float().cpu()
    k = min(k, row.numel())
    kth = row.topk(k).values[-1]
    above = (row > kth).nonzero().flatten().tolist()
    tied = (row == kth).nonzero().flatten().tolist()
    return above + tied[: k - len(above)]


class WatermarkProcessor:
    """Adds delta to the green logits of each row. Call it on the raw next-token logits, before temperature, top-p
    or sampling: proc(prev_tokens, logits), prev_tokens being each row's full token history (prompt + generated).
    Rows with too little history (no previous token; fewer than 3 for selfhash) are left alone, as the reference
    does; those positions are not scored at detection either."""

    def __init__(self, vocab_size, gamma=DEFAULT_GAMMA, delta=DEFAULT_DELTA, scheme="lefthash", key=DEFAULT_KEY):
        check_params(vocab_size, gamma, scheme, key)
        if not math.isfinite(delta):
            raise ValueError(f"delta must be finite, got {delta}")
        if key == DEFAULT_KEY:
            print(f"WARNING: watermarking with the default key {DEFAULT_KEY}, which is public: anyone can detect "
                  "this watermark and forge it. Pass your own secret --key.", file=sys.stderr)
        self.vocab_size, self.gamma, self.delta, self.scheme, self.key = vocab_size, gamma, delta, scheme, key
        self.context_width = CONTEXT_WIDTH[scheme]
        # Recorded in every output line. The key itself is secret, so only its fingerprint is written.
        self.params = {"scheme": scheme, "gamma": gamma, "delta": delta, "vocab_size": vocab_size,
                       "context_width": self.context_width, "key_fingerprint": key_fingerprint(key)}
        self._mask_on_device = functools.lru_cache(maxsize=2048)(
            lambda prev, device: lefthash_mask(prev, vocab_size, gamma, key).to(device))

    def green_candidates(self, history, row_logits):
        """selfhash: the top candidates c that are green under the seed of (last 3 tokens, c) — Algorithm 3."""
        context = [int(t) for t in history[-(self.context_width - 1):]]
        return [c for c in top_candidates(row_logits, SELFHASH_CANDIDATES)
                if selfhash_is_green(tuple(context + [c]), self.vocab_size, self.gamma, self.key)]

    def __call__(self, prev_tokens, logits):
        if logits.dim() != 2 or logits.shape[0] != len(prev_tokens):
            raise ValueError(f"logits must be (batch, vocab) with one history per row; got {tuple(logits.shape)} "
                             f"and {len(prev_tokens)} histories")
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} entries but the watermark was set up for vocab_size="
                             f"{self.vocab_size}; vocab_size must be the model's logits dimension")
        needed = self.context_width - SELF_SALTED[self.scheme]
        for row, history in enumerate(prev_tokens):
            if len(history) < needed:
                continue
            if self.scheme == "lefthash":
                logits[row].add_(self._mask_on_device(int(history[-1]), logits.device), alpha=self.delta)
            else:
                ids = self.green_candidates(history, logits[row])
                if ids:
                    logits[row, torch.tensor(ids, device=logits.device)] += self.delta
        return logits


def normal_p_value(z):
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_p_value(green, total, gamma):
    """P(X >= green) for X ~ Binomial(total, gamma), summed in log space (exact where the z-test is approximate,
    which matters for short texts)."""
    if green <= 0:
        return 1.0
    if green > total:
        return 0.0
    log_terms = [math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1)
                 + k * math.log(gamma) + (total - k) * math.log1p(-gamma) for k in range(green, total + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def z_score(green, total, gamma):
    return (green - gamma * total) / math.sqrt(total * gamma * (1 - gamma))


# What counts once (repeats are not independent evidence and inflate z on repetitive unwatermarked text):
# "pairs", each (seed, token) once: independent coin flips, so the z-test keeps its stated false-positive rate;
# "ngrams", each (context, token) n-gram once, the reference's ignore_repeated_ngrams=True; "all", the reference's
# and HF's default. For lefthash pairs and ngrams agree. For selfhash they don't: a quarter of windows take their
# seed from the candidate alone, so one (seed, token) recurs under many 4-grams, and ngrams over-flags.
COUNTINGS = ("pairs", "ngrams", "all")


def seed_of(ngram, scheme, key):
    return lefthash_seed(ngram[-2], key) if scheme == "lefthash" else selfhash_seed(list(ngram), key)


def score_tokens(token_ids, vocab_size, gamma, scheme, key, counting="pairs"):
    """Green/red for each scored token: (positions, greens). The first h tokens (h - 1 for selfhash) lack context;
    repeats are skipped as `counting` says (see COUNTINGS)."""
    if counting not in COUNTINGS:
        raise ValueError(f"unknown counting {counting!r}; choose one of {', '.join(COUNTINGS)}")
    n = CONTEXT_WIDTH[scheme] + 1 - SELF_SALTED[scheme]
    positions, greens, seen = [], [], set()
    for end in range(n, len(token_ids) + 1):
        ngram = tuple(token_ids[end - n:end])
        if counting != "all":
            unit = ngram if counting == "ngrams" else (seed_of(ngram, scheme, key), ngram[-1])
            if unit in seen:
                continue
            seen.add(unit)
        positions.append(end - 1)
        greens.append(is_green(ngram, vocab_size, gamma, scheme, key))
    return positions, greens


def best_window(greens, gamma, min_size):
    """Max-z window over all sizes >= min_size and all positions: (z, start, end, number of windows searched)."""
    cumulative = np.concatenate([[0], np.cumsum(np.asarray(greens, dtype=np.int64))])
    best, searched = (-math.inf, 0, 0), 0
    for size in range(min_size, len(greens) + 1):
        counts = cumulative[size:] - cumulative[:-size]
        z = (counts - gamma * size) / math.sqrt(size * gamma * (1 - gamma))
        i = int(z.argmax())
        if z[i] > best[0]:
            best = (float(z[i]), i, i + size)
        searched += len(counts)
    return best + (searched,)


def detect(token_ids, vocab_size, gamma=DEFAULT_GAMMA, scheme="lefthash", key=DEFAULT_KEY,
           z_threshold=DEFAULT_Z_THRESHOLD, counting="pairs", window=False):
    """Score a token-id sequence (the generated text without the prompt, no BOS). Returns a JSON-ready dict; verdict
    is "watermarked", "no watermark" or "too short" (even all-green tokens could not reach z_threshold)."""
    check_params(vocab_size, gamma, scheme, key)
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        raise ValueError("empty input: no tokens to score")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    positions, greens = score_tokens(token_ids, vocab_size, gamma, scheme, key, counting)
    total, green = len(greens), sum(greens)
    result = {"num_tokens": len(token_ids), "num_tokens_scored": total, "num_green_tokens": green,
              "green_fraction": green / total if total else None,
              "z_score": z_score(green, total, gamma) if total else None, "p_value": None, "p_value_binomial": None}
    if total:
        result["p_value"] = normal_p_value(result["z_score"])
        result["p_value_binomial"] = binomial_p_value(green, total, gamma)
    # With T tokens all green, z = sqrt(T (1 - gamma) / gamma): below the threshold, a verdict would be meaningless.
    too_short = math.sqrt(total * (1 - gamma) / gamma) <= z_threshold
    watermarked = not too_short and result["z_score"] > z_threshold
    if window:
        # Searching many windows finds a high z somewhere in any long text, so the best window's exact p-value is
        # multiplied by the number of windows searched (Bonferroni) and compared with the plain test's level.
        level = normal_p_value(z_threshold)
        min_size = max(1, math.floor(z_threshold**2 * gamma / (1 - gamma)) + 1) if z_threshold > 0 else 1
        too_short = total < min_size
        if not too_short:
            z, start, end, searched = best_window(greens, gamma, min_size)
            window_green = sum(greens[start:end])
            p_window = binomial_p_value(window_green, end - start, gamma)
            corrected = min(1.0, p_window * searched)
            too_short = min(1.0, gamma**total * searched) > level
            watermarked = not too_short and corrected <= level
            result["window"] = {"start": positions[start], "end": positions[end - 1] + 1, "num_tokens_scored":
                                end - start, "num_green_tokens": window_green, "z_score": z,
                                "p_value_binomial": p_window, "num_windows": searched, "p_value_corrected": corrected}
    result["prediction"] = watermarked
    result["verdict"] = "too short" if too_short else "watermarked" if watermarked else "no watermark"
    result.update(scheme=scheme, gamma=gamma, vocab_size=vocab_size, context_width=CONTEXT_WIDTH[scheme],
                  key_fingerprint=key_fingerprint(key), z_threshold=z_threshold, counting=counting)
    return result


def parse_ids(text, where):
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"{where}: token ids must be integers separated by spaces or commas")


def resolve(args, record, where):
    """Detection settings for one input: the flags, checked against what generation recorded (if anything)."""
    record = record if isinstance(record, dict) else {}
    settings = {}
    for name, default in (("scheme", "lefthash"), ("gamma", DEFAULT_GAMMA), ("vocab_size", None)):
        flag, recorded = getattr(args, name), record.get(name)
        if flag is not None and recorded is not None and flag != recorded:
            hint = " (the model's logits dimension)" if name == "vocab_size" else ""
            raise SystemExit(f"{where}: field 'watermark': generated with {name}={recorded}{hint}, but detecting "
                             f"with {name}={flag}; pass --{name}={recorded}")
        settings[name] = flag if flag is not None else recorded if recorded is not None else default
    if settings["vocab_size"] is None:
        raise SystemExit(f"{where}: vocab_size unknown: pass --tokenizer or --vocab_size")
    recorded_key = record.get("key_fingerprint")
    if recorded_key is not None and recorded_key != key_fingerprint(args.key):
        raise SystemExit(f"{where}: field 'watermark': generated with a key of fingerprint {recorded_key}, but --key "
                         f"has fingerprint {key_fingerprint(args.key)}; pass the key used at generation")
    return settings


def report(result, args, label, tokenizer, token_ids):
    if args.json:
        print(json.dumps(({"line": label} if isinstance(label, int) else {}) | result), flush=True)
        return
    head = f"line {label}: " if isinstance(label, int) else ""
    if result["num_tokens_scored"] == 0:
        print(f"{head}{result['verdict']}: no token could be scored ({result['num_tokens']} tokens)", flush=True)
        return
    print(f"{head}{result['verdict']}: {result['num_green_tokens']}/{result['num_tokens_scored']} tokens green "
          f"({result['green_fraction']:.1%}, expected {result['gamma']:.0%}), z={result['z_score']:.2f}, "
          f"p={result['p_value']:.3g}, exact binomial p={result['p_value_binomial']:.3g}", flush=True)
    if "window" in result:
        w = result["window"]
        print(f"{head}  best window: tokens [{w['start']}, {w['end']}), {w['num_green_tokens']}/"
              f"{w['num_tokens_scored']} green, z={w['z_score']:.2f}, p={w['p_value_binomial']:.3g}, corrected for "
              f"{w['num_windows']} windows searched: p={w['p_value_corrected']:.3g}", flush=True)
        if tokenizer is not None:
            print(f"{head}  span: {tokenizer.decode(token_ids[w['start']:w['end']])!r}", flush=True)


def detect_one(args, token_ids, record, where, label, tokenizer):
    settings = resolve(args, record, where)
    try:
        result = detect(token_ids, settings["vocab_size"], settings["gamma"], settings["scheme"], args.key,
                        args.z_threshold, args.counting, args.window)
    except ValueError as e:
        raise SystemExit(f"{where}: {e}")
    report(result, args, label, tokenizer, token_ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("detect", help="score text or token ids for the watermark")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to score (needs --tokenizer)")
    source.add_argument("--in", dest="inp", metavar="FILE", help="JSONL file, one verdict per line")
    source.add_argument("--ids", help='token ids, e.g. "12 873 5"')
    p.add_argument("--field", default="output", help="JSONL field with the text (or a list of token ids)")
    p.add_argument("--tokenizer", help="sentencepiece model used at generation (text is encoded without BOS)")
    p.add_argument("--vocab_size", type=int, help="the generating model's logits dimension; defaults to the "
                   "tokenizer's size, which is wrong for models whose output layer is padded")
    p.add_argument("--gamma", type=float, help=f"green fraction (default {DEFAULT_GAMMA}, or as recorded)")
    p.add_argument("--scheme", help="lefthash or selfhash (default lefthash, or as recorded)")
    p.add_argument("--key", type=int, default=DEFAULT_KEY, help="the secret key used at generation")
    p.add_argument("--z_threshold", type=float, default=DEFAULT_Z_THRESHOLD)
    p.add_argument("--counting", choices=COUNTINGS, default="pairs", help="what counts once: each (seed, token) "
                   "pair (keeps the stated false-positive rate), each n-gram (the reference's "
                   "ignore_repeated_ngrams=True), or every token (the reference's default)")
    p.add_argument("--window", action="store_true", help="find the most watermarked span (corrected p-value)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    args = parser.parse_args(argv)
    try:  # fail on bad flags before reading any input
        check_params(2**31, DEFAULT_GAMMA if args.gamma is None else args.gamma, args.scheme or "lefthash", args.key)
    except ValueError as e:
        raise SystemExit(f"watermark.py detect: {e}")
    tokenizer = None
    if args.tokenizer:
        import sentencepiece
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
        if args.vocab_size is None:
            args.vocab_size = tokenizer.get_piece_size()

    def encode(text, where):
        if tokenizer is None:
            raise SystemExit(f"{where}: scoring text needs --tokenizer")
        return tokenizer.encode(text)

    if args.text is not None:
        if not args.text.strip():
            raise SystemExit("--text: empty input")
        detect_one(args, encode(args.text, "--text"), None, "--text", None, tokenizer)
    elif args.ids is not None:
        ids = parse_ids(args.ids, "--ids")
        if not ids:
            raise SystemExit("--ids: empty input")
        detect_one(args, ids, None, "--ids", None, tokenizer)
    else:
        try:
            lines = open(args.inp, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise SystemExit(f"{args.inp}: {e.strerror}")
        if not any(line.strip() for line in lines):
            raise SystemExit(f"{args.inp}: empty input")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{args.inp}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{where}: not valid JSON ({e.msg})")
            if not isinstance(row, dict) or args.field not in row:
                raise SystemExit(f"{where}: field {args.field!r} missing")
            value = row[args.field]
            if isinstance(value, list) and all(isinstance(t, int) for t in value):
                ids = value
            elif isinstance(value, str):
                ids = encode(value, where)
            else:
                raise SystemExit(f"{where}: field {args.field!r} must be text or a list of token ids")
            if not ids:  # an empty generation is a legitimate output, not a broken file
                report({"num_tokens": 0, "num_tokens_scored": 0, "prediction": False, "verdict": "too short"},
                       args, number, tokenizer, ids)
                continue
            detect_one(args, ids, row.get("watermark"), where, number, tokenizer)


if __name__ == "__main__":
    main()
