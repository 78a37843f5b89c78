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
import sentencepiece
import torch

DEFAULT_KEY = 15485863  # the paper's key: it is public, so anyone can detect AND forge text made with it
DEFAULT_GAMMA, DEFAULT_DELTA, DEFAULT_Z_THRESHOLD = 0.25, 2.0, 4.0
# h in the paper: how many tokens the seed reads. lefthash reads the previous token. selfhash reads the 3 previous
# tokens plus the candidate token itself (the reference's "algorithm-3" = ff-anchored_minhash_prf-4-True-15485863).
CONTEXT_WIDTH = {"lefthash": 1, "selfhash": 4}
# At generation selfhash tests only the top 41 candidates, as the reference (its loop breaks after index 40; HF's
# after 39). Detection does not depend on it.
SELFHASH_CANDIDATES = 41
# selfhash hashes token ids through a fixed random permutation table; the reference seeds it with this prime.
MINHASH_TABLE_SIZE = 1_000_003
MINHASH_TABLE_SEED = 2971215073
# What counts once at detection (repeats are not independent evidence): "pairs", each (seed, token), coin flips, so
# z keeps its stated false-positive rate; "ngrams", each (context, token), the reference's ignore_repeated_ngrams;
# "all", its default. ngrams over-flags selfhash, where a quarter of windows seed from the candidate alone.
COUNTINGS = ("pairs", "ngrams", "all")

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
    # The paper's Algorithm 2 ("simple_1"): key x previous token, modulo 2**64 - 1 to fit torch's manual_seed, as in
    # the reference and Hugging Face (the oldest reference omits the modulo: the same for the default key).
    return (key * prev_token) % (2**64 - 1)

@functools.lru_cache(maxsize=1)
def minhash_table():
    return torch.randperm(MINHASH_TABLE_SIZE, generator=torch.Generator().manual_seed(MINHASH_TABLE_SEED)).numpy()

def selfhash_seed(window, key):
    # The reference's anchored min-hash over [t-3, t-2, t-1, candidate]: the least hash(token) x hash(candidate) x key,
    # in torch's int64 arithmetic (it wraps on overflow; we mimic it). The minimum stays when one context token is
    # edited, Algorithm 3's robustness; hashing in the candidate ("self-salting") makes the list hard to learn.
    hashes = [int(minhash_table()[token % MINHASH_TABLE_SIZE]) + 1 for token in window]
    return min((key * h * hashes[-1] + 2**63) % 2**64 - 2**63 for h in hashes) % (2**64 - 1)

def green_ids(seed, vocab_size, gamma):
    # Always a CPU generator: CUDA's randperm gives different numbers for the same seed, so a green list drawn on
    # the model's device would make detection depend on where the model ran (the reference has this flaw).
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)]

@functools.lru_cache(maxsize=2048)
def lefthash_mask(prev_token, vocab_size, gamma, key, device="cpu"):
    # Cached per previous token (and device): the permutation costs ~0.3 ms (vocab 32000), more than the rest of a
    # watermarked decode step. Masks take vocab_size bytes each (64 MB at most here for a 32000 vocabulary).
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    return mask.index_fill_(0, green_ids(lefthash_seed(prev_token, key), vocab_size, gamma), True).to(device)

@functools.lru_cache(maxsize=2**16)
def selfhash_is_green(window, vocab_size, gamma, key):
    return bool((green_ids(selfhash_seed(window, key), vocab_size, gamma) == window[-1]).any())

def top_candidates(row_logits, k):
    # The k highest logits, ties at the cut broken towards the lower id so every device and dtype picks the same set
    # (the reference's unstable sort leaves this open; order inside the set does not matter).
    row = row_logits.detach().float().cpu()
    kth = row.topk(min(k, row.numel())).values[-1]
    above, tied = (row > kth).nonzero().flatten().tolist(), (row == kth).nonzero().flatten().tolist()
    return above + tied[: k - len(above)]

class WatermarkProcessor:
    """Embedding: proc(prev_tokens, logits) adds delta to the green logits of each row of the raw next-token logits
    (before temperature, top-p, sampling); prev_tokens[i] is row i's prompt and generated ids. Rows with too little
    history are left alone, as in the reference; detection does not score those positions either."""

    def __init__(self, vocab_size, gamma=DEFAULT_GAMMA, delta=DEFAULT_DELTA, scheme="lefthash", key=DEFAULT_KEY):
        check_params(vocab_size, gamma, scheme, key)
        if not math.isfinite(delta):
            raise ValueError(f"delta must be finite, got {delta}")
        if key == DEFAULT_KEY:
            print(f"WARNING: watermarking with the default key {DEFAULT_KEY}, which is public: anyone can detect "
                  "this watermark and forge it. Pass your own secret --key.", file=sys.stderr)
        self.vocab_size, self.gamma, self.delta, self.scheme, self.key = vocab_size, gamma, delta, scheme, key
        # Recorded in every output line. The key itself is secret, so only its fingerprint is written.
        self.params = {"scheme": scheme, "gamma": gamma, "delta": delta, "vocab_size": vocab_size,
                       "context_width": CONTEXT_WIDTH[scheme], "key_fingerprint": key_fingerprint(key)}

    def __call__(self, prev_tokens, logits):
        if tuple(logits.shape) != (len(prev_tokens), self.vocab_size):
            raise ValueError(f"logits {tuple(logits.shape)} for {len(prev_tokens)} histories: want one row each, of "
                             f"vocab_size={self.vocab_size} (the model's logits dimension)")
        for row, history in enumerate(prev_tokens):
            if self.scheme == "lefthash" and len(history) >= 1:
                mask = lefthash_mask(int(history[-1]), self.vocab_size, self.gamma, self.key, logits.device)
                logits[row].add_(mask, alpha=self.delta)
            elif self.scheme == "selfhash" and len(history) >= 3:  # the top candidates c green after (t-3..t-1, c)
                context = tuple(int(t) for t in history[-3:])
                ids = [c for c in top_candidates(logits[row], SELFHASH_CANDIDATES)
                       if selfhash_is_green(context + (c,), self.vocab_size, self.gamma, self.key)]
                if ids:
                    logits[row, torch.tensor(ids, device=logits.device)] += self.delta
        return logits

def normal_p_value(z):
    return 0.5 * math.erfc(z / math.sqrt(2))

def binomial_p_value(green, total, gamma):
    """P(X >= green) for X ~ Binomial(total, gamma), summed in log space (exact where the z-test is approximate,
    which matters for short texts)."""
    if green <= 0 or green > total:
        return 1.0 if green <= 0 else 0.0
    log_terms = [math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1)
                 + k * math.log(gamma) + (total - k) * math.log1p(-gamma) for k in range(green, total + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))

def score_tokens(token_ids, vocab_size, gamma, scheme, key, counting="pairs"):
    """Green/red for each scored token: (positions, greens). Token i is scored with the h tokens before it (h - 1 and
    itself for selfhash), so the first ones lack context; repeats are skipped as `counting` says (see COUNTINGS)."""
    if counting not in COUNTINGS:
        raise ValueError(f"unknown counting {counting!r}; choose one of {', '.join(COUNTINGS)}")
    n = CONTEXT_WIDTH[scheme] + (scheme == "lefthash")  # the n-gram: context + token, unless the token is in it
    positions, greens, seen = [], [], set()
    for end in range(n, len(token_ids) + 1):
        ngram = tuple(token_ids[end - n:end])
        if counting != "all":
            seed = lefthash_seed(ngram[-2], key) if scheme == "lefthash" else selfhash_seed(ngram, key)
            unit = ngram if counting == "ngrams" else (seed, ngram[-1])
            if unit in seen:
                continue
            seen.add(unit)
        positions.append(end - 1)
        greens.append(bool(lefthash_mask(ngram[-2], vocab_size, gamma, key)[ngram[-1]]) if scheme == "lefthash"
                      else selfhash_is_green(ngram, vocab_size, gamma, key))
    return positions, greens

def best_window(positions, greens, gamma, z_threshold):
    """The max-z window over all positions and sizes that could reach z_threshold: (window or None, too short,
    watermarked). Searching many windows finds a high z somewhere in any long text, so the best window's exact
    p-value is multiplied by the number of windows searched (Bonferroni) and compared with the plain test's level."""
    level = normal_p_value(z_threshold)
    min_size = max(1, math.floor(z_threshold**2 * gamma / (1 - gamma)) + 1) if z_threshold > 0 else 1
    if len(greens) < min_size:
        return None, True, False
    cumulative = np.concatenate([[0], np.cumsum(np.asarray(greens, dtype=np.int64))])
    (best, start, end), searched = (-math.inf, 0, 0), 0
    for size in range(min_size, len(greens) + 1):
        z = (cumulative[size:] - cumulative[:-size] - gamma * size) / math.sqrt(size * gamma * (1 - gamma))
        if z[i := int(z.argmax())] > best:
            best, start, end = float(z[i]), i, i + size
        searched += len(z)
    green = sum(greens[start:end])
    p = binomial_p_value(green, end - start, gamma)
    corrected, too_short = min(1.0, p * searched), min(1.0, gamma ** len(greens) * searched) > level
    return ({"start": positions[start], "end": positions[end - 1] + 1, "num_tokens_scored": end - start,
             "num_green_tokens": green, "z_score": best, "p_value_binomial": p, "num_windows": searched,
             "p_value_corrected": corrected}, too_short, not too_short and corrected <= level)

def detect(token_ids, vocab_size, gamma=DEFAULT_GAMMA, scheme="lefthash", key=DEFAULT_KEY,
           z_threshold=DEFAULT_Z_THRESHOLD, counting="pairs", window=False):
    """Score a token-id sequence (the generated text without the prompt, no BOS). Returns a JSON-ready dict; verdict
    is "watermarked", "no watermark" or "too short" (even all-green tokens could not reach z_threshold)."""
    check_params(vocab_size, gamma, scheme, key)
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        raise ValueError("empty input: no tokens to score")
    if bad := [t for t in token_ids if not 0 <= t < vocab_size]:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    positions, greens = score_tokens(token_ids, vocab_size, gamma, scheme, key, counting)
    total, green = len(greens), sum(greens)
    z = (green - gamma * total) / math.sqrt(total * gamma * (1 - gamma)) if total else None  # the paper's z-test
    result = {"num_tokens": len(token_ids), "num_tokens_scored": total, "num_green_tokens": green,
              "green_fraction": green / total if total else None, "z_score": z,
              "p_value": normal_p_value(z) if total else None,
              "p_value_binomial": binomial_p_value(green, total, gamma) if total else None}
    # With T tokens all green, z = sqrt(T (1 - gamma) / gamma): below the threshold, a verdict would be meaningless.
    too_short = math.sqrt(total * (1 - gamma) / gamma) <= z_threshold
    watermarked = not too_short and z > z_threshold
    if window:
        found, too_short, watermarked = best_window(positions, greens, gamma, z_threshold)
        result.update({"window": found} if found else {})
    result["prediction"] = watermarked
    result["verdict"] = "too short" if too_short else "watermarked" if watermarked else "no watermark"
    result.update(scheme=scheme, gamma=gamma, vocab_size=vocab_size, context_width=CONTEXT_WIDTH[scheme],
                  key_fingerprint=key_fingerprint(key), z_threshold=z_threshold, counting=counting)
    return result

def resolve(args, record, where):
    """Detection settings for one input: the flags, checked against what generation recorded (if anything)."""
    record, settings = record if isinstance(record, dict) else {}, {}
    for name, default in (("scheme", "lefthash"), ("gamma", DEFAULT_GAMMA), ("vocab_size", None)):
        flag, recorded = getattr(args, name), record.get(name)
        if flag is not None and recorded is not None and flag != recorded:
            hint = " (the model's logits dimension)" if name == "vocab_size" else ""
            raise SystemExit(f"{where}: field 'watermark': generated with {name}={recorded}{hint}, but detecting "
                             f"with {name}={flag}; pass --{name}={recorded}")
        settings[name] = flag if flag is not None else recorded if recorded is not None else default
    if settings["vocab_size"] is None:
        raise SystemExit(f"{where}: vocab_size unknown: pass --tokenizer or --vocab_size")
    if record.get("key_fingerprint", key_fingerprint(args.key)) != key_fingerprint(args.key):
        raise SystemExit(f"{where}: field 'watermark': generated with a key of fingerprint {record['key_fingerprint']}"
                         f", but --key has fingerprint {key_fingerprint(args.key)}; pass the key used at generation")
    return settings

def report(result, args, line, tokenizer, token_ids):
    head, w = f"line {line}: " if line else "", result.get("window")
    if args.json:
        text = json.dumps(({"line": line} if line else {}) | result)
    elif result["num_tokens_scored"] == 0:
        text = f"{head}{result['verdict']}: no token could be scored ({result['num_tokens']} tokens)"
    else:
        text = (f"{head}{result['verdict']}: {result['num_green_tokens']}/{result['num_tokens_scored']} tokens green "
                f"({result['green_fraction']:.1%}, expected {result['gamma']:.0%}), z={result['z_score']:.2f}, "
                f"p={result['p_value']:.3g}, exact binomial p={result['p_value_binomial']:.3g}")
        if w:
            text += (f"\n{head}  best window: tokens [{w['start']}, {w['end']}), {w['num_green_tokens']}/"
                     f"{w['num_tokens_scored']} green, z={w['z_score']:.2f}, p={w['p_value_binomial']:.3g}, "
                     f"corrected for {w['num_windows']} windows searched: p={w['p_value_corrected']:.3g}")
        if w and tokenizer is not None:
            text += f"\n{head}  span: {tokenizer.decode(token_ids[w['start']:w['end']])!r}"
    print(text, flush=True)

def read_jsonl(path, field):
    """(where, line number, text or token ids, the watermark params generation recorded) for each line of path."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror}")
    inputs, lines = [], text.splitlines()
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):  # the project's torn-line policy (not ours to cut)
                print(f"{where}: no newline at the end: a killed writer's torn last line, not scored", file=sys.stderr)
                break
            raise SystemExit(f"{where}: not valid JSON ({e.msg})")
        if not isinstance(row, dict) or field not in row:
            raise SystemExit(f"{where}: field {field!r} missing")
        value = row[field]
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(t, int) for t in value)):
            raise SystemExit(f"{where}: field {field!r} must be text or a list of token ids")
        inputs.append((where, number, value, row.get("watermark")))
    return inputs

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_subparsers(dest="command", required=True).add_parser("detect", help="score text or token ids")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to score (needs --tokenizer)")
    source.add_argument("--in", dest="inp", metavar="FILE", help="JSONL file, one verdict per line")
    source.add_argument("--ids", help='token ids, e.g. "12 873 5" or "12,873,5"')
    p.add_argument("--field", default="output", help="JSONL field with the text (or a list of token ids)")
    p.add_argument("--tokenizer", help="sentencepiece model used at generation (text is encoded without BOS)")
    p.add_argument("--vocab_size", type=int, help="the generating model's logits dimension (default: the "
                   "tokenizer's size, which is wrong for models whose output layer is padded)")
    p.add_argument("--gamma", type=float, help=f"green fraction (default {DEFAULT_GAMMA}, or as recorded)")
    p.add_argument("--scheme", help="lefthash or selfhash (default lefthash, or as recorded)")
    p.add_argument("--key", type=int, default=DEFAULT_KEY, help="the secret key used at generation")
    p.add_argument("--z_threshold", type=float, default=DEFAULT_Z_THRESHOLD)
    p.add_argument("--counting", choices=COUNTINGS, default="pairs", help="what counts once (see COUNTINGS); "
                   "pairs keeps the stated false-positive rate, ngrams and all are the reference's")
    p.add_argument("--window", action="store_true", help="find the most watermarked span (corrected p-value)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    args = parser.parse_args(argv)
    try:  # fail on bad flags before reading any input
        check_params(2**31, DEFAULT_GAMMA if args.gamma is None else args.gamma, args.scheme or "lefthash", args.key)
    except ValueError as e:
        raise SystemExit(f"watermark.py detect: {e}")
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer) if args.tokenizer else None
    if tokenizer is not None and args.vocab_size is None:
        args.vocab_size = tokenizer.get_piece_size()
    if args.inp is not None:
        inputs, source = read_jsonl(args.inp, args.field), args.inp
    elif args.text is not None:
        inputs, source = [("--text", None, args.text, None)] if args.text.strip() else [], "--text"
    else:
        try:
            ids = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise SystemExit("--ids: token ids must be integers separated by spaces or commas")
        inputs, source = [("--ids", None, ids, None)] if ids else [], "--ids"
    if not inputs:
        raise SystemExit(f"{source}: empty input")
    for where, line, value, recorded in inputs:
        if isinstance(value, str) and tokenizer is None:
            raise SystemExit(f"{where}: scoring text needs --tokenizer")
        ids = tokenizer.encode(value) if isinstance(value, str) else value
        settings = resolve(args, recorded, where)
        try:  # an empty generation is a legitimate output, not a broken file
            result = detect(ids, settings["vocab_size"], settings["gamma"], settings["scheme"], args.key,
                            args.z_threshold, args.counting, args.window) if ids else {
                "num_tokens": 0, "num_tokens_scored": 0, "prediction": False, "verdict": "too short"}
        except ValueError as e:
            raise SystemExit(f"{where}: {e}")
        report(result, args, line, tokenizer, ids)

if __name__ == "__main__":
    main()
