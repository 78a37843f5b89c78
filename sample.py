"""
Sample from a fine-tuned (or base) LLaMA: one prompt, an interactive loop, or a whole evaluation file.

    python sample.py --checkpoint=out/tiny --prompt="Give three tips for staying healthy."
    python sample.py --checkpoint=out/tiny                                   # interactive; Ctrl-D or quit ends
    python sample.py --checkpoint=out/tiny --in=eval.jsonl --out=outputs.jsonl

Reads top to bottom: decoding settings, choosing the next token, the generation engine (KV cache, batches of
prompts of different lengths), then the three ways to use it. The model and the Alpaca prompt come from train.py,
so sampling sees exactly the text and the model that training did.
"""
import argparse
import json
import os
import sys
import time
import zlib

import torch

from train import Tokenizer, Transformer, format_prompt

# Decoding defaults. Greedy is --temperature=0; top_k=0 and top_p=1 switch those filters off.
max_new_tokens = 256
temperature = 0.7
top_k = 0
top_p = 0.9
seed = 1337
batch_size = 16


def sample_next(logits, temperature, top_k, top_p, u):
    """The next token of each row of logits (B, V). Greedy at temperature 0; otherwise drawn from the softmax,
    cut to the top_k most likely tokens, then to the smallest set of most likely tokens holding top_p of the
    probability. u (B,) in (0, 1] are each row's own uniform draws: the token is where u lands on the row's
    cumulative distribution, so a row's choice never depends on the other rows of the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    ids = None
    if 0 < top_k < probs.size(-1):
        probs, ids = probs.topk(top_k, dim=-1)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        if ids is None:
            probs, ids = probs.sort(dim=-1, descending=True)
        # Keep a token while the more likely ones before it hold less than top_p; the most likely always stays.
        probs = probs * (probs.cumsum(-1) - probs < top_p)
    cdf = probs.cumsum(-1)
    # Tokens cut above have zero width on the cdf, so no u in (0, 1] can land on them.
    choice = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp_(max=cdf.size(-1) - 1)
    return choice.squeeze(-1) if ids is None else ids.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             logits_processor=None, eos_id=None, on_token=None):
    """The new token ids for each prompt in prompts (lists of token ids), generated together as one batch.

    A row ends at eos_id (which is not included in its ids), after max_new_tokens, or at the model's context
    length. Every row comes out as if generated alone: prompts are left-padded and the padding is masked out,
    each row's positions start at 0, and each row draws its random numbers from its own stream, seeded by
    seed (an int, the same for every row) or seed[i] (a list, one per row).
    logits_processor(prev_tokens, logits) may rewrite each step's (B, V) logits (the watermark's hook);
    prev_tokens[i] is row i's prompt and generated ids so far. on_token(i, id) is called for each new id of
    row i as it is produced, for streaming. Holds no state between calls: serialize calls that share a model."""
    param = next(model.parameters())
    args = model.args
    device, dtype = param.device, param.dtype
    B, lengths = len(prompts), [len(p) for p in prompts]
    if B == 0:
        return []
    if min(lengths) == 0 or max(lengths) >= args.max_seq_len:
        raise ValueError(f"prompts must have 1 to {args.max_seq_len - 1} tokens, got {min(lengths)}..{max(lengths)}")
    budget = [min(max_new_tokens, args.max_seq_len - n) for n in lengths]
    steps, L = max(budget), max(lengths)
    if steps <= 0:
        return [[] for _ in prompts]
    S = L + steps

    # Left padding lines up every row's last prompt token at slot L-1, so one decode step serves all rows.
    # Pad slots are masked out of every row's attention, and positions count from each row's first real token.
    pad = torch.tensor([L - n for n in lengths], device=device)
    slots = torch.arange(S, device=device)
    positions = (slots - pad[:, None]).clamp(min=0)
    real = slots >= pad[:, None]  # (B, S): which cache slots hold a row's own tokens
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # A pad query sees only itself: one that sees nothing gives NaN on some backends, and NaN would reach the cache.
    prefill_mask = (causal & real[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
    decode_mask = real[:, None, None, :] if L > min(lengths) else None
    n_kv_heads, head_dim = args.n_kv_heads or args.n_heads, args.dim // args.n_heads
    cache = [(torch.zeros(B, n_kv_heads, S, head_dim, device=device, dtype=dtype),
              torch.zeros(B, n_kv_heads, S, head_dim, device=device, dtype=dtype)) for _ in range(args.n_layers)]

    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * B
    uniforms = torch.stack([1 - torch.rand(steps, generator=torch.Generator().manual_seed(s)) for s in seeds])
    uniforms = uniforms.to(device)
    history = [list(p) for p in prompts]
    new_ids = [[] for _ in prompts]
    running = [True] * B

    tokens = torch.tensor([[0] * (L - n) + list(p) for n, p in zip(lengths, prompts)], device=device)
    logits = model(tokens, positions[:, :L], prefill_mask[:, None], cache=cache)[:, -1]
    for step in range(steps):
        if logits_processor is not None:
            logits = logits_processor(history, logits)
        next_tokens = sample_next(logits, temperature, top_k, top_p, uniforms[:, step])
        for i, token in enumerate(next_tokens.tolist()):
            history[i].append(token)
            if not running[i]:
                continue
            if token == eos_id:
                running[i] = False
                continue
            new_ids[i].append(token)
            if on_token is not None:
                on_token(i, token)
            running[i] = len(new_ids[i]) < budget[i]
        if not any(running):
            break
        pos = L + step
        mask = None if decode_mask is None else decode_mask[..., :pos + 1]
        logits = model(next_tokens[:, None], positions[:, pos:pos + 1], mask, cache=cache, cache_pos=pos)[:, -1]
    return new_ids


def stream_printer(tokenizer):
    """An on_token callback that prints a response as it grows. Pieces are decoded as a whole and only the new
    suffix printed, since sentencepiece joins pieces (spaces, bytes of one character) across token boundaries."""
    ids, shown = [], [""]

    def on_token(row, token):
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.startswith(shown[0]) and not text.endswith("\ufffd"):  # hold back a half-decoded character
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    def finish():
        text = tokenizer.decode(ids)
        print(text[len(shown[0]):] if text.startswith(shown[0]) else "", flush=True)
        return ids

    return on_token, finish


def read_items(path):
    """(id, instruction, input) for each instance of an evaluation file, checked before any work starts.
    Takes the Alpaca format ({instruction, input}, a JSON array or JSONL) and the self-instruct one
    ({id, instruction, instances: [{input}]}). An item's id is its 'id' (with /k for its k-th instance when it
    has several), else its line number in a JSONL file or its index in a JSON array."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
            if not isinstance(records, list):
                raise SystemExit(f"{path}: expected a JSON array of items")
            records = [(f"{path}: item {i}", str(i), record) for i, record in enumerate(records)]
        else:
            records = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{path}:{lineno}", str(lineno), json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg})")
    items, seen = [], {}
    for where, default_id, record in records:
        if not isinstance(record, dict):
            raise SystemExit(f"{where}: expected a JSON object")
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            problem = "missing" if instruction is None else "must be a string" if not isinstance(
                instruction, str) else "is empty"
            raise SystemExit(f"{where}: field 'instruction' {problem}")
        instances = record.get("instances", [record])
        if not isinstance(instances, list) or not instances:
            raise SystemExit(f"{where}: field 'instances' must be a non-empty list")
        base_id = str(record["id"]) if "id" in record else default_id
        for k, instance in enumerate(instances):
            input = instance.get("input", "") if isinstance(instance, dict) else None
            if not isinstance(input, str):
                raise SystemExit(f"{where}: field 'input' must be a string" + (f" (instance {k})" if
                                                                                 "instances" in record else ""))
            item_id = base_id if len(instances) == 1 else f"{base_id}/{k}"
            if item_id in seen:
                raise SystemExit(f"{where}: duplicate id '{item_id}' (first at {seen[item_id]})")
            seen[item_id] = where
            items.append({"id": item_id, "instruction": instruction, "input": input, "where": where})
    return items


def read_finished(path, settings):
    """The ids already in an output file, so a rerun skips them. A run killed mid-write can leave a torn last
    line: it is cut off here (its batch is redone). Lines written with other settings stop the run, since
    mixing them in one file would silently spoil an evaluation."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{path}: cutting a torn last line ({len(data) - end} bytes) left by an interrupted run")
        with open(path, "r+b") as f:
            f.truncate(end)
    finished = set()
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line")
        if not isinstance(record, dict) or "id" not in record:
            raise SystemExit(f"{path}:{lineno}: not an output line of sample.py (no 'id')")
        for key, value in {"watermark": None, **settings}.items():
            if record.get(key) != value:
                raise SystemExit(f"{path}:{lineno}: written with {key}={record.get(key)!r}, this run has "
                                 f"{value!r}; use another --out")
        finished.add(record["id"])
    return finished


def run_batches(model, tokenizer, items, args, settings, logits_processor):
    for item in items:
        item["prompt_ids"] = tokenizer.encode(format_prompt(item["instruction"], item["input"]), bos=True)
        if len(item["prompt_ids"]) >= model.args.max_seq_len:
            raise SystemExit(f"{item['where']}: the prompt is {len(item['prompt_ids'])} tokens, the model's "
                             f"context is {model.args.max_seq_len}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    finished = read_finished(args.out, settings)
    todo = [item for item in items if item["id"] not in finished]
    print(f"{len(items)} items, {len(items) - len(todo)} already in {args.out}, {len(todo)} to generate")
    # Prompts of similar length share a batch, so little compute goes to padding.
    todo.sort(key=lambda item: len(item["prompt_ids"]))
    from tqdm import tqdm
    with open(args.out, "a", encoding="utf-8") as out, tqdm(total=len(todo), unit="item") as progress:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            # Each item samples from its own stream, keyed by its id: its output does not depend on which
            # batch it lands in, so a resumed run gives the same outputs as an uninterrupted one.
            seeds = [zlib.crc32(f"{args.seed}/{item['id']}".encode()) for item in batch]
            outputs = generate(model, [item["prompt_ids"] for item in batch], args.max_new_tokens,
                               args.temperature, args.top_k, args.top_p, seeds, logits_processor,
                               tokenizer.eos_id)
            for item, ids in zip(batch, outputs):
                record = {"id": item["id"], "instruction": item["instruction"], "input": item["input"],
                          "output": tokenizer.decode(ids), **settings}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            progress.update(len(batch))
    # Batches ran in length order; leave the finished file in the input's order, replaced atomically.
    order = {item["id"]: i for i, item in enumerate(items)}
    with open(args.out, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    lines.sort(key=lambda line: order.get(json.loads(line)["id"], len(order)))
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


def answer(model, tokenizer, args, instruction, input, logits_processor, seed):
    prompt_ids = tokenizer.encode(format_prompt(instruction, input), bos=True)
    on_token, finish = stream_printer(tokenizer)
    start = time.time()
    try:
        generate(model, [prompt_ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed,
                 logits_processor, tokenizer.eos_id, on_token)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
        pass
    return len(finish()), time.time() - start


def interact(model, tokenizer, args, logits_processor):
    print("Type an instruction (and, when asked, an optional input). Ctrl-D or 'quit' ends.")
    turn = 0
    while True:
        try:
            instruction = input("\nInstruction: ").strip()
            if instruction in ("quit", "exit"):
                return
            if not instruction:
                continue
            input_text = input("Input (Enter for none): ").strip()
        except EOFError:
            print()
            return
        print("Response: ", end="", flush=True)
        answer(model, tokenizer, args, instruction, input_text, logits_processor, args.seed + turn)
        turn += 1


def load(args):
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"{args.checkpoint}: no such checkpoint folder")
    tokenizer_path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        raise SystemExit(f"{tokenizer_path}: no tokenizer; pass --tokenizer=path/to/tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    model = Transformer.from_pretrained(args.checkpoint, dtype=dtype).to(args.device).eval()
    if tokenizer.vocab_size > model.args.vocab_size:
        raise SystemExit(f"{tokenizer_path}: {tokenizer.vocab_size} tokens, more than the model's "
                         f"{model.args.vocab_size}")
    return model, tokenizer


def make_logits_processor(args, model, tokenizer):
    """The watermark, if asked for, and a ban on ids the tokenizer cannot decode (a model's vocabulary can be
    padded past its tokenizer's, and an untrained model may pick those ids)."""
    watermark = None
    if args.watermark:
        import watermark as wm  # only needed here, so sample.py runs without it
        watermark = wm.WatermarkProcessor(model.args.vocab_size, gamma=args.gamma, delta=args.delta,
                                          scheme=args.scheme, key=args.key)
    n_tokens = tokenizer.vocab_size
    if watermark is None and n_tokens == model.args.vocab_size:
        return None, None

    def process(prev_tokens, logits):
        if watermark is not None:
            logits = watermark(prev_tokens, logits)
        logits[:, n_tokens:] = float("-inf")
        return logits

    return process, watermark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="out/tiny", help="a Meta or Hugging Face LLaMA folder")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model (default: the checkpoint's)")
    parser.add_argument("--prompt", default=None, help="one instruction; without it, an interactive loop")
    parser.add_argument("--input", default="", help="the optional input that goes with --prompt")
    parser.add_argument("--in", default=None, help="an evaluation file (JSONL or JSON array) to answer in batches")
    parser.add_argument("--out", default="outputs.jsonl", help="JSONL of answers for --in; appended, resumable")
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 for greedy")
    parser.add_argument("--top_k", type=int, default=top_k, help="0 for no cut")
    parser.add_argument("--top_p", type=float, default=top_p, help="1 for no cut")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU that has it, else float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, fast steps)")
    parser.add_argument("--watermark", action="store_true", help="watermark the outputs (see watermark.py)")
    parser.add_argument("--gamma", type=float, default=0.25, help="watermark: fraction of green tokens")
    parser.add_argument("--delta", type=float, default=2.0, help="watermark: logit bonus of green tokens")
    parser.add_argument("--scheme", default="lefthash", help="watermark: how the green list is seeded")
    parser.add_argument("--key", type=int, default=15485863, help="watermark: secret key")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1 \
            or args.batch_size < 1:
        parser.error("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, batch_size >= 1")
    if args.dtype is None:
        gpu_bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        args.dtype = "bfloat16" if gpu_bf16 else "float32"
    items = read_items(getattr(args, "in")) if getattr(args, "in") else None  # bad input stops us here

    model, tokenizer = load(args)
    if args.compile:
        if args.device == "cpu":
            # Freezing lets inductor pack the weights for the CPU's matmul kernels once, not at every step.
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
        model = torch.compile(model, dynamic=True)
    logits_processor, watermark = make_logits_processor(args, model, tokenizer)
    settings = {"generator": os.path.basename(os.path.normpath(args.checkpoint)), "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if watermark is not None:
        settings["watermark"] = watermark.params

    if items is not None:
        run_batches(model, tokenizer, items, args, settings, logits_processor)
    elif args.prompt is not None:
        n_tokens, seconds = answer(model, tokenizer, args, args.prompt, args.input, logits_processor, args.seed)
        print(f"({n_tokens} tokens in {seconds:.1f}s)", file=sys.stderr)
    else:
        interact(model, tokenizer, args, logits_processor)


if __name__ == "__main__":
    main()
