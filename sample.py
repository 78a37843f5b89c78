"""Sample from a fine-tuned (or base) LLaMA: one prompt, an interactive loop, a whole evaluation file, or a web demo.

    python sample.py --checkpoint=out/tiny --prompt="Give three tips for staying healthy."
    python sample.py --checkpoint=out/tiny                                   # interactive; Ctrl-D or quit ends
    python sample.py --checkpoint=out/tiny --in=eval.jsonl --out=outputs.jsonl
    python sample.py --checkpoint=out/tiny --serve                           # web demo + OpenAI-compatible API

The lesson first, then plumbing, then the web demo. Model and prompt come from train.py, as training saw them."""
import argparse
import base64
import contextlib
import hashlib
import html
import json
import os
import queue
import re
import secrets
import sys
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import urlsplit

import torch

from train import Tokenizer, Transformer, find_tokenizer, format_prompt, read_records

# Decoding defaults. Greedy is --temperature=0; top_k=0 and top_p=1 switch those filters off.
max_new_tokens = 256
temperature = 0.7
top_k = 0
top_p = 0.9
seed = 1337
batch_size = 16                   # prompts per batch

def sample_next(logits, temperature, top_k, top_p, u):
    """Next token of each row of logits (B, V): greedy at temperature 0, else drawn from the softmax cut to the top_k
    likeliest, then to the fewest holding top_p. u (B,) in (0, 1]: each row's own draw, so rows never interact."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, ids = torch.softmax(logits / temperature, dim=-1), None
    if 0 < top_k < probs.size(-1):
        probs, ids = probs.topk(top_k, dim=-1)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        if ids is None:
            probs, ids = probs.sort(dim=-1, descending=True)
        # Keep a token while the likelier ones before it hold less than top_p; the likeliest always stays.
        probs = probs * (probs.cumsum(-1) - probs < top_p)
    cdf = probs.cumsum(-1)
    # Tokens cut above have zero width on the cdf, so no u in (0, 1] can land on them.
    choice = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp_(max=cdf.size(-1) - 1)
    return choice.squeeze(-1) if ids is None else ids.gather(-1, choice).squeeze(-1)

@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             logits_processor=None, eos_id=None, on_token=None):
    """New ids for each prompt (a list of ids), as one batch, every row exactly as if alone: own positions, padding
    masked, own random stream (seed, or seed[i]). A row ends at eos_id (an id or a set), max_new_tokens or the context.
    logits_processor(prev_tokens, logits) may rewrite the logits; on_token(i, id) sees each new id (True ends row i)."""
    config, device, dtype = model.args, next(model.parameters()).device, next(model.parameters()).dtype
    stop_ids = {eos_id} if isinstance(eos_id, int) or eos_id is None else set(eos_id)
    B, lengths = len(prompts), [len(p) for p in prompts]
    if prompts and (min(lengths) == 0 or max(lengths) >= config.max_seq_len):
        raise ValueError(f"prompts must have 1 to {config.max_seq_len - 1} tokens, got {min(lengths)}..{max(lengths)}")
    budget = [min(max_new_tokens, config.max_seq_len - n) for n in lengths]
    steps, L = max(budget, default=0), max(lengths, default=0)
    if steps <= 0:
        return [[] for _ in prompts]
    # Left padding lines up every row's last prompt token at slot L-1, so one decode step serves all rows.
    # Pad slots are masked out of every row's attention, and positions count from each row's first real token.
    pad, slots = torch.tensor([L - n for n in lengths], device=device)[:, None], torch.arange(L + steps, device=device)
    positions, real = (slots - pad).clamp(min=0), slots >= pad  # real (B, S): the cache slots of a row's own tokens
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # A pad query sees only itself: one that sees nothing gives NaN on some backends, and NaN would reach the cache.
    prefill_mask = (causal & real[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
    decode_mask = real[:, None, None, :] if L > min(lengths) else None
    shape = (B, config.n_kv_heads or config.n_heads, L + steps, config.head_dim)
    cache = [tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in "kv") for _ in range(config.n_layers)]
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * B
    uniforms = torch.stack([1 - torch.rand(steps, generator=torch.Generator().manual_seed(s)) for s in seeds])
    uniforms = uniforms.to(device)  # once: not a host-to-device copy at every step
    history, new_ids, running = [list(p) for p in prompts], [[] for _ in prompts], [True] * B
    tokens = torch.tensor([[0] * (L - n) + list(p) for n, p in zip(lengths, prompts)], device=device)
    logits = model(tokens, positions[:, :L], prefill_mask[:, None], cache=cache, last_only=True)[:, -1]
    for step in range(steps):
        if logits_processor is not None:
            logits = logits_processor(history, logits)
        next_tokens = sample_next(logits, temperature, top_k, top_p, uniforms[:, step])
        for i, token in enumerate(next_tokens.tolist()):
            history[i].append(token)
            if running[i] and token not in stop_ids:
                new_ids[i].append(token)
                running[i] = not (on_token and on_token(i, token)) and len(new_ids[i]) < budget[i]
            else:
                running[i] = False
        if not any(running):
            break
        pos = L + step
        mask = None if decode_mask is None else decode_mask[..., :pos + 1]
        logits = model(next_tokens[:, None], positions[:, pos:pos + 1], mask, cache=cache, cache_pos=pos)[:, -1]
    return new_ids

def settled(text, shown, holdback=0, final=False):
    """What of a growing text can be shown after `shown`: not half a character (the ids are decoded whole, since
    pieces join across tokens), nor the last `holdback` characters (they may start a stop string); once final, all."""
    end = len(text) if final else max(len(text.rstrip("\ufffd")) - holdback, 0)
    return text[len(shown):end] if text.startswith(shown) else ""

def print_answer(model, tokenizer, args, instruction, input, logits_processor, seed):
    ids, shown = [], ""
    def on_token(row, token):
        nonlocal shown
        ids.append(token)
        piece = settled(tokenizer.decode(ids), shown)
        print(piece, end="", flush=True)
        shown += piece
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops this answer, not the session
        generate(model, [tokenizer.encode(format_prompt(instruction, input), bos=True)], args.max_new_tokens,
                 args.temperature, args.top_k, args.top_p, seed, logits_processor, tokenizer.stop_ids, on_token)
    print(settled(tokenizer.decode(ids), shown, final=True), flush=True)

def interact(model, tokenizer, args, logits_processor):
    print("Type an instruction (and, when asked, an optional input). Ctrl-D or 'quit' ends.")
    turn = 0
    try:
        while (instruction := input("\nInstruction: ").strip()) not in ("quit", "exit"):
            if instruction:
                input_text = input("Input (Enter for none): ").strip()
                print("Response: ", end="", flush=True)
                print_answer(model, tokenizer, args, instruction, input_text, logits_processor, args.seed + turn)
                turn += 1
    except EOFError:  # Ctrl-D
        print()

def read_items(path):
    """An evaluation file's items, all checked first: Alpaca's {instruction, input} (JSONL or JSON array) or
    self-instruct's {id, instruction, instances: [{input}]}. id: 'id' (#k for the k-th of several), else line/index."""
    items, seen = [], {}
    for where, number, record in read_records(path):
        check(isinstance(record, dict), f"{where}: expected a JSON object")
        instruction, instances = record.get("instruction"), record.get("instances", [record])
        check(isinstance(instruction, str) and instruction.strip(), f"{where}: field 'instruction' " + (
            "missing" if instruction is None else "is empty" if isinstance(instruction, str) else "must be a string"))
        check(isinstance(instances, list) and instances, f"{where}: field 'instances' must be a non-empty list")
        dataset = record.get("dataset", os.path.splitext(os.path.basename(path))[0])
        check(isinstance(dataset, str), f"{where}: field 'dataset' must be a string")
        for k, instance in enumerate(instances):
            input = instance.get("input", "") if isinstance(instance, dict) else None
            check(isinstance(input, str), f"{where}: field 'input' must be a string"
                  + (f" (instance {k})" if "instances" in record else ""))
            item_id = str(record.get("id", number)) + (f"#{k}" if len(instances) > 1 else "")
            check(item_id not in seen, f"{where}: duplicate id '{item_id}' (first at {seen.get(item_id)})")
            seen[item_id] = where
            items.append(dict(id=item_id, dataset=dataset, instruction=instruction, input=input, where=where))
    return items

def run_batches(model, tokenizer, items, args, settings, logits_processor, processes):
    """Append each batch's answers to a working JSONL (--out, or x.jsonl for --out=x.json; under torchrun, a shard
    per process), then rewrite it in input order, then write the JSON array; both atomically."""
    rank, world_size, barrier = processes
    for item in items:
        item["prompt_ids"] = tokenizer.encode(format_prompt(item["instruction"], item["input"]), bos=True)
        check(len(item["prompt_ids"]) < model.args.max_seq_len, f"{item['where']}: the prompt is "
              f"{len(item['prompt_ids'])} tokens, the model's context is {model.args.max_seq_len}")
    work = args.out[:-len(".json")] + ".jsonl" if args.out.endswith(".json") else args.out
    os.makedirs(os.path.dirname(work) or ".", exist_ok=True)
    finished, _ = read_outputs(work, settings)
    barrier()  # every process has read the files before any writes to them, so all split the same list
    # Like lengths share a batch (little padding); dealt out in turn, every process gets long and short prompts.
    todo = sorted((item for item in items if item["id"] not in finished), key=lambda item: len(item["prompt_ids"]))
    if rank == 0:
        print(f"{len(items)} items, {len(items) - len(todo)} already in {work}, {len(todo)} to generate"
              + (f" by {world_size} processes" if world_size > 1 else ""))
    todo, own = todo[rank::world_size], work if world_size == 1 else f"{work}.rank{rank}-of-{world_size}"
    from tqdm import tqdm
    with open(own, "a", encoding="utf-8") as out, tqdm(total=len(todo), unit="item", disable=rank > 0) as progress:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            # Each item's own random stream, keyed by its id: no output depends on its batch, process or a resume.
            seeds = [zlib.crc32(f"{args.seed}/{item['id']}".encode()) for item in batch]
            outputs = generate(model, [item["prompt_ids"] for item in batch], args.max_new_tokens, args.temperature,
                               args.top_k, args.top_p, seeds, logits_processor, tokenizer.stop_ids)
            for item, ids in zip(batch, outputs):
                append_jsonl(out, {**{k: item[k] for k in ("id", "dataset", "instruction", "input")},
                                   "output": tokenizer.decode(ids), **settings})
            os.fsync(out.fileno())  # a finished batch survives a crash of the machine, not only of the process
            progress.update(len(batch))
    barrier()  # every shard is complete
    if rank > 0:
        return
    finished, shards = read_outputs(work, settings)
    order = {item["id"]: i for i, item in enumerate(items)}
    records = sorted(finished.values(), key=lambda record: order.get(record["id"], len(order)))
    write_atomic(work, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    if work != args.out:  # alpaca_eval's outputs: a JSON array of records with instruction, output, generator
        records = [record for record in records if record["id"] in order]
        write_atomic(args.out, json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    for path in shards:  # last: a kill before this leaves lines twice, which the rerun reads once
        os.remove(path)
    print(f"wrote {args.out}" + (f" and {work}" if work != args.out else ""))

def load(args):
    check(os.path.isdir(args.checkpoint), f"{args.checkpoint}: no such checkpoint folder")
    tokenizer_path = args.tokenizer or find_tokenizer(args.checkpoint)
    check(os.path.exists(tokenizer_path), f"{tokenizer_path}: no tokenizer; pass --tokenizer=path/to/tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    model = Transformer.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    check(tokenizer.vocab_size <= model.args.vocab_size, f"{tokenizer_path}: {tokenizer.vocab_size} tokens, more "
          f"than the model's {model.args.vocab_size}")
    return model, tokenizer

def make_logits_processor(args, model, tokenizer):
    """(hook, watermark): the watermark if asked for, and a ban on ids past the tokenizer's (padded vocabularies)."""
    watermark, n_tokens = None, tokenizer.vocab_size
    if args.watermark:
        import watermark as wm  # only needed here, so sample.py runs without it
        watermark = wm.WatermarkProcessor(model.args.vocab_size, gamma=args.gamma, delta=args.delta,
                                          scheme=args.scheme, key=args.key)
    def process(prev_tokens, logits):
        logits = logits if watermark is None else watermark(prev_tokens, logits)
        logits[:, n_tokens:] = float("-inf")
        return logits
    return (process if watermark is not None or n_tokens < model.args.vocab_size else None), watermark

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default="out/tiny", help="a Meta or Hugging Face LLaMA folder")
    add("--tokenizer", default="", help="tokenizer.model (default: the checkpoint's)")
    add("--prompt", default=None, help="one instruction; without it (and --in), an interactive loop")
    add("--input", default="", help="the optional input that goes with --prompt")
    add("--in", dest="inp", metavar="IN", help="an evaluation file (JSONL or JSON array) to answer in batches")
    add("--out", default="outputs.jsonl", help="answers to --in: JSONL, resumable; x.json: also alpaca_eval's array")
    add("--generator", default="", help="the model's name in --out (default: the checkpoint's)")
    add("--batch_size", type=int, default=batch_size, help="prompts per batch (--serve: most requests at once)")
    add("--max_new_tokens", type=int, default=max_new_tokens, help="the most per answer (--serve: the default)")
    add("--temperature", type=float, default=temperature, help="0 for greedy")
    add("--top_k", type=int, default=top_k, help="0 for no cut")
    add("--top_p", type=float, default=top_p, help="1 for no cut")
    add("--seed", type=int, default=seed)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on a GPU with it, else float32")
    add("--compile", action="store_true", help="torch.compile the model (slow start, fast steps: README)")
    add("--watermark", action="store_true", help="watermark the outputs (see watermark.py)")
    add("--gamma", type=float, default=0.25, help="watermark: fraction of green tokens")
    add("--delta", type=float, default=2.0, help="watermark: logit bonus of green tokens")
    add("--scheme", default="lefthash", help="watermark: how the green list is seeded")
    add("--key", type=int, default=15485863, help="watermark: secret key")
    add = parser.add_argument_group("web demo").add_argument
    add("--serve", action="store_true", help="serve the demo page and an OpenAI-compatible API")
    add("--host", default="127.0.0.1", help="0.0.0.0 to let other machines in")
    add("--port", type=int, default=8000, help="0 for any free port")
    add("--no_watermark", action="store_true", help="the demo watermarks every output unless this")
    add("--moderation_base_url", help="content filter endpoint (default: OpenAI's if OPENAI_API_KEY is set, else none)")
    add("--flags", default="flags.jsonl", help="JSONL that flagged outputs are appended to")
    add("--max_body_bytes", type=int, default=256 * 1024)
    add("--max_tokens_cap", type=int, default=512, help="the most tokens one request may ask for")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 \
            or args.batch_size < 1:
        parser.error("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, batch_size >= 1")
    args.watermark = not args.no_watermark if args.serve else args.watermark
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return args

def main(argv=None):
    args = parse_args(argv)
    items = read_items(args.inp) if args.inp else None  # bad input stops us here, before any loading
    processes = join_processes(args)  # under torchrun: this process's rank and device
    model, tokenizer = load(args)
    if args.compile:  # on CPU, freezing packs the weights for the matmul kernels once, not at every step
        import torch._inductor.config as inductor_config  # (a plain `import torch...` here would shadow torch)
        inductor_config.freezing = args.device == "cpu"
        model = torch.compile(model, dynamic=True)
    if args.serve:
        return serve(model, tokenizer, args)
    logits_processor, watermark = make_logits_processor(args, model, tokenizer)
    settings = {"generator": args.generator or os.path.basename(os.path.normpath(args.checkpoint)), "temperature":
                args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, **({"watermark": watermark.params} if watermark else {})}
    if items is not None:
        run_batches(model, tokenizer, items, args, settings, logits_processor, processes)
        if processes[1] > 1:
            torch.distributed.destroy_process_group()
    elif args.prompt is not None:
        print_answer(model, tokenizer, args, args.prompt, args.input, logits_processor, args.seed)
    else:
        interact(model, tokenizer, args, logits_processor)

# Plumbing: append-only files that survive a kill, and several processes.
def check(ok, message):  # a bad input, output file or checkpoint stops the run with a message that says where
    if not ok:
        raise SystemExit(message)

def resume_jsonl(path):
    """An append-only JSONL's records ([] if none). A last line with no newline, a killed write, is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            print(f"{path}: cutting off a torn last line ({len(data) - end} bytes) of a killed run", file=sys.stderr)
            f.truncate(end)
    records = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line")
    return records

def append_jsonl(file, record):
    file.write(json.dumps(record, ensure_ascii=False) + "\n")
    file.flush()

def write_atomic(path, text):
    """Write path via a temp file and a rename: a kill never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def read_outputs(work, settings):
    """({id: record}, shards) already written; lines of other settings stop the run (they would spoil an evaluation)."""
    folder, name = os.path.dirname(work) or ".", os.path.basename(work)
    shards = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(name + ".rank"))
    finished = {}
    for path in [work] + shards:
        for lineno, record in enumerate(resume_jsonl(path), 1):
            check(isinstance(record, dict) and "id" in record, f"{path}:{lineno}: not an output line of sample.py "
                  "(no 'id')")
            for key, value in {"watermark": None, **settings}.items():
                check(record.get(key) == value, f"{path}:{lineno}: written with {key}={record.get(key)!r}, this run "
                      f"has {value!r}; use another --out")
            finished.setdefault(record["id"], record)
    return finished, shards

def join_processes(args):
    """(rank, world size, barrier). Under torchrun each process holds the whole model and answers its share; they
    meet only before and after the work (a gloo barrier): no tensor crosses."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, lambda: None
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(hours=24))  # waiting for the slowest share is no failure
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), world_size, dist.barrier

# The web demo (--serve), as Alpaca's: content filter, watermark, Flag button. Its OpenAI-compatible API can also be
# the teacher of generate_instructions.py or the judge of eval_pairwise.py. Page text is set as text, never as HTML.
PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Alpaca demo: {{model_name}}</title><style>body { font: 16px/1.45 sans-serif; max-width: 46rem; margin: auto }
label { display: block; margin-top: .7rem } textarea { width: 100% } .notice { background: #fff8e1 }
#output { white-space: pre-wrap; border: 1px solid #ccc; padding: .5em }</style><h1>Alpaca demo: {{model_name}}</h1>
<p class="notice"><b>Terms of use:</b> research use only, not for commercial use. The model's answers can be wrong,
biased or offensive; do not rely on them and do not enter personal information. Flagged outputs are saved for the
researchers running this demo.<br><b>Content filter:</b> {{filter_state}}.<br><b>Watermark:</b> {{watermark_state}}.</p>
<label>Instruction <textarea id="instruction" rows="3"></textarea></label>
<label>Input (optional) <textarea id="input" rows="2"></textarea></label><p><button id="generate">Generate</button></p>
<h2>Response</h2><div id="output"></div><p id="status"></p><button id="flag" disabled>Flag this output</button><script>
const $ = id => document.getElementById(id), say = text => $("status").textContent = text;
let last = null;
$("generate").onclick = async () => {
  const instruction = $("instruction").value.trim(), input = $("input").value.trim();
  // The server's chat rule: the last user message is the instruction, a system message before it the input.
  const messages = (input ? [{role: "system", content: input}] : []).concat([{role: "user", content: instruction}]);
  let text = "", status = "", buffer = "";
  $("output").textContent = "";
  say("Generating...");
  $("generate").disabled = $("flag").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({model: "demo", messages, stream: true})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    for (let read = await reader.read(); !read.done; read = await reader.read()) {
      const events = (buffer += decoder.decode(read.value, {stream: true})).split("\\n\\n");
      buffer = events.pop();
      for (const event of events.filter(e => e.startsWith("data: {"))) {  // not the closing "data: [DONE]"
        const chunk = JSON.parse(event.slice(6)), choice = (chunk.choices || [])[0] || {delta: {}};
        if (chunk.error) throw new Error(chunk.error.message);
        $("output").textContent = text += choice.delta.content || "";
        const reason = choice.finish_reason, filtered = reason === "content_filter" && chunk.content_filter.categories;
        status = filtered ? `Withheld: the content filter flagged this output (${filtered.join(", ")}).`
          : reason ? (reason === "length" ? "Stopped at the token limit." : "Done.") : status;
      }
    }
  } catch (e) { status = "Error: " + e.message; }
  last = {instruction, input, output: text};
  say(status);
  $("generate").disabled = $("flag").disabled = false;
};
$("flag").onclick = async () => {
  $("flag").disabled = true;
  const response = await fetch("/flag", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify(last)});
  say(response.ok ? "Thank you: the output is flagged for the researchers."
                  : "Flagging failed: " + (await response.json()).error.message);
};
</script></html>"""
# Only the page's own script may run: even text that slipped into the page as HTML could not execute.
PAGE_POLICY = "default-src 'none'; script-src 'sha256-{}'; style-src 'unsafe-inline'; connect-src 'self'; " \
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'".format(base64.b64encode(hashlib.sha256(
        PAGE.split("<script>")[1].split("</script>")[0].encode()).digest()).decode())
ENDPOINTS = {"/": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST", "/flag": "POST"}

class ApiError(Exception):  # a request the server refuses, answered with OpenAI's error body; serving goes on
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}

def number(body, name, default, low, high, integer=False):
    if (value := body.get(name)) is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not low <= value <= high:
        bounds = f"from {low} to {high}" if high < float("inf") else f"of at least {low}"
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'} {bounds}, got "
                       f"{json.dumps(value)[:40]}", name)
    return value

def chat_to_alpaca(messages):
    """(instruction, input): Alpaca has no turns, so the last (user) message is the instruction, the rest the input."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: 'role' must be system, user or assistant", f"messages[{i}].role")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: 'content' must be a string", f"messages[{i}].content")
    *earlier, (role, instruction) = [(message["role"], message["content"]) for message in messages]
    if role != "user" or not instruction.strip():
        raise ApiError(400, "the last message must be the user's, and not empty", "messages")
    return instruction, "\n\n".join(text if role == "system" else f"{role.title()}: {text}" for role, text in earlier)

def read_request(body, chat, demo):
    """A request checked field by field, as a job for the worker (completions: raw text; chat: Alpaca's prompt)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    where, prompt, input = "messages" if chat else "prompt", body.get("prompt"), ""
    if chat:
        instruction, input = chat_to_alpaca(body.get("messages"))
        prompt = format_prompt(instruction, input)
    else:  # one prompt, as a string or a list of one
        instruction = prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
    unsupported = [name for name in ("echo", "logprobs", "suffix", "tools") if body.get(name)]
    if unsupported or body.get("n") not in (None, 1):  # refused, not ignored: a reply without them would mislead
        name = (unsupported or ["n"])[0]
        raise ApiError(400, f"'{name}' is not supported by this server (it gives one choice per request)", name)
    stop = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if not isinstance(stream := body.get("stream") or False, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    prompt_ids, limit = demo.tokenizer.encode(prompt, bos=True), demo.model.args.max_seq_len - 1
    if len(prompt_ids) > limit:
        raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this server takes at most {limit}", where,
                       "context_length_exceeded")
    # Asking for more than the server can give is refused with the most it can give (as OpenAI and vLLM do): a reply
    # cut at a limit the client never heard of looks like the model's own end. The default shrinks to what fits.
    cap, context, n = demo.args.max_tokens_cap, demo.model.args.max_seq_len, len(prompt_ids)
    max_tokens = min(demo.args.max_new_tokens, cap, context - n)
    for name in ("max_tokens", "max_completion_tokens"):
        asked = number(body, name, max_tokens, 1, float("inf"), integer=True)
        if asked > context - n and context - n < cap:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{n + asked} tokens ({n} in the {where}, {asked} in the completion): after this {where} "
                           f"it gives at most {context - n} completion tokens. Please reduce the length of the "
                           f"{where} or completion.", name, "context_length_exceeded")
        if asked > cap:
            raise ApiError(400, f"{name} is too large: {asked}. This server gives at most {cap} completion tokens "
                           f"per request, whereas you provided {asked}.", name, "integer_above_max_value")
        max_tokens = asked
    return SimpleNamespace(
        instruction=instruction, input=input, prompt_ids=prompt_ids, max_tokens=max_tokens, stop=stop, stream=stream,
        temperature=number(body, "temperature", demo.args.temperature, 0, 2),
        top_p=max(number(body, "top_p", demo.args.top_p, 0, 1), 1e-6),  # 0: the likeliest token only
        seed=number(body, "seed", secrets.randbelow(2**63), 0, 2**63 - 1, integer=True),
        pieces=queue.Queue(), cancelled=threading.Event(), ids=[], shown="", text="", finish_reason=None, error=None,
        holdback=max(map(len, stop), default=1) - 1)  # text that may start a stop string waits until it cannot

def run_jobs(demo):
    """The one thread using the model: the oldest job and up to --batch_size - 1 that sample alike make a batch (rows
    come out as alone: throughput changes, outputs don't). Each job's text goes to its own queue (None ends it), so a
    slow reader slows only its own connection."""
    def finish(job, text, reason):
        cut = min((text.find(s) for s in job.stop if s in text), default=None)
        job.finish_reason, job.text = "stop" if cut is not None else reason, text[:cut]
        job.pieces.put(settled(job.text, job.shown, final=True))
        job.pieces.put(None)
    def on_token(row, token):  # True once the job has its answer: generate() then ends its row
        job = batch[row]
        if not (ended := job.cancelled.is_set() or demo.closing or token in demo.tokenizer.stop_ids):
            job.ids.append(token)
        text = demo.tokenizer.decode(job.ids)
        if ended or any(s in text for s in job.stop) or len(job.ids) == job.max_tokens:
            finish(job, text, "stop" if ended else "length")
        elif piece := settled(text, job.shown, job.holdback):
            job.pieces.put(piece)
            job.shown += piece
        return job.finish_reason is not None
    while True:
        with demo.waiting:
            demo.waiting.wait_for(lambda: demo.closing or not all(job.cancelled.is_set() for job in demo.queue))
            if demo.closing:
                return
            demo.queue = [job for job in demo.queue if not job.cancelled.is_set()]  # their clients left
            alike = (demo.queue[0].temperature, demo.queue[0].top_p)
            batch = [job for job in demo.queue if (job.temperature, job.top_p) == alike][:demo.args.batch_size]
            demo.queue = [job for job in demo.queue if all(job is not b for b in batch)]
        try:  # on_token ends every row: EOS is left to it, and no job's max_tokens is past its row's room
            generate(demo.model, [job.prompt_ids for job in batch], max(job.max_tokens for job in batch),
                     batch[0].temperature, demo.args.top_k, batch[0].top_p, [job.seed for job in batch],
                     logits_processor=demo.logits_processor, on_token=on_token)
        except Exception as e:  # one failed batch must not take the demo down
            for job in (job for job in batch if job.finish_reason is None):
                job.error = ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
                job.pieces.put(None)

def moderate(demo, text):
    """The categories the moderation endpoint flags text for: [] when clean or when the filter is off."""
    if demo.moderation is None or not text.strip():
        return []
    try:
        result = demo.moderation.moderations.create(input=text).results[0]
        categories = sorted(name for name, hit in result.categories.to_dict().items() if hit)
    except Exception as e:  # fail closed: whatever went wrong, nothing unchecked is shown
        raise ApiError(503, f"the content filter is unavailable, so nothing is shown ({e})", kind="server_error")
    return (categories or ["unspecified"]) if result.flagged else []

def log_flag(demo, flagged_by, instruction, input, output, reason):
    with demo.flags_lock, open(demo.args.flags, "a", encoding="utf-8") as f:
        append_jsonl(f, {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "instruction": instruction,
                         "input": input, "output": output, "reason": reason, "flagged_by": flagged_by,
                         "watermark": demo.watermark_params})
        os.fsync(f.fileno())

class DemoHandler(BaseHTTPRequestHandler):  # a thread per connection: a silent client holds only its own, for 60 s
    protocol_version, timeout, streaming = "HTTP/1.1", 60, False  # keep-alive, as the openai client expects

    def do_GET(self):
        path, demo = urlsplit(self.path).path, self.server.demo
        try:
            if ENDPOINTS.get(path) != self.command:
                raise ApiError(404, f"no {self.command} {path} here (GET / is the page, POST /v1/... the API)")
            if path == "/":
                self.send(200, demo.page.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_POLICY})
            elif path == "/flag":
                body, names = self.read_json(), ("instruction", "input", "output", "reason")
                if not isinstance(body, dict) or "output" not in body or not all(
                        isinstance(body.get(name, ""), str) for name in names):
                    raise ApiError(400, "send a JSON object: the flagged 'output', and 'instruction', 'input' and "
                                   "'reason' if any, all strings", "output")
                log_flag(demo, "user", *(body.get(name, "") for name in names))
                self.send(200, {"flagged": True})
            else:
                self.complete(self.read_json(), chat=path == "/v1/chat/completions")
        except ApiError as e:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that left misses its error
                self.send(e.status, e.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; its job was cancelled in complete()

    do_POST = do_GET

    def read_json(self):
        length, limit = self.headers.get("Content-Length", ""), self.server.demo.args.max_body_bytes
        length = int(length) if length.isdigit() else 0  # none, or not a number: an empty body
        if length > limit:  # refused unread, so the connection ends (a client still sending may miss the 413)
            self.close_connection = True
            raise ApiError(413, f"the body is {length} bytes; this server takes at most {limit}")
        data = self.rfile.read(length)  # read before any refusal, so the connection can go on
        # Other pages in the user's browser can send text/plain here without asking; JSON needs CORS, never granted.
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "send JSON, with Content-Type: application/json")
        try:
            return json.loads(data)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON ({e})")

    def complete(self, body, chat):
        """Answer in OpenAI's shape, whole or streamed; with the filter on, outputs are checked whole, so come whole."""
        demo, job = self.server.demo, read_request(body, chat, self.server.demo)
        if categories := ", ".join(moderate(demo, "\n\n".join(filter(None, [job.instruction, job.input])))):
            log_flag(demo, "content_filter", job.instruction, job.input, "", f"prompt flagged: {categories}")
            raise ApiError(400, f"the content filter flagged this prompt ({categories}), so it was refused",
                           "messages" if chat else "prompt", "content_filter")
        with demo.waiting:
            demo.queue.append(job)
            demo.waiting.notify()
        try:
            self.respond(job, chat)
        finally:
            job.cancelled.set()  # a job whose client left stops at its next token, or is skipped

    def respond(self, job, chat):
        demo, kind = self.server.demo, "chat.completion" if chat else "text_completion"
        reply = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(16)}", "created": int(time.time()),
                 "object": kind + ".chunk" * (chat and job.stream), "model": demo.model_name}
        def chunk(text, finish_reason=None, first=False, **extra):  # text None: a stream's last chunk
            delta = {} if text is None else {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"delta" if job.stream else "message": delta} if chat else {"text": text or "", "logprobs": None}
            return {**reply, "choices": [{"index": 0, **choice, "finish_reason": finish_reason}], **extra}
        if live := job.stream and demo.moderation is None:
            self.send_event(chunk("", first=True))
        while (piece := job.pieces.get()) is not None:  # a client that left is noticed at the next write
            if live and piece:
                self.send_event(chunk(piece))
        if job.error:  # mid-stream, the error is the stream's last event
            return self.send_event(job.error.body) if live else self.send(job.error.status, job.error.body)
        text, finish_reason, extra = job.text, job.finish_reason, {"watermark": demo.watermark_params}
        if categories := moderate(demo, text):
            log_flag(demo, "content_filter", job.instruction, job.input, text,
                     f"output flagged: {', '.join(categories)}")
            text, finish_reason = "", "content_filter"
            extra["content_filter"] = {"flagged": True, "categories": categories}
        if not job.stream:
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.ids)}
            usage["total_tokens"] = sum(usage.values())
            return self.send(200, chunk(text, finish_reason, first=True, usage=usage, **extra))
        if not live:
            self.send_event(chunk(text, first=True))
        self.send_event(chunk(None, finish_reason, **extra))
        self.wfile.write(b"data: [DONE]\n\n")

    def send_event(self, payload):
        """One server-sent event, starting the stream first; the stream ends with the connection."""
        if not self.streaming:
            self.streaming = True
            self.send(200, b"", "text/event-stream", {"Cache-Control": "no-cache"})
        self.wfile.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def send(self, status, data, content_type="application/json", headers={}):
        """A response or a stream's head; on a connection that ends after it, the body ends with it (no length)."""
        data = data if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False).encode()
        self.close_connection = self.close_connection or self.streaming
        self.send_response(status)
        for name, value in [("Content-Type", content_type), ("X-Content-Type-Options", "nosniff"), *headers.items(),
                            ("Connection", "close") if self.close_connection else ("Content-Length", str(len(data)))]:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

def make_server(model, tokenizer, args):
    """The demo's HTTP server with its worker thread started: call serve_forever(), then close_server()."""
    logits_processor, watermark = make_logits_processor(args, model, tokenizer)
    key, moderation = os.environ.get("OPENAI_API_KEY"), None
    if key or args.moderation_base_url:
        import openai
        moderation = openai.OpenAI(base_url=args.moderation_base_url, api_key=key or "none", max_retries=2, timeout=30)
    resume_jsonl(args.flags)  # cuts a torn last line a killed demo left, so appends start on a line of their own
    demo = SimpleNamespace(
        model=model, tokenizer=tokenizer, args=args, logits_processor=logits_processor, moderation=moderation, queue=[],
        watermark_params=watermark.params if watermark else None, flags_lock=threading.Lock(),
        model_name=os.path.basename(os.path.normpath(args.checkpoint)), waiting=threading.Condition(), closing=False)
    demo.filter_state = f"on ({moderation.base_url}moderations): flagged prompts refused, flagged outputs withheld" \
        if moderation else "off (no OPENAI_API_KEY or --moderation_base_url): outputs are not checked"
    demo.watermark_state = "off" if watermark is None else ("on, every output: {scheme}, gamma {gamma}, delta "
        "{delta}, key fingerprint {key_fingerprint} (check with watermark.py detect)").format(**watermark.params)
    demo.page = re.sub(r"{{(\w+)}}", lambda name: html.escape(getattr(demo, name[1])), PAGE)
    server = ThreadingHTTPServer((args.host, args.port), DemoHandler)
    server.demo, demo.worker = demo, threading.Thread(target=run_jobs, args=(demo,), daemon=True)
    demo.worker.start()
    return server

def close_server(server):
    server.server_close()
    with server.demo.waiting:
        server.demo.closing = True  # the batch being generated ends at its next token
        server.demo.waiting.notify()
    server.demo.worker.join(timeout=10)

def serve(model, tokenizer, args):
    server = make_server(model, tokenizer, args)
    url, demo = "http://%s:%d" % server.server_address[:2], server.demo
    print(f"Serving {demo.model_name} at {url}/ (OpenAI-compatible API at {url}/v1); Ctrl-C stops\ncontent filter: "
          f"{demo.filter_state}\nwatermark: {demo.watermark_state}\nflags go to {args.flags}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print("stopping", flush=True)
    close_server(server)

if __name__ == "__main__":
    main()
