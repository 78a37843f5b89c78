"""Generate instruction-following data the Alpaca way (a simplified self-instruct): a teacher model is shown 3
human-written seed tasks and continues the numbered list up to task 20; the new tasks are parsed, filtered (length,
blocked words, near-duplicates by ROUGE-L) and appended to a JSONL file as they pass. Rerun to resume.

    OPENAI_API_KEY=... python generate_instructions.py --num_instructions=52000 --export=alpaca_data.json
    python generate_instructions.py --dry_run --price_in=1.5 --price_out=2
"""
import argparse
import json
import os
import random
import re
import string
import sys
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import openai
from rouge_score.tokenize import tokenize as rouge_tokenize
from tqdm import tqdm

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed_tasks", default="seed_tasks.jsonl", help="self-instruct seed tasks (JSONL)")
    p.add_argument("--out", default="regen.jsonl", help="kept instructions, appended; rerun to resume")
    p.add_argument("--export", default=None, help="also write the {instruction,input,output} JSON array here")
    p.add_argument("--export_seeds", action="store_true", help="export the seeds too (Alpaca's data has none)")
    p.add_argument("--num_instructions", type=int, default=100, help="target number of kept instructions")
    p.add_argument("--num_prompt_instructions", type=int, default=3, help="seed examples shown per prompt")
    p.add_argument("--rouge_threshold", type=float, default=0.7, help="drop if ROUGE-L to any kept is above")
    p.add_argument("--seed", type=int, default=42, help="makes the sampled seed examples reproducible")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default: OpenAI)")
    p.add_argument("--model", default="gpt-3.5-turbo-instruct")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=3072)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--max_retries", type=int, default=6, help="the client's retries per request (429, 5xx, network)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max_usd", type=float, default=None, help="stop starting requests at this spend")
    p.add_argument("--max_requests", type=int, default=0, help="stop after this many requests (0: no limit)")
    p.add_argument("--price_in", type=float, default=0.0, help="USD per 1M prompt tokens")
    p.add_argument("--price_out", type=float, default=0.0, help="USD per 1M completion tokens")
    p.add_argument("--dry_run", action="store_true", help="print one prompt and the projected cost")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.max_retries < 0 or args.num_prompt_instructions < 1:
        p.error("--concurrency and --num_prompt_instructions must be >= 1, --max_retries >= 0")
    return args

# 1. The prompt: asked for 20 tasks and shown 3, the teacher writes tasks 4..19 and stops when it starts task 20.
NUM_TASKS_PER_PROMPT = 20
PREAMBLE = f"""\
Write {NUM_TASKS_PER_PROMPT} new tasks for testing how well a language model follows instructions. \
Each task has an instruction, an input (which may be empty) and the output a careful assistant would give.

Requirements:
1. Vary the wording: use a different main verb in each instruction, and mix commands with questions.
2. Vary the kind of task: brainstorming, open questions, classification, rewriting, summarizing, extraction, \
reasoning, coding, and so on.
3. Every task must be doable by a text-only language model: nothing that needs seeing, drawing, listening, \
browsing or acting in the world (no pictures, no alarms, no reminders).
4. Write in English. An instruction is one or two sentences, a command or a question.
5. When a task needs an input, give a concrete and realistic one (a real passage, list, sentence, table or \
piece of code), never a placeholder, and keep it under 100 words. When it needs none, write <noinput> as the input.
6. The output must correctly and completely answer the instruction and the input, in fewer than 100 words.

Tasks:
"""

def load_seed_tasks(path):
    """Self-instruct seed tasks, one JSON object a line, as {instruction, input, output} (from instances[0])."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: seed file not found (set --seed_tasks)")
    seeds = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_no}: not valid JSON ({e})")
            if not isinstance(task, dict):
                raise SystemExit(f"{path}:{line_no}: expected a JSON object")
            if not isinstance(task.get("instruction"), str) or not task["instruction"].strip():
                raise SystemExit(f"{path}:{line_no}: field 'instruction' missing or not a non-empty string")
            if not isinstance(instances := task.get("instances") or [None], list) or not isinstance(instances[0], dict):
                raise SystemExit(f"{path}:{line_no}: field 'instances' missing or not a non-empty list of objects")
            for field in ("input", "output"):
                if not isinstance(instances[0].get(field), str):
                    raise SystemExit(f"{path}:{line_no}: field 'instances[0].{field}' missing or not a string")
            seeds.append({"instruction": task["instruction"], **{k: instances[0][k] for k in ("input", "output")}})
    if not seeds:
        raise SystemExit(f"{path}: no seed tasks")
    return seeds

def encode_prompt(examples):
    prompt = PREAMBLE
    for i, example in enumerate(examples, 1):
        instruction = re.sub(r"\s+", " ", example["instruction"]).strip().rstrip(":")
        prompt += f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{example['input'].strip() or '<noinput>'}\n"
        prompt += f"{i}. Output:\n{example['output']}\n"
    return prompt + f"###\n{len(examples) + 1}. Instruction:"

# 2. Parsing the reply into tasks.
TASK_RE = re.compile(r"\A\s*\d+\s*\.\s*Instruction:(.*?)^\s*\d+\s*\.\s*Input:(.*?)^\s*\d+\s*\.\s*Output:(.*)\Z",
                     re.DOTALL | re.MULTILINE)

def parse_response(text, finish_reason, num_prompt_instructions, rejected):
    """Split a continuation into {instruction, input, output} tasks; count what cannot be used in `rejected`."""
    # A completion continues right after "N. Instruction:"; a chat reply usually restates the header itself.
    if not re.match(r"\s*(###\s*)?\d+\s*\.\s*Instruction:", text):
        text = f"{num_prompt_instructions + 1}. Instruction:" + text
    blocks = re.split(r"###|\n(?=\s*\d+\s*\.\s*Instruction:)", text)
    if finish_reason == "length" and blocks.pop().strip():  # the model was cut off in the middle of its last task
        rejected["truncated"] += 1
    tasks = []
    for block in filter(str.strip, blocks):
        if not (match := TASK_RE.match(block)):
            rejected["unparseable"] += 1
            continue
        instruction, task_input, output = (part.strip() for part in match.groups())
        tasks.append({"instruction": instruction, "input": "" if task_input.lower() == "<noinput>" else task_input,
                      "output": output})
    return tasks

# 3. The filters of the original recipe. Keep instructions of MIN_WORDS < words <= MAX_WORDS.
MIN_WORDS, MAX_WORDS = 3, 150
# A text-only model cannot see, draw, play or open anything, so tasks that ask for it are dropped.
BLOCKED_WORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
BLOCKED_RE = re.compile(r"\b(" + "|".join(BLOCKED_WORDS) + r")\b", re.IGNORECASE)

def filter_task(task, index, rouge_threshold):
    """Why the task is rejected, the first filter that fails; or None after adding the recipe's similarity fields."""
    instruction = task["instruction"]
    num_words, first = len(instruction.split()), instruction[:1]  # too_short comes first: "" never gets further
    failed = {"too_short": num_words <= MIN_WORDS, "too_long": num_words > MAX_WORDS,
              "blocked_word": BLOCKED_RE.search(instruction),
              "write_a_program": instruction.startswith("Write a program"),  # overused, and unclear what to output
              "starts_with_punctuation": first in string.punctuation, "non_ascii_start": not first.isascii()}
    if reason := next((name for name, fails in failed.items() if fails), None):
        return reason
    scores = index.scores(instruction)  # ROUGE-L against the seeds and everything kept so far
    if scores.max() > rouge_threshold:
        return "too_similar"
    top = np.argsort(-scores, kind="stable")[:10]  # the recipe keeps the 10 most similar
    task["most_similar_instructions"] = {index.texts[i]: float(scores[i]) for i in top}
    task["avg_similarity_score"] = float(np.mean(scores))
    return None

# 4. The loop: requests in flight; each reply's tasks filtered, and appended to --out as they pass.
MAX_FAILED_IN_A_ROW = 3  # requests that fail for good (after the client's retries), back to back, before we stop

def main(argv=None):
    args = parse_args(argv)
    seeds = load_seed_tasks(args.seed_tasks)
    if args.num_prompt_instructions > len(seeds):
        raise SystemExit(f"--num_prompt_instructions={args.num_prompt_instructions} but only {len(seeds)} seeds")
    if args.max_usd is not None and args.price_in <= 0 and args.price_out <= 0:
        raise SystemExit("--max_usd needs --price_in and --price_out (USD per 1M tokens)")
    kept = resume_jsonl(args.out)
    for line_no, record in enumerate(kept, 1):
        for field in ("instruction", "input", "output"):
            if not isinstance(record.get(field) if isinstance(record, dict) else None, str):
                raise SystemExit(f"{args.out}:{line_no}: field '{field}' missing or not a string")
    rng = random.Random(f"{args.seed}:{len(kept)}")  # the prompts depend only on --seed and how much is kept
    if args.dry_run:  # one prompt, and a projection: the teacher writes the rest of the 20 tasks at the seeds' length
        prompt = encode_prompt(rng.sample(seeds, args.num_prompt_instructions))
        todo = max(args.num_instructions - len(kept), 0)
        per_request = NUM_TASKS_PER_PROMPT - args.num_prompt_instructions - 1
        requests = int(np.ceil(todo / (per_request * 0.5)))
        task_tokens = np.mean([len(s["instruction"]) + len(s["input"]) + len(s["output"]) + 40 for s in seeds]) / 4
        tokens = dict(prompt_tokens=requests * len(prompt) / 4, completion_tokens=requests * per_request * task_tokens)
        print(f"{prompt}\n\nprojected for {todo} more instructions: ~{requests} requests, "
              f"~{tokens['prompt_tokens'] / 1e6:.2f}M prompt + ~{tokens['completion_tokens'] / 1e6:.2f}M completion "
              f"tokens, ~${cost_usd(args, tokens):.2f} at ${args.price_in}/${args.price_out} per 1M tokens "
              "(assuming 4 chars/token and 50% of tasks kept)")
        return
    if not os.environ.get("OPENAI_API_KEY"):
        raise SystemExit("OPENAI_API_KEY is not set (a local server accepts any value, e.g. OPENAI_API_KEY=none)")
    client = openai.OpenAI(base_url=args.base_url, max_retries=args.max_retries, timeout=args.timeout)
    index = RougeIndex()
    for text in [s["instruction"] for s in seeds] + [r["instruction"] for r in kept]:
        index.add(text)
    stats, rejected, failures, failed_in_a_row = Counter(), Counter(), [], 0
    pool, pending = ThreadPoolExecutor(args.concurrency), set()
    try:
        with (open(args.out, "a", encoding="utf-8") as out,
              tqdm(total=args.num_instructions, initial=len(kept), unit="inst", dynamic_ncols=True) as progress):
            while True:
                while (len(pending) < args.concurrency and len(kept) < args.num_instructions
                       and failed_in_a_row < MAX_FAILED_IN_A_ROW and not 0 < args.max_requests <= stats["requests"]
                       and (args.max_usd is None or within_budget(args, stats, len(pending)))):
                    prompt = encode_prompt(rng.sample(seeds, args.num_prompt_instructions))
                    pending.add(pool.submit(call_api, client, args, prompt))
                    stats["requests"] += 1
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        text, finish_reason, prompt_tokens, completion_tokens = future.result()
                    except (openai.APIError, ValueError) as e:  # still failing after the client's retries
                        failures.append(f"{type(e).__name__}: {e}"[:300])
                        failed_in_a_row += 1
                        progress.write(f"request failed for good: {failures[-1]}", file=sys.stderr)
                        continue
                    failed_in_a_row = 0
                    if args.max_usd is not None and prompt_tokens + completion_tokens == 0:
                        raise SystemExit(f"{client.base_url}: the server reports no token usage, so --max_usd "
                                         f"cannot be enforced; run without it")
                    stats.update(requests_ok=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
                    for task in parse_response(text, finish_reason, args.num_prompt_instructions, rejected):
                        if len(kept) >= args.num_instructions:
                            break
                        if reason := filter_task(task, index, args.rouge_threshold):
                            rejected[reason] += 1
                            continue
                        append_jsonl(out, task)
                        index.add(task["instruction"])
                        kept.append(task)
                        progress.update(1)
                    progress.set_postfix(requests=stats["requests_ok"], rejected=sum(rejected.values()),
                                         tokens=f"{stats['prompt_tokens']}+{stats['completion_tokens']}",
                                         usd=f"{cost_usd(args, stats):.4f}", refresh=False)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

    spent = cost_usd(args, stats)
    print(f"kept {len(kept)}/{args.num_instructions} instructions in {args.out}; requests: {stats['requests_ok']} ok, "
          f"{len(failures)} failed; tokens: {stats['prompt_tokens']} prompt + {stats['completion_tokens']} completion "
          f"(${spent:.4f})")
    print("rejected: " + (", ".join(f"{k}={v}" for k, v in rejected.most_common()) or "none"))
    if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
        raise SystemExit(f"{client.base_url}: giving up after {failed_in_a_row} requests failed in a row "
                         f"(last: {failures[-1]})")
    if len(kept) < args.num_instructions and args.max_usd is not None:
        print(f"stopped at the budget: spent ${spent:.4f} of --max_usd ${args.max_usd}")
    if len(kept) < args.num_instructions and stats["requests"] == args.max_requests:
        print(f"stopped after --max_requests={args.max_requests}")
    if args.export:
        records = [{k: r[k] for k in ("instruction", "input", "output")}
                   for r in (seeds if args.export_seeds else []) + kept]
        write_atomic(args.export, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        print(f"exported {len(records)} examples to {args.export}"
              + (f" ({len(seeds)} seed tasks, {len(kept)} generated)" if args.export_seeds else ""))
    return dict(stats, kept=len(kept), failed=len(failures), rejected=dict(rejected), usd=spent)

def cost_usd(args, stats):
    return (stats["prompt_tokens"] * args.price_in + stats["completion_tokens"] * args.price_out) / 1e6

def within_budget(args, stats, num_pending):
    """Whether one more request fits --max_usd, counting those in flight at the average price so far."""
    spent = cost_usd(args, stats)
    if stats["requests_ok"] == 0:  # no idea of the price of a request yet: learn it from one
        return num_pending == 0 and spent < args.max_usd
    return spent + (num_pending + 1) * spent / stats["requests_ok"] <= args.max_usd

# Plumbing. ROUGE-L, exact and fast: every new instruction is compared with all kept so far (1.4G pairs for 52K).
def rouge_tokens(text):  # rouge_score's own tokenizer without stemming: lowercase, [a-z0-9]+ runs
    return rouge_tokenize(text, None)

class RougeIndex:
    """ROUGE-L F-measures of a text against every text added so far, identical to rouge_score's (whose Python LCS
    table the original recipe runs for every pair, in a process pool). Each stored text is kept as bit masks (bit j
    set where token j is a given word), and the LCS of a new text with all of them is found at once by the
    bit-parallel recurrence (Hyyro 2004), one numpy step per token. Texts are grouped by 64-bit words per mask."""

    def __init__(self):
        # groups: num_words -> n texts, their "rows" (order added) and "lengths", and "postings": token id -> (the
        # group's texts holding it, its positions in each as a mask of num_words words, count)
        self.size, self.vocab, self.texts, self.groups = 0, {}, [], {}

    def add(self, text):
        tokens = rouge_tokens(text)
        self.size += 1
        self.texts.append(text)
        if not tokens:  # scores 0 against everything, like rouge_score
            return
        num_words = (len(tokens) + 63) // 64
        g = self.groups.setdefault(num_words, {"n": 0, "rows": np.zeros(1, np.int64),
                                               "lengths": np.zeros(1, np.int64), "postings": {}})
        row, g["n"] = g["n"], g["n"] + 1
        g["rows"], g["lengths"] = _put(g["rows"], row, self.size - 1), _put(g["lengths"], row, len(tokens))
        positions = {}
        for j, token in enumerate(tokens):
            token_id = self.vocab.setdefault(token, len(self.vocab))
            positions[token_id] = positions.get(token_id, 0) | (1 << j)
        for token_id, bits in positions.items():
            rows, masks, count = g["postings"].get(token_id) or (np.zeros(1, np.int64),
                                                                 np.zeros((num_words, 1), np.uint64), 0)
            words = [(bits >> (64 * w)) & 0xFFFFFFFFFFFFFFFF for w in range(num_words)]
            g["postings"][token_id] = (_put(rows, count, row), _put(masks, count, words), count + 1)

    def scores(self, text):
        """F-measure against each added text, in the order they were added (as rouge_score's _score_lcs)."""
        result, tokens = np.zeros(self.size), rouge_tokens(text)
        if not tokens:
            return result
        for num_words, g in self.groups.items():
            n, matches = g["n"], {}
            # v, a bit vector per stored text: per token, v = (v + u) | (v & ~match) with u = v & match. Bits past a
            # text's length stay 1 (its masks are 0 there; a carry into them is undone by the |): 0 bits count the LCS.
            v = np.full((num_words, n), np.iinfo(np.uint64).max, np.uint64)
            for token_id in map(self.vocab.get, tokens):
                if token_id not in g["postings"]:  # in no stored text of this group: nothing changes
                    continue
                if token_id not in matches:
                    rows, masks, count = g["postings"][token_id]
                    matches[token_id] = np.zeros((num_words, n), np.uint64)
                    matches[token_id][:, rows[:count]] = masks[:, :count]
                u = v & matches[token_id]
                if num_words == 1:  # most texts: one word, no carries
                    rest = v ^ u
                    np.add(v, u, out=v)
                    np.bitwise_or(v, rest, out=v)
                    continue
                carry = np.zeros(n, bool)
                for w in range(num_words):  # v[w] + u[w] + carry: it carries out if either addition wraps around
                    total = v[w] + u[w]
                    v[w], carry = (total + carry) | (v[w] ^ u[w]), (total < v[w]) | (total + carry < carry)
            lcs = np.bitwise_count(~v).sum(axis=0, dtype=np.int64)
            # Same float operations, in the same order, as rouge_score (target = new text, prediction = stored).
            precision, recall = lcs / g["lengths"][:n], lcs / len(tokens)
            f = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=lcs > 0)
            result[g["rows"][:n]] = f
        return result

def _put(array, i, value):  # array[..., i] = value, doubling the last axis when it is full: amortized O(1) appends
    if i == array.shape[-1]:
        array = np.concatenate([array, np.zeros_like(array)], axis=-1)
    array[..., i] = value
    return array

# The API. The client retries 408/409/429/5xx and network errors (with backoff, or as Retry-After asks). A server
# that cannot give --max_new_tokens (a local one has a cap and a short context) says so with a 400; then, as the
# original did on "reduce your prompt", we ask for what it can give; below MIN_NEW_TOKENS no whole task fits: stop.
MIN_NEW_TOKENS, LOWERING = 256, threading.Lock()

def call_api(client, args, prompt):  # -> text, finish_reason, prompt_tokens, completion_tokens
    create = client.chat.completions.create if args.api == "chat" else client.completions.create
    payload = {"messages": [{"role": "user", "content": prompt}]} if args.api == "chat" else {"prompt": prompt}
    asked = args.max_new_tokens
    try:
        response = create(model=args.model, max_tokens=asked, temperature=args.temperature, top_p=args.top_p,
                          stop=[f"\n{NUM_TASKS_PER_PROMPT}", f"{NUM_TASKS_PER_PROMPT}."], n=1, **payload)
    except openai.APIStatusError as e:
        if e.status_code in (408, 409, 429) or e.status_code >= 500:
            raise  # the client has retried it --max_retries times: this request failed
        if (allowed := tokens_allowed(e, asked)) is None:
            raise SystemExit(f"{client.base_url}: the server refused the request ({e.message}); check "
                             "OPENAI_API_KEY, --base_url, --model and --api")
        allowed = allowed if allowed < asked else asked // 2
        if allowed < MIN_NEW_TOKENS:
            raise SystemExit(f"{client.base_url}: the server gives at most {allowed} tokens per reply (it refused "
                             f"{asked}), fewer than the {MIN_NEW_TOKENS} a reply needs to hold a whole task; serve a "
                             "model with a longer context, or a shorter prompt (--num_prompt_instructions)")
        with LOWERING:  # requests in flight may all hit the limit at once: lower (and say so) once
            if allowed < args.max_new_tokens:
                args.max_new_tokens = allowed
                tqdm.write(f"the server gives at most {allowed} tokens per reply (it refused {asked}): "
                           f"asking for {allowed} from now on", file=sys.stderr)
        return call_api(client, args, prompt)  # again, asking for what the server can give
    try:  # a server may answer 200 with something that is not a completion
        choice, usage = response.choices[0], response.usage
        text = choice.message.content if args.api == "chat" else choice.text
        if not isinstance(text, str):
            raise TypeError
    except (AttributeError, IndexError, TypeError):
        raise ValueError(f"malformed response: {str(response)[:200]!r}")
    return text, choice.finish_reason, *(getattr(usage, k, 0) or 0 for k in ("prompt_tokens", "completion_tokens"))

def tokens_allowed(error, asked):
    """The most completion tokens a server says it can give, when it refused `asked` as too many (OpenAI's,
    vLLM's and sample.py --serve's wordings; half of `asked` when it gives no number); None for other errors."""
    body = error.body if isinstance(error.body, dict) else {}
    text = f"{body.get('param')}: {body.get('message') or error.message}"  # which parameter, and why
    if error.status_code != 400 or not re.search(r"max_(completion_)?tokens|in the completion", text):
        return None  # not about max_tokens (e.g. the prompt alone is too long): fewer tokens would not help
    if most := re.search(r"at most (\d+) completion tokens|expected a value <= (\d+)", text, re.IGNORECASE):
        return int(most.group(1) or most.group(2))
    context = re.search(r"maximum context length is (\d+) tokens", text)
    prompt = re.search(r"(\d+) in (?:the|your) (?:messages|prompt)|request has (\d+) input tokens", text)
    return int(context.group(1)) - int(prompt.group(1) or prompt.group(2)) if context and prompt else asked // 2

# Files. --out is append-only, one kept task a line, flushed: a killed run loses at most the line it was writing.
def resume_jsonl(path):
    """The records of an append-only JSONL file ([] if none). A last line without its newline is the torn write of a
    killed process: it is cut off the file. A complete line that does not parse is an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    whole, records = data.rfind(b"\n") + 1, []  # whole: the bytes up to the last newline
    for line_no, line in enumerate(data[:whole].split(b"\n")[:-1], 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
            raise SystemExit(f"{path}:{line_no}: not valid JSON ({e})")
    if whole < len(data):
        print(f"{path}: cutting off a torn last line ({len(data) - whole} bytes) of a killed run", file=sys.stderr)
        os.truncate(path, whole)
    return records

def append_jsonl(file, record):
    file.write(json.dumps(record, ensure_ascii=False) + "\n")
    file.flush()

def write_atomic(path, text):
    """Write to path.tmp, then rename: a crash leaves the old file or the new one, never half of one."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every kept task is on disk: exit now, not after the requests in flight
        print("\ninterrupted; rerun the same command to resume", flush=True)
        os._exit(130)
