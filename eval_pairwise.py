"""
Blind pairwise evaluation of two models, the way Alpaca was compared with text-davinci-003 on the self-instruct
user-oriented set ("Alpaca wins 90 versus 89"): people (or an LLM judge) see one instruction and two unlabelled
responses and say which is better; then we report the result with the statistics it deserves.

    python eval_pairwise.py human  --a=a.jsonl --b=b.jsonl --annotator=alice --judgments=judgments.jsonl
    python eval_pairwise.py judge  --a=a.jsonl --b=b.jsonl --model=gpt-4o-mini --judgments=judgments.jsonl
    python eval_pairwise.py report --judgments=judgments.jsonl [--a=a.jsonl --b=b.jsonl] [--markdown=report.md]

The judgments file is append-only JSONL, one record per judgment: annotator (a name, or "judge:<model>"), item,
model_a, model_b, first (the model shown as Response 1), verdict ("a", "b", "tie" or "skip"), rating_a/rating_b
(self-instruct's A-D, with --rate), len_a/len_b (words, so `report` needs nothing else), time; the judge adds
prompt_version, pair_key and orders [{first, verdict, answer, key}] with its raw answers. The last record per
(annotator, item) supersedes earlier ones. alpaca_eval's annotations.json goes both ways: `report --annotations`
writes one, `judge`/`human --annotations` import one.
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import textwrap
import threading

import numpy as np

PROMPT_VERSION = "v1"  # part of every cache key: a changed judge prompt asks again
VERDICTS = ("a", "b", "tie", "skip")
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}  # A's score on an item: a tie is half a win
RATING_SCALE = {"A": "valid and satisfying", "B": "acceptable, minor imperfections",
                "C": "relevant but significant errors", "D": "irrelevant or invalid"}
BOOTSTRAP = 1000


# 1. Pairing. A and B are JSONL or JSON arrays: sample.py's records (id, instruction, input, output, generator),
# self-instruct's predictions (no id, the text in `response`), alpaca_eval's model_outputs.json. Items align on `id`
# when both files share ids, else on (instruction, input); --eval_set (self-instruct's tasks, `<id>#<k>` for the
# k-th of several instances) fixes the items and their order. Problems are listed and stop the run.

def string(where, r, *names, optional=False):
    """Field names[0] of record r (or the first alternative it has) as a string; an optional one defaults to ""."""
    value = next((r[n] for n in names if r.get(n) is not None), "" if optional else None)
    if not isinstance(value, str):
        also = "".join(f" (or '{n}')" for n in names[1:])
        raise SystemExit(f"{where}: field '{names[0]}'{also} {'is not' if optional else 'missing or not'} a string")
    return value


def parse_item(where, r, instance=None):
    """id, instruction and input of any of these records (the input from `instance`, one of a self-instruct task's
    instances, if given). Whitespace around the text is ignored: self-instruct's instructions end in a newline."""
    return {"where": where, "id": None if r.get("id") is None else str(r["id"]),
            "instruction": string(where, r, "instruction").strip(),
            "input": string(where, r if instance is None else instance, "input", optional=True).strip()}


def load_outputs(path, name):
    records = read_records(path)
    rows = [dict(parse_item(where, r), output=string(where, r, "output", "response")) for where, r in records]
    generators = sorted({str(r["generator"]) for _, r in records if r.get("generator")})
    if not rows:
        raise SystemExit(f"{path}: no outputs")
    if name is None and len(generators) > 1:
        raise SystemExit(f"{path}: outputs of several generators ({', '.join(generators)}); "
                         "split the file or name the model with --name_a/--name_b")
    return name or (generators + [os.path.splitext(os.path.basename(path))[0]])[0], rows


def load_eval_set(path):
    items = []
    for where, r in read_records(path):
        instances = r.get("instances", [{"input": r.get("input")}])
        if not isinstance(instances, list) or not instances or not all(isinstance(x, dict) for x in instances):
            raise SystemExit(f"{where}: field 'instances' must be a non-empty list of objects")
        for k, instance in enumerate(instances):
            item = parse_item(where, r, instance)
            item["id"] = (item["id"] or text_id(item)) + (f"#{k}" if len(instances) > 1 else "")
            items.append(item)
    return items


def text_id(item):
    return "h" + digest(item["instruction"], item["input"])[:10]  # for an item without an id: the same every run


def align(path_a, rows_a, path_b, rows_b, eval_path=None, eval_items=None, allow_missing=False):
    """Pair A's and B's outputs item by item. Every problem is listed; without --allow_missing any problem stops."""
    eval_ids = {e["id"] for e in eval_items or []}
    # Ids from two different systems may follow different schemes; then only the text can pair them up.
    use_ids = (all(r["id"] is not None for r in rows_a + rows_b)
               and bool({r["id"] for r in rows_a} & {r["id"] for r in rows_b})
               and (not eval_items or any(r["id"] in eval_ids for r in rows_a)))
    key = (lambda r: r["id"]) if use_ids else (lambda r: (r["instruction"], r["input"]))
    problems, bad = [], set()  # bad: the keys of the items left out

    def problem(k, where, message):
        problems.append(f"{where}: item {repr(k) if use_ids else repr(k[0][:50])} {message}")
        bad.add(k)

    def index(rows):
        by_key = {}
        for r in rows:
            if key(r) in by_key:
                problem(key(r), r["where"], f"duplicates {by_key[key(r)]['where']}")
            if not r["output"].strip():
                problem(key(r), r["where"], "has an empty output")
            by_key.setdefault(key(r), r)
        return by_key

    a, b = index(rows_a), index(rows_b)
    order = {}  # key -> the eval set's item, in its order; without one, A's items then B's
    for e in eval_items or []:
        if key(e) in order:
            problem(key(e), e["where"], "appears twice in the eval set")
        order[key(e)] = e
    for k, r in [*a.items(), *b.items()]:
        if order and k not in order:
            problem(k, r["where"], f"is not in the eval set {eval_path}")
    for k in order or dict.fromkeys([*a, *b]):
        for path, rows in ((path_a, a), (path_b, b)):
            if k not in rows:
                problem(k, (order.get(k) or a.get(k) or b[k])["where"], f"missing from {path}")
    stop_on_problems(problems, allow_missing, f"alignment problem(s): fix the files, or pass --allow_missing to "
                     f"leave these {len(bad)} item(s) out", f"leaving {len(bad)} item(s) out")
    items = [{"id": (order.get(k) or a[k])["id"] or b[k]["id"] or text_id(a[k]), "instruction": a[k]["instruction"],
              "input": a[k]["input"], "out_a": a[k]["output"], "out_b": b[k]["output"]}
             for k in order or a if k not in bad]
    print(f"aligned {len(items)} items on {'id' if use_ids else '(instruction, input)'}", file=sys.stderr)
    return items


def prepare(args):
    name_a, rows_a = load_outputs(args.a, args.name_a)
    name_b, rows_b = load_outputs(args.b, args.name_b)
    if name_a == name_b:
        raise SystemExit(f"both models are named {name_a!r}; tell them apart with --name_a/--name_b")
    eval_items = load_eval_set(args.eval_set) if args.eval_set else None
    items = align(args.a, rows_a, args.b, rows_b, args.eval_set, eval_items, args.allow_missing)
    if not items:
        raise SystemExit("no items to compare")
    return name_a, name_b, items


# 2. Blind order: the rater sees "Response 1" and "Response 2", never the models' names.

def order_first(seed, annotator, item):
    """Which model is Response 1: a coin flip fixed by (seed, annotator, item), so it is the same on every run."""
    return "a" if hashlib.sha256(f"{seed}\0{annotator}\0{item}".encode()).digest()[0] % 2 == 0 else "b"


def other(model):
    return "b" if model == "a" else "a"


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


def judge_messages(instruction, input, response1, response2):
    prompt = JUDGE_TEMPLATE.format(instruction=instruction, input=input or "(none)",
                                   response1=response1, response2=response2)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


def parse_verdict(answer, first):
    """The last verdict token in the answer, in terms of models; None when there is none."""
    tokens = re.findall(r"\[\[\s*([12T])\s*\]\]", answer or "", re.IGNORECASE)
    return {"1": first, "2": other(first), "T": "tie"}[tokens[-1].upper()] if tokens else None


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
    n = wins + losses
    if n == 0:
        return 1.0
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
    """Plurality of a/b/tie (skips do not vote); a draw between the top verdicts is a tie."""
    counts = {v: votes.count(v) for v in ("a", "b", "tie")}
    winners = [v for v, c in counts.items() if c == max(counts.values())]
    return winners[0] if len(winners) == 1 else "tie"


# 5. The report: per rater, then agreement between raters, position bias, length, quality ratings.

def pct(x):
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def num(x, digits=3):
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def table(header, rows):
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def build_report(records, lengths, known_items, seed, sources):
    name_a, name_b = records[0]["model_a"], records[0]["model_b"]
    current, by_rater = latest(records), {}
    for (annotator, item), r in current.items():
        by_rater.setdefault(annotator, {})[item] = r
    humans = sorted(a for a in by_rater if not a.startswith("judge:"))
    judges = sorted(a for a in by_rater if a.startswith("judge:"))
    verdicts = {a: {item: r["verdict"] for item, r in by_rater[a].items()} for a in humans + judges}
    if len(humans) > 1:
        voted = dict.fromkeys(i for h in humans for i, v in verdicts[h].items() if v != "skip")
        verdicts["humans (majority)"] = {i: majority([verdicts[h].get(i, "skip") for h in humans]) for i in voted}
    stats = {rater: summarize(v, lengths, seed) for rater, v in verdicts.items()}

    out = [f"# Pairwise evaluation: {name_a} (A) vs {name_b} (B)", "",
           f"Judgments: {', '.join(sources)}; {len(current)} current judgments "
           f"({len(records) - len(current)} superseded records ignored)"
           + (f"; {known_items} items in the outputs." if known_items else "."), ""]
    out += table(["rater", "judged", "A wins", "B wins", "ties", "skipped", "A win rate (ties ½)", "SE",
                  "95% CI (bootstrap)", "A share of decisive, Wilson 95% CI", "sign test p",
                  "length-controlled A win rate (SE)"],
                 [[rater, s["items"], s["wins"], s["losses"], s["ties"], s["skips"], pct(s["win_rate"]), pct(s["se"]),
                   f"[{pct(s['ci'][0])}, {pct(s['ci'][1])}]",
                   f"{pct(s['decisive_share'])} [{pct(s['wilson'][0])}, {pct(s['wilson'][1])}]", num(s["sign_p"]),
                   f"{pct(s['lc_win_rate'])} ({pct(s['lc_se'])})"] for rater, s in stats.items()]) + [""]
    for rater, s in stats.items():
        finding = (f"{name_a if s['wins'] > s['losses'] else name_b} is significantly better at the 5% level"
                   if s["sign_p"] < 0.05 else "no significant difference")
        out.append(f"- {rater}: {name_a} wins {s['wins']} versus {s['losses']} for {name_b}, with {s['ties']} ties; "
                   f"{finding} (two-sided sign test on the {s['wins'] + s['losses']} decisive items, "
                   f"p = {num(s['sign_p'])}).")
    out += ["", "Win rate counts a tie as half a win; SE is the standard error of the per-item score (1, ½, 0) and "
            f"the CI a percentile bootstrap over items ({BOOTSTRAP} resamples, seed {seed}). The Wilson interval and "
            "the sign test use only the decisive items (ties left out). Skipped items are not scored."]

    agreement, fleiss = [], math.nan
    pairs = [(x, y) for i, x in enumerate(humans) for y in humans[i + 1:]]
    pairs += [(j, h) for j in judges for h in humans + (["humans (majority)"] if len(humans) > 1 else [])]
    for x, y in pairs:
        common = [i for i, v in verdicts[x].items() if v != "skip" and verdicts[y].get(i, "skip") != "skip"]
        vx, vy = np.array([verdicts[x][i] for i in common]), np.array([verdicts[y][i] for i in common])
        agreement.append({"raters": [x, y], "items": len(common), "agreement": float(np.mean(vx == vy))
                          if common else math.nan, "cohen_kappa": cohen_kappa(vx, vy)})
    if pairs:
        out += ["", "## Agreement", ""] + table(["raters", "items both judged", "agreement", "Cohen's κ"], [
            [" / ".join(g["raters"]), g["items"], pct(g["agreement"]), num(g["cohen_kappa"])] for g in agreement])
    if len(humans) > 2:
        common = [i for i in verdicts[humans[0]] if all(verdicts[h].get(i, "skip") != "skip" for h in humans)]
        counts = [[sum(verdicts[h][i] == c for h in humans) for c in ("a", "b", "tie")] for i in common]
        fleiss = fleiss_kappa(counts) if common else math.nan
        out += ["", f"Fleiss' κ over the {len(humans)} human annotators on the {len(common)} items all of them "
                f"judged: {num(fleiss)}."]

    rows = []
    for rater in humans + judges:
        picks, agree = [], []  # chose the first shown, per decisive answer; both orders agree, per pair (judge)
        for r in by_rater[rater].values():
            orders = r.get("orders") or ([{"first": r["first"], "verdict": r["verdict"]}] if r.get("first") else [])
            picks += [o["verdict"] == o["first"] for o in orders if o.get("verdict") in ("a", "b")]
            agree += [orders[0]["verdict"] == orders[1]["verdict"]] if len(orders) == 2 else []
        s = stats[rater]
        s["first_position_share"] = float(np.mean(picks)) if picks else math.nan
        s["position_consistency"] = float(np.mean(agree)) if agree else math.nan
        rows.append([rater, len(picks), pct(s["first_position_share"]),
                     f"{pct(s['position_consistency'])} of {len(agree)} pairs" if agree else "-"])
    out += ["", "## Position", ""] + table(["rater", "decisive answers", "chose the response shown first",
                                            "both orders agree (judge)"], rows)
    out += ["", "50% chose-first means no preference for the first position. For the judge each pair is asked in "
            "both orders; when the two answers disagree the pair counts as a tie."]

    if lengths:
        judged = sorted({item for rater in humans + judges for item in by_rater[rater]} & set(lengths))
        la, lb = np.array([lengths[i][0] for i in judged]), np.array([lengths[i][1] for i in judged])
        out += ["", "## Length", "",
                f"Over the {len(judged)} judged items, {name_a} answers in {la.mean():.0f} words on average "
                f"(median {np.median(la):.0f}), {name_b} in {lb.mean():.0f} (median {np.median(lb):.0f}); "
                f"{name_a} is longer on {pct(np.mean(la > lb))} of items.",
                "The length-controlled win rate fits a logistic regression of the score (ties ½) on the length "
                "difference in words divided by its SD, and reads it off at zero difference; its SE is a bootstrap "
                "over items. Slope per SD of length difference: "
                + ", ".join(f"{rater} {num(s['length_slope'], 2)}" for rater, s in stats.items()) + "."]

    ratings = [(rater, name, [r[f"rating_{m}"] for r in by_rater[rater].values() if r.get(f"rating_{m}")])
               for rater in humans for m, name in (("a", name_a), ("b", name_b))]
    if any(given for _, _, given in ratings):
        out += ["", "## Quality ratings (self-instruct scale)", "",
                "Scale: " + "; ".join(f"{k} = {v}" for k, v in RATING_SCALE.items()), ""]
        out += table(["rater", "model", "A", "B", "C", "D"],
                     [[rater, name, *(given.count(g) for g in "ABCD")] for rater, name, given in ratings if given])
    return "\n".join(out) + "\n", {"model_a": name_a, "model_b": name_b, "raters": stats,
                                   "agreement": agreement, "fleiss_kappa": fleiss}


def run_report(args):
    records = load_judgments(args.judgments)
    if not records:
        raise SystemExit(f"{', '.join(args.judgments)}: no judgments")
    name_a, name_b = records[0]["model_a"], records[0]["model_b"]
    check_models(records, name_a, name_b)
    if args.annotations and not (args.a and args.b):
        raise SystemExit("--annotations needs --a and --b: the judgments do not hold the outputs")
    if bool(args.a) != bool(args.b):
        raise SystemExit("give both --a and --b, or neither")
    lengths, known_items, seen = {}, None, {}
    if args.a:
        args.name_a, args.name_b = args.name_a or name_a, args.name_b or name_b
        file_a, file_b, items = prepare(args)
        check_models(records, file_a, file_b)
        lengths = {item["id"]: (words(item["out_a"]), words(item["out_b"])) for item in items}
        known_items = len(items)
        for r in records:
            if r["item"] not in lengths:
                raise SystemExit(f"{r['where']}: unknown item {r['item']!r} (not in {args.a} and {args.b})")
    else:  # the lengths the judgments recorded: one item's must agree, or judgments of different outputs are mixed
        for r in latest(records).values():
            if not isinstance(r.get("len_a"), int) or not isinstance(r.get("len_b"), int):
                lengths = None
                break
            first = seen.setdefault(r["item"], r)
            if (first["len_a"], first["len_b"]) != (r["len_a"], r["len_b"]):
                raise SystemExit(f"{r['where']}: item {r['item']!r} has lengths {r['len_a']}/{r['len_b']} here but "
                                 f"{first['len_a']}/{first['len_b']} at {first['where']}: judgments of different "
                                 "outputs are mixed")
            lengths[r["item"]] = (r["len_a"], r["len_b"])
    markdown, summary = build_report(records, lengths, known_items, args.seed, args.judgments)
    print(markdown, end="")
    if args.markdown:
        write_atomic(args.markdown, markdown)
    if args.json:  # NaN (a number that could not be computed) becomes null: JSON has no NaN
        write_atomic(args.json, json.dumps(json.loads(json.dumps(summary), parse_constant=lambda _: None),
                                           indent=2) + "\n")
    if args.annotations:
        write_atomic(args.annotations, json.dumps(to_annotations(latest(records), items, name_a, name_b), indent=2,
                                                  ensure_ascii=False) + "\n")


# 6. Judging sessions: a person at the terminal, or the LLM judge. Both resume where they stopped.

def judgment(annotator, item, names, first, verdict, **extra):
    return {"annotator": annotator, "item": item["id"], "model_a": names[0], "model_b": names[1], "first": first,
            "verdict": verdict, **extra, "len_a": words(item["out_a"]), "len_b": words(item["out_b"]),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def latest(records):
    """The last record per (annotator, item): judging again supersedes."""
    return {(r["annotator"], r["item"]): r for r in records}


def session(args, annotator):
    """What judging starts from: the two model names, the aligned items, the annotator's current judgments by item,
    and the judgments file open for appending."""
    name_a, name_b, items = prepare(args)
    records = load_judgments([args.judgments], resume=True)
    check_models(records, name_a, name_b)
    done = {item: r for (who, item), r in latest(records).items() if who == annotator}
    return (name_a, name_b), items, done, open(args.judgments, "ab", buffering=0)


def wrap(text, width, indent="  "):
    return "\n".join(line for paragraph in text.splitlines() or [""] for line in
                     textwrap.wrap(paragraph, width, initial_indent=indent, subsequent_indent=indent) or [""])


def ask(prompt, keys):
    """One key from the user; None on end of input or Ctrl-C, which we treat as quit."""
    while True:
        try:
            answer = input(prompt).strip().lower()
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        if len(answer) == 1 and answer in keys:
            return answer
        print(f"type one of: {' '.join(keys)}")


def run_human(args):
    if args.annotations:
        return import_annotations(args, args.annotator)
    names, items, done, file = session(args, args.annotator)
    width = max(20, shutil.get_terminal_size().columns - 1)
    print(wrap(f"{len(items)} items, {sum(i['id'] in done for i in items)} already judged by {args.annotator}. "
               "Which response is better? 1 or 2, t = tie, s = skip, b = back, q = quit.", width, ""))
    if args.rate:
        print("\n".join(wrap(f"{k} = {v}", width, "") for k, v in RATING_SCALE.items()))

    def next_unjudged(start):
        return next((n for n in range(start, len(items)) if items[n]["id"] not in done), len(items))

    i = next_unjudged(0)
    while i < len(items):
        item, earlier = items[i], done.get(items[i]["id"])
        first = order_first(args.seed, args.annotator, item["id"])  # the model shown as Response 1
        second = other(first)
        print("\n" + f"-- item {i + 1} of {len(items)} ({item['id']}) ".ljust(width, "-")[:width])
        print("Instruction:\n" + wrap(item["instruction"], width))
        if item["input"]:
            print("Input:\n" + wrap(item["input"], width))
        print("Response 1:\n" + wrap(item[f"out_{first}"], width))
        print("Response 2:\n" + wrap(item[f"out_{second}"], width))
        if earlier:
            said = {first: "Response 1", second: "Response 2"}.get(earlier["verdict"], earlier["verdict"])
            print(wrap(f"(your earlier verdict: {said}; answer again to replace it)", width, ""))
        key = ask("[1/2/t/s/b/q] > ", "12tsbq")
        if key in (None, "q"):
            break
        if key == "b":
            if i == 0:
                print("(this is the first item)")
            i = max(0, i - 1)
            continue
        verdict, ratings = {"1": first, "2": second, "t": "tie", "s": "skip"}[key], {}
        if args.rate and verdict != "skip":
            given = [ask(f"rate Response {n} [A-D] > ", "abcd") for n in "12"]
            if None in given:
                break
            ratings = {f"rating_{first}": given[0].upper(), f"rating_{second}": given[1].upper()}
        done[item["id"]] = judgment(args.annotator, item, names, first, verdict, **ratings)
        append_jsonl(file, done[item["id"]])
        i = next_unjudged(i + 1)
    file.close()
    left = sum(item["id"] not in done for item in items)
    print(wrap(f"{args.annotator}: {len(items) - left} of {len(items)} items judged"
               + (f"; {left} left, run the same command to continue" if left else "; done"), width, ""))


def run_judge(args):
    annotator = f"judge:{args.model}"
    if args.annotations:
        return import_annotations(args, annotator)
    import openai  # only the judge needs it; keeps the other subcommands quick to start
    from tqdm import tqdm
    names, items, done, file = session(args, annotator)
    cache_path = args.cache or os.path.splitext(args.judgments)[0] + ".cache.jsonl"
    answers = {r["key"]: r["answer"] for r in resume_jsonl(cache_path)}  # cache key -> the judge's answer
    cache = open(cache_path, "ab", buffering=0)
    # The client retries 408, 409, 429, 5xx and network errors itself, with backoff or as Retry-After asks.
    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                           max_retries=args.max_retries, timeout=args.timeout)
    todo, identical, failures, tokens, stop = [], 0, [], [], threading.Event()  # tokens: (in, out) per call

    def usd():
        return sum(t_in * args.price_in + t_out * args.price_out for t_in, t_out in tokens) / 1e6

    def ask_judge(task):
        """Ask for each order not answered yet, while the budget lasts (the one stop the client does not make)."""
        item, _, keys = task
        for first, key in keys.items():
            if key in answers or stop.is_set() or usd() >= args.max_usd:
                continue
            try:
                response = client.chat.completions.create(
                    model=args.model, temperature=args.temperature, max_tokens=args.max_new_tokens,
                    messages=judge_messages(item["instruction"], item["input"], item[f"out_{first}"],
                                            item[f"out_{other(first)}"]))
            except openai.OpenAIError as e:  # what is left after the client's retries: stop, with one message
                stop.set()
                raise SystemExit(f"judge API error on item {item['id']}: {e}")
            answer, usage = response.choices[0].message.content or "", response.usage
            used = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
            tokens.append(used)
            if parse_verdict(answer, first) is not None:  # unparseable answers are asked again on a rerun
                append_jsonl(cache, {"key": key, "model": args.model, "prompt_version": PROMPT_VERSION,
                                     "answer": answer, "tokens_in": used[0], "tokens_out": used[1]})
            answers[key] = answer
            bar.update(1)
        return task

    for item in items:
        firsts = [order_first(args.seed, annotator, item["id"])] if args.single_order else ["a", "b"]
        text = (item["instruction"], item["input"])
        pair_key = digest(args.model, PROMPT_VERSION, *text, item["out_a"], item["out_b"], firsts)
        if done.get(item["id"], {}).get("pair_key") == pair_key:
            continue
        if item["out_a"].strip() == item["out_b"].strip():
            identical += 1
            append_jsonl(file, judgment(annotator, item, names, None, "tie", prompt_version=PROMPT_VERSION,
                                        pair_key=pair_key, orders=[], note="identical outputs"))
        else:
            todo.append((item, pair_key, {f: digest(args.model, PROMPT_VERSION, *text, item[f"out_{f}"],
                                                    item[f"out_{other(f)}"]) for f in firsts}))
    keys = [k for _, _, ks in todo for k in ks.values()]
    cached, to_ask = sum(k in answers for k in keys), {k for k in keys if k not in answers}
    # --concurrency items at a time, each asked in its orders; judgments are written in the items' order.
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool, \
            tqdm(total=len(to_ask), desc="judge", disable=not to_ask) as bar:
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
                    append_jsonl(file, judgment(annotator, item, names, orders[0]["first"],
                                                verdicts.pop() if len(verdicts) == 1 else "tie",
                                                prompt_version=PROMPT_VERSION, pair_key=pair_key, orders=orders))
        finally:
            stop.set()  # after an error or Ctrl-C too: the items still queued ask nothing
    file.close()
    cache.close()

    print(f"{annotator}: {len(items)} items; {len(items) - len(todo) - identical} already judged, {identical} "
          f"identical outputs (tie, no call), {cached} answers from the cache, {len(tokens)} API calls")
    print(f"tokens: {sum(t for t, _ in tokens)} in, {sum(t for _, t in tokens)} out; cost ${usd():.4f} "
          f"(at ${args.price_in}/${args.price_out} per 1M tokens)")
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


# 7. alpaca_eval's annotations.json: output_1 is the reference and output_2 the model under evaluation; preference 1
# means output_1 is better, 2 output_2, 1.5 (0 in old files) a tie, values between a weighted verdict, -1 or null no
# verdict. So A, the model being evaluated, is written as output_2 and alpaca_eval's win rate is A's (ties half).
PREFERENCE = {"b": 1, "a": 2, "tie": 1.5}


def merged_instruction(item):
    return f"{item['instruction']}\n\n{item['input']}" if item["input"] else item["instruction"]  # alpaca_eval's way


def to_annotations(current, items, name_a, name_b):
    raters = sorted({annotator for annotator, _ in current})
    return [{"instruction": merged_instruction(item), "output_1": item["out_b"], "generator_1": name_b,
             "output_2": item["out_a"], "generator_2": name_a, "annotator": annotator,
             "preference": PREFERENCE[r["verdict"]]}
            for item in items for annotator in raters
            for r in [current.get((annotator, item["id"]))] if r and r["verdict"] != "skip"]


def import_annotations(args, annotator):
    """Append the verdicts of an alpaca_eval annotations file as `annotator`'s judgments. Annotations align on the
    instruction (input folded in, as alpaca_eval does) and must show the outputs of --a and --b, in either order.
    Rerunning appends nothing new."""
    names, items, done, file = session(args, annotator)
    by_text = {merged_instruction(item): item for item in items}
    problems, found, unusable = [], {}, 0
    for where, r in read_records(args.annotations):
        item, p = by_text.get(merged_instruction(parse_item(where, r))), r.get("preference")
        pair = (string(where, r, "output_1").strip(), string(where, r, "output_2").strip())
        if item is None:
            problems.append(f"{where}: instruction {r['instruction'][:50]!r} is not one of the {len(items)} items")
            continue
        ab, ba = (item["out_a"].strip(), item["out_b"].strip()), (item["out_b"].strip(), item["out_a"].strip())
        if pair not in (ab, ba):
            problems.append(f"{where}: item {item['id']!r}: the outputs are not those of {args.a} and {args.b}")
        elif item["id"] in found:
            problems.append(f"{where}: item {item['id']!r} annotated twice (also at {found[item['id']][0]})")
        elif p is None or p == -1 or p != p:  # p != p: NaN
            unusable += 1
        elif isinstance(p, bool) or not isinstance(p, (int, float)) or not (p == 0 or 1 <= p <= 2):
            problems.append(f"{where}: field 'preference' is {p!r}, not 0 or a number from 1 to 2")
        else:
            models = ("b", "a") if pair == ba else ("a", "b")  # the models shown as output_1, output_2
            verdict = "tie" if p in (0, 1.5) or ab == ba else models[0] if p < 1.5 else models[1]
            found[item["id"]] = (where, item, verdict, p)
    stop_on_problems(problems, args.allow_missing, f"problem(s) in {args.annotations}; pass --allow_missing to "
                     "import the rest", f"leaving {len(problems)} annotation(s) out")
    added = 0
    for item_id, (where, item, verdict, p) in found.items():
        key = digest("annotations", item["out_a"], item["out_b"], verdict, p)
        if done.get(item_id, {}).get("pair_key") != key:
            append_jsonl(file, judgment(annotator, item, names, None, verdict, pair_key=key, preference=p,
                                        source=where))
            added += 1
    file.close()
    print(f"{annotator}: {len(found)} verdicts in {args.annotations} ({added} new, {unusable} annotations without "
          f"one); {len(items) - len(found)} of {len(items)} items not annotated")


# 8. Files. Inputs are read whole and checked first; judgments and the judge's cache are append-only JSONL.

def read_records(path):
    """(where, record) for each object of a JSON array or a JSONL file; `where` ("file:line" or "file: item i")
    starts error messages. A torn last JSONL line (no newline, not JSON: a killed writer) is left out with a note;
    any other line that is not JSON is an error."""
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
    for where in [where for where, r in records if not isinstance(r, dict)][:1]:
        raise SystemExit(f"{where}: expected a JSON object")
    return records


def resume_jsonl(path):
    """The records of an append-only JSONL file about to be appended to, each with its `where`; [] if absent.
    A last line with no newline is the torn write of a killed process: it is cut off, and we say so."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data.lstrip().startswith(b"["):
            raise SystemExit(f"{path}: a JSON array cannot be appended to; judge into a JSONL file")
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            print(f"{path}: cut off a torn last line (the write of a killed process)", file=sys.stderr)
    return [dict(r, where=where) for where, r in read_records(path)]


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


def load_judgments(paths, resume=False):
    """The checked judgment records of the files, each with its `where`; resume: see resume_jsonl."""
    records = []
    for path in paths:
        records += resume_jsonl(path) if resume else [dict(r, where=where) for where, r in read_records(path)]
    for r in records:
        for field in ("annotator", "item", "model_a", "model_b", "verdict"):
            if not string(r["where"], r, field):
                raise SystemExit(f"{r['where']}: field '{field}' is empty")
        if r["verdict"] not in VERDICTS:
            raise SystemExit(f"{r['where']}: field 'verdict' is {r['verdict']!r}, not one of {', '.join(VERDICTS)}")
        if r.get("first") not in ("a", "b", None):
            raise SystemExit(f"{r['where']}: field 'first' is {r['first']!r}, not 'a' or 'b'")
    return records


def check_models(records, name_a, name_b):
    for r in records:
        if (r["model_a"], r["model_b"]) != (name_a, name_b):
            raise SystemExit(f"{r['where']}: this judgment compares {r['model_a']!r} (A) with {r['model_b']!r} (B), "
                             f"not {name_a!r} with {name_b!r}")


def stop_on_problems(problems, allow_missing, stop, go_on):
    """List the problems (the first 30); stop with `stop` unless --allow_missing, then go on saying `go_on`."""
    if problems:
        shown = "\n".join(problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else []))
        if not allow_missing:
            raise SystemExit(f"{shown}\n{len(problems)} {stop}")
        print(f"{shown}\n--allow_missing: {go_on}", file=sys.stderr)


def digest(*parts):
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:24]


def words(text):
    return len(text.split())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    human = commands.add_parser("human", help="blind judging session in the terminal")
    judge = commands.add_parser("judge", help="LLM judge through an OpenAI-compatible API, in both orders")
    report = commands.add_parser("report", help="win rates, confidence intervals, agreement, position and length")
    for p in (human, judge, report):
        p.add_argument("--a", required=p is not report, help="outputs of model A (JSONL or JSON array)")
        p.add_argument("--b", required=p is not report, help="outputs of model B")
        p.add_argument("--name_a", help="name of model A (default: the 'generator' field, else the file name)")
        p.add_argument("--name_b", help="name of model B")
        p.add_argument("--eval_set", help="self-instruct style eval set that fixes the item list and order")
        p.add_argument("--allow_missing", action="store_true", help="leave out (and list) problem items, not stop")
        p.add_argument("--seed", type=int, default=0, help="seed for the order of responses and the bootstrap")
    for p in (human, judge):
        p.add_argument("--judgments", default="judgments.jsonl", help="append-only judgments file")
        p.add_argument("--annotations", help="import the verdicts of an alpaca_eval annotations.json instead")
    report.add_argument("--judgments", nargs="+", default=["judgments.jsonl"], help="one or more judgments files")
    report.add_argument("--annotations", help="write alpaca_eval's annotations.json here (needs --a, --b)")
    human.add_argument("--annotator", required=True, help="your name; each annotator resumes where they stopped")
    human.add_argument("--rate", action="store_true", help="also rate each response A-D (self-instruct scale)")
    judge.add_argument("--model", default="gpt-4o-mini", help="judge model (and annotator name: judge:<model>)")
    judge.add_argument("--base_url", default=None, help="OpenAI-compatible API (default OpenAI's; OPENAI_API_KEY)")
    judge.add_argument("--max_retries", type=int, default=6, help="the client's retries (408, 409, 429, 5xx)")
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    judge.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    judge.add_argument("--max_usd", type=float, default=5.0, help="stop sending requests once this much is spent")
    judge.add_argument("--price_in", type=float, default=0.15, help="USD per 1M prompt tokens")
    judge.add_argument("--price_out", type=float, default=0.60, help="USD per 1M completion tokens")
    judge.add_argument("--temperature", type=float, default=0.0)
    judge.add_argument("--max_new_tokens", type=int, default=512, help="length limit of the judge's answer")
    judge.add_argument("--single_order", action="store_true", help="ask each pair in one (seeded) order, not both")
    judge.add_argument("--cache", help="cache of judge answers (default: <judgments>.cache.jsonl)")
    judge.add_argument("--allow_failures", action="store_true", help="exit 0 even if some answers had no verdict")
    report.add_argument("--markdown", help="also write the report here")
    report.add_argument("--json", help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    {"human": run_human, "judge": run_judge, "report": run_report}[args.command](args)


if __name__ == "__main__":
    main()
