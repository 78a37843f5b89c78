"""
Blind pairwise evaluation of two models, the way Alpaca was compared with text-davinci-003 on the self-instruct
user-oriented set ("Alpaca wins 90 versus 89"): people (or an LLM judge) see one instruction and two unlabelled
responses and say which is better; then we report the result with the statistics it deserves.

    python eval_pairwise.py human  --a=a.jsonl --b=b.jsonl --annotator=alice --judgments=judgments.jsonl
    python eval_pairwise.py judge  --a=a.jsonl --b=b.jsonl --model=gpt-4o-mini --judgments=judgments.jsonl
    python eval_pairwise.py report --a=a.jsonl --b=b.jsonl --judgments=judgments.jsonl > report.md

Judgments are append-only JSONL: annotator (a name, or "judge:<model>"), item, model_a, model_b, first (the model
shown as Response 1), verdict (a, b, tie, skip), time, and the judge's prompt_version, pair_key and orders [{first,
verdict, answer, key}]. The last record per (annotator, item) counts.
"""

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import re
import shutil
import sys
import textwrap
import threading
from datetime import datetime, timezone

import numpy as np

PROMPT_VERSION = "v1"  # part of every cache key: a changed judge prompt asks again
VERDICTS = ("a", "b", "tie", "skip")
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}  # A's score on an item: a tie is half a win
OTHER = {"a": "b", "b": "a"}
BOOTSTRAP = 1000

# 1. Pairing. A and B are JSONL or JSON arrays: sample.py's records (id, instruction, input, output, generator),
# self-instruct's predictions (no id, the text in `response`), alpaca_eval's model_outputs.json. Items align on `id`
# when both files share ids, else on (instruction, input); --eval_set (self-instruct's tasks, `<id>#<k>` for the k-th
# of several instances, the ids sample.py writes) fixes the items and their order. Problems stop the run.

def string(r, *names, optional=False):
    """Field names[0] of record r (or the first alternative it has) as a string; an optional one defaults to ""."""
    value = next((r[n] for n in names if r.get(n) is not None), "" if optional else None)
    if not isinstance(value, str):
        alt = "".join(f" (or '{n}')" for n in names[1:])
        raise SystemExit(f"{r['where']}: field '{names[0]}'{alt} {'is not' if optional else 'missing or not'} a string")
    return value

def parse_item(r):
    """where, id, instruction, input of record r; whitespace around the text goes (self-instruct's ends in newlines)."""
    return {"where": r["where"], "id": None if r.get("id") is None else str(r["id"]),
            "instruction": string(r, "instruction").strip(), "input": string(r, "input", optional=True).strip()}

def load_outputs(path, name):
    """The model's name and its outputs."""
    records = read_records(path)
    rows = [dict(parse_item(r), output=string(r, "output", "response")) for r in records]
    generators = sorted({str(r["generator"]) for r in records if r.get("generator")})
    if name is None and len(generators) > 1:
        raise SystemExit(f"{path}: outputs of several generators ({', '.join(generators)}); "
                         "split the file or name the model with --name_a/--name_b")
    return name or (generators + [os.path.splitext(os.path.basename(path))[0]])[0], rows

def load_eval_set(path):
    """The eval set's items in its order: Alpaca records, or self-instruct's tasks with an item per instance."""
    rows = []
    for r in read_records(path):
        instances = r.get("instances", [r])
        if not isinstance(instances, list) or not instances or not all(isinstance(x, dict) for x in instances):
            raise SystemExit(f"{r['where']}: field 'instances' must be a non-empty list of objects")
        rows += [dict(r, input=x.get("input"), id=None if r.get("id") is None else
                      f"{r['id']}#{k}" if len(instances) > 1 else r["id"]) for k, x in enumerate(instances)]
    return [parse_item(r) for r in rows]

def align(path_a, rows_a, path_b, rows_b, allow_missing=False, eval_set=None):
    """Pair A's and B's outputs by item, in the eval set's order (else A's); problems stop unless --allow_missing."""
    eval_rows = load_eval_set(eval_set) if eval_set else []
    ids_a, ids_b = {r["id"] for r in rows_a}, {r["id"] for r in rows_b}
    # Ids from two different systems may follow different schemes; then only the text can pair them up.
    use_ids = (None not in ids_a | ids_b and bool(ids_a & ids_b)
               and (not eval_set or any(r["id"] in ids_a for r in eval_rows)))
    key = (lambda r: r["id"]) if use_ids else (lambda r: (r["instruction"], r["input"]))
    problems, bad = [], set()  # bad: the keys of the items left out

    def problem(r, message):
        name = repr(r["id"]) if use_ids else repr(r["instruction"][:50]) + (f" ({r['id']})" if r["id"] else "")
        problems.append(f"{r['where']}: item {name} {message}")
        bad.add(key(r))

    def index(rows):  # key -> row, in the file's order
        by_key = {}
        for r in rows:
            if key(r) in by_key:
                problem(r, f"duplicates {by_key[key(r)]['where']}")
            if "output" in r and not r["output"].strip():  # (the eval set has none)
                problem(r, "has an empty output")
            by_key.setdefault(key(r), r)
        return by_key
    a, b = index(rows_a), index(rows_b)
    order = index(eval_rows) if eval_set else a  # the items, in their order
    for k in dict.fromkeys([*order, *a, *b]):  # each item once, named at its line in the eval set, else A's, else B's
        for path, rows in ((path_a, a), (path_b, b)) + (((eval_set, order),) if eval_set else ()):
            if k not in rows:
                problem(order.get(k) or a.get(k) or b[k], f"missing from {path}")
    if problems:
        shown = "\n".join(problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else []))
        if not allow_missing:
            raise SystemExit(f"{shown}\n{len(problems)} alignment problem(s): fix the files, or pass --allow_missing "
                             f"to leave these {len(bad)} item(s) out")
        print(f"{shown}\n--allow_missing: leaving {len(bad)} item(s) out", file=sys.stderr)
    # Without ids, one from the text: the same on every run.
    items = [{"id": order[k]["id"] or a[k]["id"] or b[k]["id"] or "h" + digest(*k)[:10],
              "instruction": a[k]["instruction"], "input": a[k]["input"], "out_a": a[k]["output"],
              "out_b": b[k]["output"]} for k in order if k not in bad]
    print(f"aligned {len(items)} items on {'id' if use_ids else '(instruction, input)'}", file=sys.stderr)
    return items

def prepare(args):
    name_a, rows_a = load_outputs(args.a, args.name_a)
    name_b, rows_b = load_outputs(args.b, args.name_b)
    if name_a == name_b:
        raise SystemExit(f"both models are named {name_a!r}; tell them apart with --name_a/--name_b")
    items = align(args.a, rows_a, args.b, rows_b, args.allow_missing, args.eval_set)
    if not items:
        raise SystemExit("no items to compare")
    return name_a, name_b, items

# 2. Blind order: the rater sees "Response 1" and "Response 2", never the models' names.

def order_first(seed, annotator, item):
    """Which model is Response 1: a coin flip fixed by (seed, annotator, item), so it is the same on every run."""
    return "a" if hashlib.sha256(f"{seed}\0{annotator}\0{item}".encode()).digest()[0] % 2 == 0 else "b"

# 3. The LLM judge: asked in both orders (see run_judge), its verdict a token on the last line.

JUDGE_SYSTEM = "You are a careful and impartial evaluator of answers written by AI assistants."

JUDGE_TEMPLATE = """Below is a task for an AI assistant (an instruction, sometimes with an input) and two responses from two different assistants. Decide which response carries out the task better. Consider whether each response is correct, whether it does what was asked, whether it is complete without padding, and whether it is clear. Which response comes first tells you nothing, and a response is not better just for being longer. If neither is better, call it a tie.

### Instruction
{instruction}

### Input
{input}

### Response 1
{response1}

### Response 2
{response2}

First compare the two responses in a few sentences. Then put your verdict alone on the last line: [[1]] if Response 1 is better, [[2]] if Response 2 is better, or [[T]] if they are equally good or equally bad."""

def judge_messages(item, first):
    prompt = JUDGE_TEMPLATE.format(instruction=item["instruction"], input=item["input"] or "(none)",
                                   response1=item[f"out_{first}"], response2=item[f"out_{OTHER[first]}"])
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]

def parse_verdict(answer, first):
    """The last verdict token in the answer, in terms of models; None when there is none."""
    tokens = re.findall(r"\[\[\s*([12T])\s*\]\]", answer or "", re.IGNORECASE)
    return {"1": first, "2": OTHER[first], "T": "tie"}[tokens[-1].upper()] if tokens else None

# 4. Statistics: how sure may we be of "A wins 90 versus 89"?

def wilson(k, n, z=1.959963984540054):
    """95% interval for a share of k in n; unlike the normal approximation it stays in [0, 1] for small n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (center - half, center + half)

def sign_test(wins, losses):
    """Two-sided exact binomial test of wins vs losses at p = 1/2; ties are left out."""
    n = wins + losses  # n = 0 gives 1
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n)

def cohen_kappa(x, y, labels=("a", "b", "tie")):
    """Agreement of two raters beyond what their verdict shares would give by chance (1 = always agree)."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0:
        return math.nan
    observed = np.mean(x == y)
    expected = sum(np.mean(x == c) * np.mean(y == c) for c in labels)
    return (observed - expected) / (1 - expected) if expected < 1 else math.nan

def fleiss_kappa(counts):
    """counts[i][j]: how many raters put item i in category j; every item has the same number of raters."""
    counts = np.asarray(counts, dtype=float)
    raters = counts[0].sum()
    per_item = ((counts ** 2).sum(1) - raters) / (raters * (raters - 1))
    shares = counts.sum(0) / counts.sum()
    expected = (shares ** 2).sum()
    return (per_item.mean() - expected) / (1 - expected) if expected < 1 else math.nan

def fit_logistic(x, y, ridge=1e-4, steps=100):
    """Logistic regression y ~ sigmoid(b0 + b1 x) by Newton's method; y may be fractional (a tie is 1/2).
    The tiny ridge keeps the fit finite when verdicts are perfectly separated by length."""
    X = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(X @ beta, -30, 30)))
        gradient = X.T @ (y - p) - ridge * beta
        hessian = (X.T * (p * (1 - p))) @ X + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return beta

def length_controlled(scores, len_a, len_b, seed):
    """Win rate the fit predicts for two responses of equal length, and its bootstrap SE, plus the slope per SD."""
    diff = np.asarray(len_a, float) - np.asarray(len_b, float)
    if diff.std() == 0 and diff.any():
        return math.nan, math.nan, math.nan  # one length difference for every item: no way to see its effect
    x = diff / diff.std() if diff.any() else diff  # scaled, not centred: x = 0 means equal length
    beta = fit_logistic(x, scores)
    rng = np.random.default_rng(seed)
    boot = [fit_logistic(x[idx], scores[idx])[0] for idx in rng.integers(0, len(x), (BOOTSTRAP, len(x)))]
    return 1 / (1 + math.exp(-beta[0])), float(np.std(1 / (1 + np.exp(-np.array(boot))), ddof=1)), float(beta[1])

def summarize(verdicts, lengths, seed):
    """Headline numbers for one rater. verdicts: {item: verdict}; skips are counted but not scored."""
    scored = {item: v for item, v in verdicts.items() if v != "skip"}
    scores, n = np.array([SCORE[v] for v in scored.values()]), len(scored)
    wins, losses = int(np.sum(scores == 1)), int(np.sum(scores == 0))
    resampled = scores[np.random.default_rng(seed).integers(0, n, (BOOTSTRAP, n))].mean(1) if n else None
    lc = (length_controlled(scores, *zip(*(lengths[item] for item in scored)), seed) if lengths and n > 1
          else (math.nan,) * 3)
    return {"items": n, "wins": wins, "losses": losses, "ties": n - wins - losses, "skips": len(verdicts) - n,
            "win_rate": float(scores.mean()) if n else math.nan,
            "se": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "ci": [float(np.percentile(resampled, q)) if n else math.nan for q in (2.5, 97.5)],
            "decisive_share": wins / (wins + losses) if wins + losses else math.nan,
            "wilson": list(wilson(wins, wins + losses)), "sign_p": sign_test(wins, losses),
            "lc_win_rate": lc[0], "lc_se": lc[1], "length_slope": lc[2]}

def majority(votes):
    """The verdict most of the votes give (skips do not vote); a draw between the most given is a tie."""
    (most, verdict), (second, _) = sorted(((votes.count(v), v) for v in ("a", "b", "tie")), reverse=True)[:2]
    return verdict if most > second else "tie"

# 5. The report. report_numbers is the data (what --json writes); markdown() is a view of it.

def report_numbers(records, lengths, seed):
    """Per rater, agreement between raters and position bias, from the last judgment per (annotator, item)."""
    current, by_rater = latest(records), {}
    for (annotator, item), r in current.items():
        by_rater.setdefault(annotator, {})[item] = r
    humans = sorted(a for a in by_rater if not a.startswith("judge:"))
    judges = sorted(a for a in by_rater if a.startswith("judge:"))
    verdicts = {a: {item: r["verdict"] for item, r in by_rater[a].items()} for a in humans + judges}
    if len(humans) > 1:  # the humans as one rater: a panel's verdict, and what a judge should agree with
        voted = dict.fromkeys(i for h in humans for i, v in verdicts[h].items() if v != "skip")
        verdicts["humans (majority)"] = {i: majority([verdicts[h].get(i) for h in humans]) for i in voted}
    raters = {a: summarize(verdicts[a], lengths, seed) for a in verdicts}
    for a in raters:  # position bias: how often decisive answers chose the response shown first (50%: none)
        picks, agree = [], []  # agree: the judge's two orders of a pair gave the same verdict
        for r in by_rater.get(a, {}).values():
            orders = r.get("orders") or ([{"first": r["first"], "verdict": r["verdict"]}] if r.get("first") else [])
            picks += [o["verdict"] == o["first"] for o in orders if o["verdict"] in ("a", "b")]
            agree += [orders[0]["verdict"] == orders[1]["verdict"]] if len(orders) == 2 else []
        raters[a].update(decisive_answers=len(picks), pairs_in_both_orders=len(agree),
                         first_position_share=float(np.mean(picks)) if picks else math.nan,
                         position_consistency=float(np.mean(agree)) if agree else math.nan)
    pairs = [(x, y) for i, x in enumerate(humans) for y in humans[i + 1:]]
    pairs += [(j, h) for j in judges for h in humans + (["humans (majority)"] if len(humans) > 1 else [])]
    agreement = []
    for x, y in pairs:
        common = [i for i, v in verdicts[x].items() if v != "skip" and verdicts[y].get(i, "skip") != "skip"]
        vx, vy = np.array([verdicts[x][i] for i in common]), np.array([verdicts[y][i] for i in common])
        agreement.append({"raters": [x, y], "items": len(common), "cohen_kappa": cohen_kappa(vx, vy),
                          "agreement": float(np.mean(vx == vy)) if common else math.nan})
    # Fleiss' kappa needs the same raters on every item: the items all humans judged, when there are 3 or more.
    common = [i for i in verdicts[humans[0]] if all(verdicts[h].get(i, "skip") != "skip" for h in humans)
              ] if len(humans) > 2 else []
    counts = [[sum(verdicts[h][i] == c for h in humans) for c in ("a", "b", "tie")] for i in common]
    return {"model_a": records[0]["model_a"], "model_b": records[0]["model_b"], "seed": seed, "judgments": len(current),
            "superseded": len(records) - len(current), "raters": raters, "agreement": agreement,
            "fleiss_kappa": fleiss_kappa(counts) if common else math.nan, "fleiss_raters": len(humans) if common else 0,
            "fleiss_items": len(common)}

def fmt(x, spec=".1%"):
    return "n/a" if x is None or math.isnan(x) else format(x, spec)

def table(header, rows):
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])

def markdown(s):
    a, b, raters = s["model_a"], s["model_b"], s["raters"]
    out = [f"# Pairwise evaluation: {a} (A) vs {b} (B)", "", f"Judgments: {', '.join(s['sources'])}; {s['judgments']} "
           f"current judgments ({s['superseded']} superseded records ignored); {s['items']} items in the outputs.", ""]
    out += table(["rater", "judged", "A wins", "B wins", "ties", "skipped", "A win rate, ties ½ (SE)",
                  "95% CI (bootstrap)", "A share of decisive [Wilson 95% CI]", "sign test p",
                  "length-controlled A win rate (SE)", "chose the response shown first", "both orders agree (judge)"],
                 [[rater, r["items"], r["wins"], r["losses"], r["ties"], r["skips"],
                   f"{fmt(r['win_rate'])} ({fmt(r['se'])})", f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]",
                   f"{fmt(r['decisive_share'])} [{fmt(r['wilson'][0])}, {fmt(r['wilson'][1])}]",
                   fmt(r["sign_p"], ".3f"), f"{fmt(r['lc_win_rate'])} ({fmt(r['lc_se'])})",
                   fmt(r["first_position_share"]), f"{fmt(r['position_consistency'])} of {r['pairs_in_both_orders']}"
                   if r["pairs_in_both_orders"] else "-"] for rater, r in raters.items()]) + [""]
    for rater, r in raters.items():
        finding = (f"{a if r['wins'] > r['losses'] else b} is significantly better at the 5% level"
                   if r["sign_p"] < 0.05 else "no significant difference")
        out.append(f"- {rater}: {a} wins {r['wins']} versus {r['losses']} for {b}, with {r['ties']} ties; {finding} "
                   f"(two-sided sign test on the {r['wins'] + r['losses']} decisive items, p = {r['sign_p']:.3f}).")
    out += ["", f"A tie is half a win; SE is that of the per-item score, the CI a bootstrap over items ({BOOTSTRAP} "
            f"resamples, seed {s['seed']}); Wilson and the sign test use decisive items only, skips are not scored. "
            "Length-controlled: a logistic fit of the score on the length difference, read off at equal length. "
            "50% chose-first means no position bias; a judge's pair whose two orders disagree is a tie."]
    if s["agreement"]:
        out += ["", "## Agreement", ""] + table(["raters", "items both judged", "agreement", "Cohen's κ"], [
            [" / ".join(g["raters"]), g["items"], fmt(g["agreement"]), fmt(g["cohen_kappa"], ".3f")]
            for g in s["agreement"]])
    if s["fleiss_raters"]:
        out += ["", f"Fleiss' κ over the {s['fleiss_raters']} human annotators on the {s['fleiss_items']} items all "
                f"of them judged: {fmt(s['fleiss_kappa'], '.3f')}."]
    return "\n".join(out) + "\n"

# alpaca_eval's annotations.json: output_1 is the reference, output_2 the model under evaluation (our A); preference
# 1 means output_1 is better, 2 output_2, 1.5 a tie, so alpaca_eval's win rate, mean(preference - 1), is A's.
PREFERENCE = {"b": 1, "a": 2, "tie": 1.5}

def to_annotations(current, items, name_a, name_b):
    raters = sorted({annotator for annotator, _ in current})
    return [{"instruction": f"{item['instruction']}\n\n{item['input']}" if item["input"] else item["instruction"],
             "output_1": item["out_b"], "generator_1": name_b, "output_2": item["out_a"], "generator_2": name_a,
             "annotator": annotator, "preference": PREFERENCE[r["verdict"]]}
            for item in items for annotator in raters
            for r in [current.get((annotator, item["id"]))] if r and r["verdict"] != "skip"]

def run_report(args):
    records = load_judgments(args.judgments, args.name_a, args.name_b)
    if not records:
        raise SystemExit(f"{', '.join(args.judgments)}: no judgments")
    args.name_a, args.name_b = records[0]["model_a"], records[0]["model_b"]  # the outputs' names must be these
    items = prepare(args)[2]
    lengths = {item["id"]: (len(item["out_a"].split()), len(item["out_b"].split())) for item in items}  # words
    for r in records:
        if r["item"] not in lengths:
            raise SystemExit(f"{r['where']}: unknown item {r['item']!r} (not in {args.a} and {args.b})")
    summary = dict(report_numbers(records, lengths, args.seed), sources=args.judgments, items=len(items))
    print(markdown(summary), end="")  # the report; `> report.md` keeps it (the log goes to stderr)
    if args.json:  # NaN (a number that could not be computed) becomes null: JSON has no NaN
        write_atomic(args.json, json.dumps(json.loads(json.dumps(summary), parse_constant=lambda _: None),
                                           indent=2) + "\n")
    if args.annotations:
        write_atomic(args.annotations, json.dumps(to_annotations(latest(records), items, args.name_a, args.name_b),
                                                  indent=2, ensure_ascii=False) + "\n")

# 6. Judging sessions: a person at the terminal, or the LLM judge. Both resume where they stopped.

def judgment(annotator, item, names, first, verdict, **extra):
    return {"annotator": annotator, "item": item["id"], "model_a": names[0], "model_b": names[1], "first": first,
            "verdict": verdict, **extra, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}

def latest(records):
    """The last record per (annotator, item): judging again supersedes."""
    return {(r["annotator"], r["item"]): r for r in records}

def session(args, annotator):
    """What judging starts from: the model names, the items, the annotator's judgments by item, the file to append."""
    name_a, name_b, items = prepare(args)
    records = load_judgments([args.judgments], name_a, name_b, resume=True)
    done = {item: r for (who, item), r in latest(records).items() if who == annotator}
    return (name_a, name_b), items, done, open(args.judgments, "ab", buffering=0)

def wrap(text, width, indent="  "):
    return "\n".join(line for paragraph in text.splitlines() or [""] for line in
                     textwrap.wrap(paragraph, width, initial_indent=indent, subsequent_indent=indent) or [""])

def run_human(args):
    names, items, done, file = session(args, args.annotator)
    width = max(20, shutil.get_terminal_size().columns - 1)
    print(wrap(f"{len(items)} items, {sum(i['id'] in done for i in items)} already judged by {args.annotator}. "
               "Which response is better? 1 or 2, t = tie, s = skip, b = back one item, q = quit.", width, ""))

    def unjudged(start):  # the first item from `start` on without this annotator's verdict
        return next((i for i in range(start, len(items)) if items[i]["id"] not in done), len(items))
    n = unjudged(0)
    while n < len(items):
        item, earlier = items[n], done.get(items[n]["id"])
        first = order_first(args.seed, args.annotator, item["id"])  # the model shown as Response 1
        print("\n" + f"-- item {n + 1} of {len(items)} ({item['id']}) ".ljust(width, "-")[:width])
        for title, text in (("Instruction", item["instruction"]), ("Input", item["input"]),
                            ("Response 1", item[f"out_{first}"]), ("Response 2", item[f"out_{OTHER[first]}"])):
            if text:
                print(f"{title}:\n{wrap(text, width)}")
        if earlier:  # back here with b
            said = {first: "Response 1", OTHER[first]: "Response 2"}.get(earlier["verdict"], earlier["verdict"])
            print(wrap(f"(your earlier verdict: {said}; answer again to replace it)", width, ""))
        key = None
        while key not in ("1", "2", "t", "s", "b", "q"):
            try:
                key = input("[1/2/t/s/b/q] > ").strip().lower()
            except (EOFError, KeyboardInterrupt):  # end of input or Ctrl-C: quit
                print()
                key = "q"
        if key == "q":
            break
        if key != "b":  # append-only: a new verdict for an item is a later line, and the last one counts
            done[item["id"]] = judgment(args.annotator, item, names, first,
                                        {"1": first, "2": OTHER[first], "t": "tie", "s": "skip"}[key])
            append_jsonl(file, done[item["id"]])
        n = max(0, n - 1) if key == "b" else unjudged(n + 1)
    file.close()
    left = sum(item["id"] not in done for item in items)
    print(wrap(f"{args.annotator}: {len(items) - left} of {len(items)} items judged"
               + (f"; {left} left, run the same command to continue" if left else "; done"), width, ""))

def run_judge(args):
    import openai  # only the judge needs it; keeps the other subcommands quick to start
    annotator = f"judge:{args.model}"
    names, items, done, file = session(args, annotator)
    cache_path = os.path.splitext(args.judgments)[0] + ".cache.jsonl"
    answers = {r["key"]: r["answer"] for r in resume_jsonl(cache_path)}  # cache key -> the judge's answer
    cache = open(cache_path, "ab", buffering=0)
    # The client retries 408, 409, 429, 5xx and network errors itself, with backoff or as Retry-After asks.
    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                           max_retries=args.max_retries, timeout=args.timeout)
    tokens, failures, stop = [], [], threading.Event()  # tokens: (in, out) per call

    def usd():
        return sum(t_in * args.price_in + t_out * args.price_out for t_in, t_out in tokens) / 1e6

    def ask_judge(task):
        """Ask for each order not answered yet, while the budget lasts (the one stop the client does not make)."""
        item, _, keys = task
        for first, key in keys.items():
            if key in answers or stop.is_set() or usd() >= args.max_usd:
                continue
            try:
                response = client.chat.completions.create(model=args.model, messages=judge_messages(item, first),
                                                          temperature=0, max_tokens=args.max_new_tokens)
            except openai.OpenAIError as e:  # what is left after the client's retries: stop, with one message
                stop.set()
                raise SystemExit(f"judge API error on item {item['id']}: {e}")
            answer, usage = response.choices[0].message.content or "", response.usage
            tokens.append((usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0))
            if parse_verdict(answer, first) is not None:  # unparseable answers are asked again on a rerun
                append_jsonl(cache, {"key": key, "model": args.model, "prompt_version": PROMPT_VERSION,
                                     "answer": answer})
            answers[key] = answer
        return task
    todo = []  # (item, pair_key, {first: cache key}) for each item to judge; identical outputs: no orders, a tie
    for item in items:
        text = (item["instruction"], item["input"])
        firsts = [] if item["out_a"].strip() == item["out_b"].strip() else ["a", "b"]  # the model shown first
        pair_key = digest(args.model, PROMPT_VERSION, *text, item["out_a"], item["out_b"], firsts)
        if done.get(item["id"], {}).get("pair_key") != pair_key:
            todo.append((item, pair_key, {f: digest(args.model, PROMPT_VERSION, *text, item[f"out_{f}"],
                                                    item[f"out_{OTHER[f]}"]) for f in firsts}))
    keys = [k for _, _, ks in todo for k in ks.values()]
    to_ask = set(keys) - answers.keys()
    # --concurrency items at a time, each asked in its orders; judgments are written in the items' order.
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        try:
            for item, pair_key, ks in pool.map(ask_judge, todo):
                if any(k not in answers for k in ks.values()):
                    continue  # the budget ran out
                orders = [{"first": f, "verdict": parse_verdict(answers[k], f), "answer": answers[k], "key": k}
                          for f, k in ks.items()]
                verdicts = {o["verdict"] for o in orders}
                if None in verdicts:
                    failures.append(item["id"])
                else:  # two orders that disagree mean the judge followed the position, not the content: a tie
                    append_jsonl(file, judgment(annotator, item, names, next(iter(ks), None),
                                                verdicts.pop() if len(verdicts) == 1 else "tie",
                                                prompt_version=PROMPT_VERSION, pair_key=pair_key, orders=orders))
        finally:
            stop.set()  # after an error or Ctrl-C too: the items still queued ask nothing
    file.close()
    cache.close()
    print(f"{annotator}: {len(items)} items; {len(items) - len(todo)} already judged, "
          f"{sum(not ks for _, _, ks in todo)} identical outputs (tie, no call), {len(keys) - len(to_ask)} answers "
          f"from the cache, {len(tokens)} API calls; {sum(t for t, _ in tokens)} tokens in, "
          f"{sum(t for _, t in tokens)} out; cost ${usd():.4f} (at ${args.price_in}/${args.price_out} per 1M tokens)")
    unasked = to_ask - answers.keys()
    if unasked:
        raise SystemExit(f"budget --max_usd={args.max_usd} reached: {len(unasked)} calls not made, "
                         f"{sum(not unasked.isdisjoint(ks.values()) for _, _, ks in todo)} items not judged; "
                         "rerun with a larger budget to continue")
    if failures:
        message = (f"{len(failures)} item(s) with an unparseable judge answer (no [[1]], [[2]] or [[T]]), not "
                   f"recorded: {', '.join(failures[:20])}{' ...' if len(failures) > 20 else ''}; a rerun asks again")
        if not args.allow_failures:
            raise SystemExit(message)
        print(message)

# 7. Files. Inputs are read whole and checked first; judgments and the judge's cache are append-only JSONL.

def read_records(path):
    """The objects of a JSON array or JSONL file, each with its `where` for errors; a torn last line is read past."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = [(f"{path}: item {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
    else:
        records, lines = [], text.split("\n")  # the last one is "" when the file ends with a newline
        for n, line in enumerate(lines, 1):
            try:
                records += [(f"{path}:{n}", json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                if n < len(lines):
                    raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})")
                print(f"{path}:{n}: ignoring a torn last line (an interrupted write)", file=sys.stderr)
    for where, r in records:
        if not isinstance(r, dict):
            raise SystemExit(f"{where}: expected a JSON object")
    return [dict(r, where=where) for where, r in records]

def resume_jsonl(path):
    """The records of an append-only JSONL file ([] if absent), after cutting off a killed writer's torn last line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data.lstrip().startswith(b"["):
            raise SystemExit(f"{path}: a JSON array cannot be appended to; judge into a JSONL file")
        end = data.rfind(b"\n") + 1
        if end < len(data):
            print(f"{path}: cutting off a torn last line ({len(data) - end} bytes) of a killed run", file=sys.stderr)
            f.truncate(end)
    return read_records(path)

def append_jsonl(file, record):
    # The file is open unbuffered for appending: one write() of a whole line, on disk at once, and annotators
    # sharing a file never interleave.
    file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    file.flush()

def write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def load_judgments(paths, name_a=None, name_b=None, resume=False):
    """The checked judgments of the files; all must compare name_a with name_b (default: the first record's)."""
    records = [r for path in paths for r in (resume_jsonl if resume else read_records)(path)]
    for r in records:
        for field in ("annotator", "item", "model_a", "model_b", "verdict"):
            if not string(r, field):
                raise SystemExit(f"{r['where']}: field '{field}' is empty")
        if r["verdict"] not in VERDICTS:
            raise SystemExit(f"{r['where']}: field 'verdict' is {r['verdict']!r}, not one of {', '.join(VERDICTS)}")
        if r.get("first") not in ("a", "b", None):
            raise SystemExit(f"{r['where']}: field 'first' is {r['first']!r}, not 'a' or 'b'")
        name_a, name_b = name_a or r["model_a"], name_b or r["model_b"]
        if (r["model_a"], r["model_b"]) != (name_a, name_b):
            raise SystemExit(f"{r['where']}: this judgment compares {r['model_a']!r} (A) with {r['model_b']!r} (B), "
                             f"not {name_a!r} with {name_b!r}")
    return records

def digest(*parts):
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:24]

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    human = commands.add_parser("human", help="blind judging session in the terminal")
    judge = commands.add_parser("judge", help="LLM judge through an OpenAI-compatible API, in both orders")
    report = commands.add_parser("report", help="win rates, confidence intervals, agreement, position and length")
    for p in (human, judge, report):
        p.add_argument("--a", required=True, help="outputs of model A (JSONL or JSON array)")
        p.add_argument("--b", required=True, help="outputs of model B")
        p.add_argument("--name_a", help="name of model A (default: the 'generator' field, else the file name)")
        p.add_argument("--name_b", help="name of model B")
        p.add_argument("--eval_set", help="self-instruct style eval set that fixes the items and their order")
        p.add_argument("--allow_missing", action="store_true", help="leave out (and list) problem items, not stop")
        p.add_argument("--seed", type=int, default=0, help="seed for the order of responses and the bootstrap")
        p.add_argument("--judgments", nargs="+" if p is report else None, default=["judgments.jsonl"] if p is report
                       else "judgments.jsonl", help="append-only judgments file (report: one or more)")
    human.add_argument("--annotator", required=True, help="your name; each annotator resumes where they stopped")
    judge.add_argument("--model", default="gpt-4o-mini", help="judge model (and annotator name: judge:<model>)")
    judge.add_argument("--base_url", default=None, help="OpenAI-compatible API (default OpenAI's; OPENAI_API_KEY)")
    judge.add_argument("--max_retries", type=int, default=6, help="the client's retries (408, 409, 429, 5xx)")
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    judge.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    judge.add_argument("--max_usd", type=float, default=5.0, help="stop sending requests once this much is spent")
    judge.add_argument("--price_in", type=float, default=0.15, help="USD per 1M prompt tokens")
    judge.add_argument("--price_out", type=float, default=0.60, help="USD per 1M completion tokens")
    judge.add_argument("--max_new_tokens", type=int, default=512, help="length limit of the judge's answer")
    judge.add_argument("--allow_failures", action="store_true", help="exit 0 even if some answers had no verdict")
    report.add_argument("--json", help="write the numbers here as JSON")
    report.add_argument("--annotations", help="write the verdicts here as alpaca_eval's annotations.json")
    args = parser.parse_args(argv)
    {"human": run_human, "judge": run_judge, "report": run_report}[args.command](args)

if __name__ == "__main__":
    main()
