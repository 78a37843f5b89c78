"""
Supervised fine-tuning of LLaMA on instruction data: the Stanford Alpaca recipe in one file.

    python train.py                                    # tiny LLaMA on seed_tasks.jsonl, on CPU, in about a minute
    torchrun --nproc_per_node=8 train.py --init=/path/to/llama-7b --data=alpaca_data.json

Top to bottom: the settings (each a flag, --name=value; --help lists them), the model and LoRA, the tokenizer, the
data, the training loop's pieces, main; then the plumbing: checkpoint files in and out, resume, the command line.
"""
import argparse
import base64
import io
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import sentencepiece as spm
import tiktoken
import tokenizers
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Alpaca-7B's recipe (Taori et al., 2023), for fine-tuning an --init: 3 epochs, 128 examples per step, lr 2e-5,
# cosine with 3% warmup. Without --init, tiny_recipe (below) replaces these values; a flag given overrides either.
data = "seed_tasks.jsonl"         # alpaca_data.json (a JSON array) or JSONL of {instruction, input, output}
init = ""                         # a Meta or Hugging Face LLaMA folder; empty: a tiny LLaMA from scratch (the demo)
out_dir = "out/tiny"              # the fine-tuned model, in Meta's layout, plus the state to resume from
epochs = 3
batch_size = 128                  # examples per optimizer step, over all processes (Alpaca: 4 x 8 accum x 4 GPUs)
micro_batch_size = 4              # packed rows of max_seq_len per forward, per process; accumulation steps follow
max_seq_len = 512
learning_rate = 2e-5
warmup_ratio = 0.03
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
max_steps = -1                    # run this many steps instead of the epochs (the schedule follows)
val_fraction = 0.02               # held out, seeded, for the validation loss
eval_interval = 50                # steps between validation losses (and at the end)
save_interval = 200               # steps between checkpoints (and at the end)
log_interval = 1
resume = False                    # continue from out_dir's saved state
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16"                # autocast dtype; "float32" turns mixed precision off
compile = False
activation_checkpointing = False
save_hf = False                   # also write out_dir/hf/: the model in Hugging Face's layout (transformers, vLLM)
# LoRA (Hu et al., 2021) trains a low-rank update of a frozen model: 7-8B on one GPU. Set --learning_rate=3e-4 or so
# (alpaca-lora's). All linear layers, not alpaca-lora's wq,wv: QLoRA found that needed to match full fine-tuning.
lora_rank = 0                     # 0: full fine-tuning (Alpaca); R > 0: rank-R adapters on a frozen model
lora_alpha = 16.0                 # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05               # on the adapters' input only
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
# The demo (no --init) trains a tiny LLaMA from scratch on the seed tasks, which wants many passes, small batches and
# a high rate. 2 layers and 4000 pieces (nearly whole words) learn them by heart sooner than 4 layers or lr >= 3e-3:
# ~64 s on 2 CPU cores, loss 8.3 -> 0.1, training answer ROUGE-L 1.00, held-out 0.05; fp32, as bf16 gains nothing.
tiny_model = dict(dim=128, n_layers=2, n_heads=4, vocab_size=4000, multiple_of=32, max_seq_len=512)
tiny_recipe = dict(epochs=28, batch_size=8, learning_rate=2e-3, warmup_ratio=0.05, beta2=0.99, dtype="float32")

settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

@dataclass
class ModelArgs:
    # Field names follow Meta's params.json, so a checkpoint's params.json loads as is.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    head_dim: int | None = None    # dim // n_heads unless a checkpoint says otherwise (HF's head_dim)
    use_scaled_rope: bool = False     # Llama 3.1+: RoPE stretched for long context, by Meta's factors below
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the output layer is the embedding matrix
    sliding_window: int | None = None  # Mistral v0.1; exact only while the context is no longer than it

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()  # the mean of squares in fp32: bf16 has too few bits to normalise well
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
        # Under autocast, cast once here rather than in each matmul that follows (q, k, v; w1, w3): the same values.
        return y.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else y

def rope_inv_freq(config, device=None):
    # Rotary frequencies in fp32; Llama 3.1+ as Meta's apply_scaling: long waves slowed, short kept, between blended.
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim)
    if not config.use_scaled_rope:
        return inv_freq
    wavelen, low, high = 2 * math.pi / inv_freq, config.low_freq_factor, config.high_freq_factor
    smooth = (config.original_max_seq_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / config.rope_scaling_factor + smooth * inv_freq
    scaled = torch.where(wavelen > config.original_max_seq_len / low, inv_freq / config.rope_scaling_factor, blended)
    return torch.where(wavelen < config.original_max_seq_len / high, inv_freq, scaled)

def rope_rotation(config, positions):
    # cos + i sin per position (B, T) and pair, once per forward; complex64, which FSDP2's bf16 policy leaves uncast.
    angles = positions.float()[..., None] * rope_inv_freq(config, positions.device)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None]

def apply_rope(x, rotation):
    # Meta rotates interleaved pairs (x0, x1): as complex x0 + i x1, one kernel each way instead of about ten.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)

class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim, n_kv_heads = config.head_dim, config.n_kv_heads or config.n_heads
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, rotation, mask, cache, cache_pos):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), rotation).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), rotation).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is not None:  # sampling: keys and values of earlier tokens come from the cache
            for stored, new in zip(cache, (k, v)):
                stored[:, :, cache_pos:cache_pos + T] = new
            k, v = (stored[:, :, :cache_pos + T].to(q.dtype) for stored in cache)  # no copy when dtypes match
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves a group of q heads
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

def ffn_hidden_dim(config):
    # LLaMA's rule: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to a multiple of multiple_of.
    hidden = int((config.ffn_dim_multiplier or 1) * int(2 * 4 * config.dim / 3))
    return config.multiple_of * math.ceil(hidden / config.multiple_of)

class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = ffn_hidden_dim(config)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, rotation, mask=None, cache=None, cache_pos=0):
        x = x + self.attention(self.attention_norm(x), rotation, mask, cache, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.args = config  # model.args: the name sample.py and the checkpoint readers use
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if config.sliding_window is not None and config.sliding_window < config.max_seq_len:
            raise SystemExit(f"context {config.max_seq_len} is longer than the checkpoint's sliding_window "
                             f"{config.sliding_window}: this LLaMA attends to the whole context")
        # Tied: no output layer of its own, so the one matrix is sharded, saved and trained once.
        self.output = None if config.tie_word_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.activation_checkpointing = False

    def forward(self, tokens, positions=None, mask=None, targets=None, cache=None, cache_pos=0, last_only=False):
        # Logits (B, T, vocab), or with targets the summed cross-entropy where a target is not -100. mask (B, 1, T, S):
        # where a query may see a key. cache: per layer (k, v), written at cache_pos. last_only: for sampling.
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=tokens.device).expand(B, T)
        if mask is None and cache is not None and T > 1:  # causal over the cached tokens and these
            mask = torch.ones(T, cache_pos + T, dtype=torch.bool, device=tokens.device).tril(cache_pos)
        rotation, h = rope_rotation(self.args, positions), self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, rotation, mask, use_reentrant=False)
            else:
                h = layer(h, rotation, mask, None if cache is None else cache[i], cache_pos)
        h = self.norm(h)
        if targets is None:
            return self.logits(h[:, -1:] if last_only else h)
        # Only response tokens (a loss) go through the large output layer, their count padded to a multiple of 256:
        # few distinct shapes, as each new one costs a kernel setup on CPU and a recompile under torch.compile.
        keep = (targets.flatten() != -100).nonzero().squeeze(1)
        pad = -len(keep) % 256
        logits = self.logits(h.flatten(0, 1)[F.pad(keep, (0, pad))])
        return F.cross_entropy(logits, F.pad(targets.flatten()[keep], (0, pad), value=-100), reduction="sum")

    def logits(self, h):
        return (self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)).float()

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.normal_(p, mean=0.0, std=std)
        return self

    @staticmethod
    def from_pretrained(path, dtype=None):
        # A Meta folder (params.json) or a Hugging Face one (config.json), weights memory-mapped where possible.
        meta = os.path.exists(os.path.join(path, "params.json"))
        if not meta and not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"{path}: neither a Meta (params.json) nor a Hugging Face (config.json) LLaMA folder")
        config, state = read_meta_checkpoint(path) if meta else read_hf_checkpoint(path)
        with torch.device("meta"):
            model = Transformer(config)
        try:  # strict: a missing, unexpected or misshapen tensor is named
            model.load_state_dict({k: v.to(dtype or v.dtype) for k, v in state.items()}, assign=True)
        except RuntimeError as e:
            raise SystemExit(f"{path}: {e}")
        return model

class LoRALinear(nn.Module):
    # y = W x + (alpha / R) B A x: W frozen, A (R x in) and B (out x R) trained, in fp32. W keeps its name (wq.weight).
    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=base.weight.device))
        self.scale, self.dropout = alpha / rank, dropout

    def forward(self, x):  # in x's dtype, as autocast would: a bf16 model runs without it too (the end's answers)
        update = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_a.to(x.dtype)),
                          self.lora_b.to(x.dtype))
        return F.linear(x, self.weight) + self.scale * update

def add_lora(model, rank, alpha, dropout, targets, seed):
    # Seeded on the CPU (alike on any number of processes): A drawn as nn.Linear (and PEFT), B zero: step 0 is the base.
    known = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    if not targets or any(t not in known for t in targets):
        raise SystemExit(f"--lora_targets={','.join(targets)}: expected some of {','.join(known)}")
    model.requires_grad_(False)
    for part in [m for block in model.layers for m in (block.attention, block.feed_forward)]:
        for name in set(targets) & set(part._modules):
            setattr(part, name, LoRALinear(getattr(part, name), rank, alpha, dropout))
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.rand(p.shape, generator=generator) * 2 - 1) / math.sqrt(p.shape[1])
            if name.endswith(".lora_a") else torch.zeros(p.shape) for name, p in model.named_parameters()
            if ".lora_" in name}

def merge_lora(state, scale):
    # W + scale * B A, all in fp32 as a full run writes them (W + B A rounded to bf16 loses much of B A).
    for prefix in [n[:-len("lora_a")] for n in state if n.endswith(".lora_a")]:
        a, b = state.pop(prefix + "lora_a").float(), state.pop(prefix + "lora_b").float()
        state[prefix + "weight"] = state[prefix + "weight"].float() + scale * (b @ a)
    return {name: t.float() for name, t in state.items()}

def find_tokenizer(folder):
    # HF's Llama 3 repos keep Meta's file in original/; none found: tokenizer.model, for the caller to report.
    paths = [os.path.join(folder, n) for n in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")]
    return next((p for p in paths if os.path.exists(p)), paths[0])

class Tokenizer:
    # sentencepiece (LLaMA 1/2, Mistral, the demo), Meta's Llama 3 file (tiktoken) or a tokenizer.json (HF tokenizers).
    # Pad id -1: padding never reaches the loss. Special tokens' text stays text, as in Meta's: data cannot inject them.
    def __init__(self, path):
        self.path, self.pad_id = path, -1
        data = Path(path).read_bytes()
        if data.startswith(b"{"):
            self.hf = tokenizers.Tokenizer.from_str(data.decode())
            self.hf.encode_special_tokens = True
            self.encode_text = lambda text: self.hf.encode(text, add_special_tokens=False).ids
            self.decode = lambda ids: self.hf.decode(ids, skip_special_tokens=False)
            special, self.vocab_size = self.hf.get_vocab(), self.hf.get_vocab_size()
        elif re.match(rb"[A-Za-z0-9+/=]+ \d+(\r?\n|$)", data):  # Meta's file: a base64 token and its rank a line
            ranks = {}  # read here: tiktoken's load_tiktoken_bpe caches by path, stale once out_dir's file is replaced
            for lineno, line in enumerate(data.splitlines(), 1):
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise SystemExit(f"{path}:{lineno}: expected a base64 token and its rank")
            special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
            self.tt = tiktoken.Encoding(os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                        special_tokens=special)
            self.encode_text = lambda text: self.tt.encode(text, disallowed_special=())
            self.decode, self.vocab_size = self.tt.decode, self.tt.n_vocab
        else:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
            self.encode_text, self.decode = self.sp.encode, self.sp.decode
            self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
            self.stop_ids, self.vocab_size = {self.eos_id}, self.sp.get_piece_size()
            return
        # Llama 3's names, or those of a sentencepiece model converted to tokenizer.json (LLaMA 2, Mistral).
        bos, eos = (next((t for t in names if t in special), None) for names in (("<|begin_of_text|>", "<s>"),
                                                                                  ("<|end_of_text|>", "</s>")))
        if bos is None or eos is None:
            raise SystemExit(f"{path}: no BOS and EOS tokens (<|begin_of_text|> and <|end_of_text|>, or <s> and </s>)")
        self.bos_id, self.eos_id = special[bos], special[eos]
        self.stop_ids = {special[t] for t in (eos, "<|eom_id|>", "<|eot_id|>") if t in special}  # instruct Llama 3

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self.encode_text(text) + [self.eos_id] * eos

def train_tokenizer(texts, path, vocab_size):
    # The demo's LLaMA-style BPE (unk 0, bos 1, eos 2, byte fallback); identity normalisation: decode(encode(t)) == t.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
                                   max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    write_atomic(path, model.getvalue())

# Alpaca's prompt, byte for byte: released Alpaca models (and sample.py) expect exactly this text.
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:")

def format_prompt(instruction, input=""):
    return (PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT).format(instruction=instruction, input=input)

def read_records(path):
    # (where, number, record) for each value of a JSON array or JSONL file; where names file and line (or item).
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [(None, f.read())] if path.endswith(".json") else [(n, t) for n, t in enumerate(f, 1) if t.strip()]
    records = []
    for lineno, text in lines:
        try:
            records.append((lineno, json.loads(text)))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{lineno or e.lineno}: not valid JSON ({e.msg})")
    if not path.endswith(".json"):
        return [(f"{path}:{n}", n, record) for n, record in records]
    if not isinstance(records[0][1], list):
        raise SystemExit(f"{path}: expected a JSON array")
    return [(f"{path}: item {i}", i, item) for i, item in enumerate(records[0][1])]

def read_examples(path):
    # {instruction, input, output} examples; a self-instruct seed task ({instruction, instances: [{input, output}]})
    # gives one per instance; a databricks-dolly-15k record its context as input and its response as output.
    examples, dolly = [], False
    for where, _, record in read_records(path):
        if not isinstance(record, dict):
            raise SystemExit(f"{where}: expected a JSON object")
        names = {}  # the file's own field names, for error messages
        if "output" not in record and "response" in record:
            dolly, names = True, {"input": "context", "output": "response"}
            record = {"instruction": record.get("instruction"), "input": record.get("context", ""),
                      "output": record["response"]}
        instances = record.get("instances", [record])
        if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
            raise SystemExit(f"{where}: field 'instances' must be a non-empty list of objects")
        for instance in instances:
            example = {"instruction": record.get("instruction"), "input": instance.get("input", ""),
                       "output": instance.get("output")}
            for field, value in example.items():
                if not isinstance(value, str):
                    problem = "missing" if value is None else "must be a string"
                    raise SystemExit(f"{where}: field '{names.get(field, field)}' {problem}")
            if not example["instruction"].strip():
                raise SystemExit(f"{where}: field 'instruction' is empty")
            examples.append(example)
    if not examples:
        raise SystemExit(f"{path}: no examples")
    if dolly and os.environ.get("RANK", "0") == "0":
        print(f"data: dolly fields (context -> input, response -> output) in {path}")
    return examples

def tokenize_example(tokenizer, example, max_seq_len, stats):
    # Ids of prompt + response + EOS, and how many lead ids are prompt (no loss). As Alpaca, the joint tokenization; the
    # prompt is what it shares with the prompt alone, so a piece straddling the boundary counts as response.
    prompt = format_prompt(example["instruction"], example["input"])
    ids, alone = tokenizer.encode(prompt + example["output"], bos=True, eos=True), tokenizer.encode(prompt, bos=True)
    n_prompt = next((i for i, (a, b) in enumerate(zip(ids, alone)) if a != b), len(alone))
    prompt_ids, response_ids = ids[:n_prompt], ids[n_prompt:]
    # Too long: cut the prompt's middle (keeping its start and the "### Response:" cue), the response's end only past
    # 3/4 of the row: every example keeps supervised tokens, where right-truncation can drop the whole response.
    keep = min(n_prompt, max(max_seq_len - len(response_ids), max_seq_len // 4))
    if keep < n_prompt:
        prompt_ids = prompt_ids[:keep // 2] + prompt_ids[n_prompt - (keep - keep // 2):]
    response_ids = response_ids[:max_seq_len - keep]
    stats["prompts_cut"] += keep < n_prompt
    stats["responses_cut"] += len(response_ids) < len(ids) - n_prompt
    stats["tokens_dropped"] += len(ids) - keep - len(response_ids)
    return prompt_ids + response_ids, keep

def pack(examples, max_seq_len):
    # First-fit decreasing (few rows, deterministic); n tokens take n - 1 positions (inputs [:-1], targets [1:]).
    rows, space = [], []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0]) - 1
        r = next((r for r in range(len(rows)) if space[r] >= n), len(rows))
        if r == len(rows):
            rows.append([])
            space.append(max_seq_len)
        rows[r].append(i)
        space[r] -= n
    return rows

def make_batch(rows, examples, dev):
    # Targets -100 where there is no loss; positions restart; the mask: causal, each example (padding: doc -1) alone.
    length = max(sum(len(examples[i][0]) - 1 for i in row) for row in rows)
    length = 64 * math.ceil(max(length, 1) / 64)  # few distinct shapes (see Transformer.forward)
    tokens, positions, targets, doc = (torch.full((len(rows), length), fill) for fill in (0, 0, -100, -1))
    for r, row in enumerate(rows):
        t = 0
        for d, (ids, n_prompt) in enumerate(examples[i] for i in row):
            n = len(ids) - 1
            tokens[r, t:t + n], positions[r, t:t + n], doc[r, t:t + n] = torch.tensor(ids[:-1]), torch.arange(n), d
            targets[r, t + n_prompt - 1:t + n] = torch.tensor(ids[n_prompt:])
            t += n
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    return tokens.to(dev), targets.to(dev), positions.to(dev), mask[:, None].to(dev)

def split_rows(rows, rank, world_size, micro_batch_size):
    # Every process runs as many micro-batches (FSDP's collectives need it): one short of them runs an empty row (no
    # loss) for each it lacks. A micro-batch is not filled up with empty rows: each would cost a forward.
    mine = rows[rank::world_size]
    n_micro = max(1, math.ceil(math.ceil(len(rows) / world_size) / micro_batch_size))
    micro = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return micro + [[[]]] * (n_micro - len(micro))

def lr_at(step, total_steps, learning_rate, warmup_ratio):
    # Linear warmup then cosine decay to zero, as Hugging Face's cosine schedule used by Alpaca (step 0 has lr 0).
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return learning_rate * step / warmup
    return learning_rate * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

@torch.no_grad()
def evaluate(model, examples, dev, autocast, args):
    # The mean loss per response token, over all processes (each packs all examples and runs its share of the rows).
    model.eval()
    loss_sum = torch.zeros((), device=dev)
    rows = pack(examples, args.max_seq_len)
    for micro in split_rows(rows, dist.get_rank(), dist.get_world_size(), args.micro_batch_size):
        tokens, targets, positions, mask = make_batch(micro, examples, dev)
        with autocast:
            loss_sum += model(tokens, positions, mask, targets).float()
    dist.all_reduce(loss_sum)
    model.train()
    return loss_sum.item() / max(1, sum(len(ids) - n_prompt for ids, n_prompt in examples))

@torch.no_grad()
def greedy_answer(model, tokenizer, instruction, input, dev, max_new_tokens=300):
    # The run's closing answers (sample.py samples): greedy, on an fp32 KV cache (fine for bf16); all processes run it.
    ids, config = tokenizer.encode(format_prompt(instruction, input), bos=True), model.args
    shape = (1, config.n_kv_heads or config.n_heads, len(ids) + max_new_tokens, config.head_dim)
    cache = [tuple(torch.zeros(shape, device=dev) for _ in "kv") for _ in range(config.n_layers)]
    new, tokens = [], torch.tensor([ids], device=dev)
    while len(new) < max_new_tokens and len(ids) + len(new) < config.max_seq_len:
        logits = model(tokens, cache=cache, cache_pos=len(ids) + len(new) - tokens.shape[1], last_only=True)
        next_id = logits[0, -1, :tokenizer.vocab_size].argmax().item()  # a model's vocab may be padded beyond
        if next_id in tokenizer.stop_ids:
            break
        new.append(next_id)
        tokens = torch.tensor([[next_id]], device=dev)
    return tokenizer.decode(new)

def show_answers(model, tokenizer, examples, dev, log):
    # A training and a held-out instruction: a small model learns the first long before it generalises to the second.
    from rouge_score import rouge_scorer
    model.eval()  # no dropout (LoRA's) from here on
    for kind, example in zip(("training", "held-out"), examples):
        # At most twice the reference's length (32-300 tokens): an untrained model may never say EOS.
        cap = min(300, max(32, 2 * len(tokenizer.encode(example["output"]))))
        reply = greedy_answer(model, tokenizer, example["instruction"], example["input"], dev, cap)
        rouge = rouge_scorer.RougeScorer(["rougeL"]).score(example["output"], reply)["rougeL"].fmeasure
        log(f"\n{kind} instruction: {example['instruction']}"
            + (f"\ninput: {example['input']}" if example["input"] else "")
            + f"\nmodel's answer: {reply}\nreference answer: {example['output']}\nROUGE-L: {rouge:.2f}")

def prepare_data(args, log):
    # A seeded validation split held out, the tokenizer (the demo's trained on the training split), all tokenized.
    examples = read_examples(args.data)
    order = np.random.default_rng(args.seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(args.val_fraction * len(examples)))) if args.val_fraction > 0 else 0
    val_raw, train_raw = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
    path = find_tokenizer(args.init) if args.init else os.path.join(args.out_dir, "tokenizer.model")
    if not args.init and dist.get_rank() == 0 and not (args.resume and os.path.exists(path)):
        os.makedirs(args.out_dir, exist_ok=True)
        train_tokenizer([format_prompt(e["instruction"], e["input"]) + e["output"] for e in train_raw], path,
                        tiny_model["vocab_size"])
    dist.barrier()
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no tokenizer (nor original/tokenizer.model, tokenizer.json) there")
    tokenizer, stats = Tokenizer(path), {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0}
    train_set, val_set = ([tokenize_example(tokenizer, e, args.max_seq_len, stats) for e in raw]
                          for raw in (train_raw, val_raw))
    log(f"data: {len(train_set)} train / {len(val_set)} validation examples from {args.data}; truncated to "
        f"{args.max_seq_len} tokens: {stats['prompts_cut']} prompts and {stats['responses_cut']} responses "
        f"({stats['tokens_dropped']} tokens dropped)")
    return tokenizer, train_raw, val_raw, train_set, val_set

def build_model(args, tokenizer, dev, amp_dtype, world_size, log):
    # --init (or the demo's random tiny LLaMA), with LoRA if asked, built on the meta device, sharded (FSDP2: each
    # block, then the rest), then given its weights; on GPUs fp32 master weights, bf16 compute, fp32 gradient sums.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # An --init is memory-mapped: the processes share one copy in RAM.
    source = Transformer.from_pretrained(args.init) if args.init else \
        Transformer(ModelArgs(**{**tiny_model, "vocab_size": tokenizer.vocab_size})).init_weights()
    config, full_state = source.args, source.state_dict()
    config.max_seq_len = max(config.max_seq_len, args.max_seq_len)
    with torch.device("meta"):
        model = Transformer(config)
    model.activation_checkpointing = args.activation_checkpointing
    if args.lora_rank:
        # The frozen model is held in the compute dtype (bf16: 2 bytes a parameter, no Adam state); adapters in fp32.
        model.to(amp_dtype)
        full_state = {k: v.to(amp_dtype) for k, v in full_state.items()} | add_lora(
            model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","), args.seed)
    mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)} \
        if dev.type == "cuda" else {}
    for layer in model.layers if args.compile else []:
        layer.compile()
    # One process gains nothing from sharding, and a small model pays for its hooks.
    for module in [*model.layers, model] if world_size > 1 else []:
        fully_shard(module, **mp)
    model.to_empty(device=dev)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True))
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = f", LoRA rank {args.lora_rank} on {args.lora_targets}" if args.lora_rank else ""
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable "
        f"({100 * n_trainable / n_params:.2f}%{lora}), {config.n_layers} layers, dim {config.dim}, vocab "
        f"{config.vocab_size}; {world_size} process(es) on {dev.type}, {args.dtype}")
    return model

def start_processes(device):
    # One process (python train.py) or many (torchrun, FSDP): a process group either way, so the code is the same.
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)  # not under torchrun
    dist.init_process_group(device_id=dev if dev.type == "cuda" else None, **alone)  # nccl for a GPU, else gloo
    return dist.get_rank(), dist.get_world_size(), dev

def main(argv=None):
    import resource  # Unix only, hence here
    args = parse_args(argv)
    rank, world_size, dev = start_processes(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"settings ({'--init: Alpaca' if args.init else 'no --init: the demo'}'s recipe, then the flags given): "
        + " ".join(f"--{k}={v}" for k, v in vars(args).items()))
    torch.manual_seed(args.seed)
    amp_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    autocast = torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    tokenizer, train_raw, val_raw, train_set, val_set = prepare_data(args, log)
    model = build_model(args, tokenizer, dev, amp_dtype, world_size, log)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  betas=(args.beta1, args.beta2), eps=1e-8, weight_decay=args.weight_decay,
                                  fused=dev.type == "cuda" or None, foreach=dev.type != "cuda" or None)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    step = first_step = load_resume_state(model, optimizer, args.out_dir) if args.resume else 0
    # MFU on a GPU: 6 FLOPs a parameter a token (4 with LoRA) over the bf16 peak, a few % off at 7B (bench.py: exact).
    peak = next((v for k, v in {"A100": 312e12, "H100": 989e12, "H200": 989e12}.items() if dev.type == "cuda" and
                 amp_dtype == torch.bfloat16 and k in torch.cuda.get_device_name(dev)), None)
    flops_per_token = (4 if args.lora_rank else 6) * sum(p.numel() for p in model.parameters())
    log(f"training: {total_steps} steps of {args.batch_size} examples, {args.micro_batch_size} packed rows of "
        f"{args.max_seq_len} per forward" + (f"; resumed from {args.out_dir} at step {step}" if args.resume else ""))
    lora_meta = {k: str(getattr(args, k)) for k in ("init", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout")}
    t_start = time.perf_counter()
    while step < total_steps:
        t0 = time.perf_counter()
        torch.manual_seed(hash((args.seed, step, rank)))  # LoRA's dropout: a resumed run draws as a straight one
        # Each step takes the next batch_size examples of this epoch's seeded shuffle; every process packs the
        # same examples and works on its share of the rows, so the step is the same on any number of processes.
        epoch, k = divmod(step, steps_per_epoch)
        shuffled = np.random.default_rng([args.seed, epoch]).permutation(len(train_set))
        batch = [train_set[i] for i in shuffled[k * args.batch_size:(k + 1) * args.batch_size]]
        n_targets = sum(len(ids) - n_prompt for ids, n_prompt in batch)
        optimizer.param_groups[0]["lr"] = lr = lr_at(step, total_steps, args.learning_rate, args.warmup_ratio)
        micro_batches = split_rows(pack(batch, args.max_seq_len), rank, world_size, args.micro_batch_size)
        loss_sum = torch.zeros((), device=dev)
        for i, micro in enumerate(micro_batches):
            if world_size > 1:  # gradients are reduced across processes only on the last micro-batch
                model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            tokens, targets, positions, mask = make_batch(micro, batch, dev)
            with autocast:
                loss = model(tokens, positions, mask, targets)
            # Divide by the step's total number of response tokens: the loss is a mean over tokens, not a mean
            # of per-batch means. FSDP averages gradients over processes, hence the world_size factor.
            (loss * world_size / n_targets).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_interval == 0 or step == total_steps:
            dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / n_targets  # waits for the GPU: the time taken below is the whole step's
            tokens_per_s = sum(len(ids) - 1 for ids, _ in batch) / (time.perf_counter() - t0)
            memory = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            eta = (time.perf_counter() - t_start) / (step - first_step) * (total_steps - step)
            mfu = f" | mfu {100 * flops_per_token * tokens_per_s / world_size / peak:.1f}%" if peak else ""
            log(f"step {step}/{total_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | grad norm "
                f"{grad_norm.item():.2f} | {tokens_per_s:,.0f} tok/s{mfu} | mem {memory / 2 ** 30:.2f} GiB | eta "
                f"{eta / 60:.1f} min", flush=True)
        if val_set and (step % args.eval_interval == 0 or step == total_steps):
            log(f"step {step}: validation loss {evaluate(model, val_set, dev, autocast, args):.4f}")
        if step % args.save_interval == 0 or step == total_steps:
            save_checkpoint(model, optimizer, step, tokenizer.path, args.out_dir,
                            lora_meta if args.lora_rank else None, args.save_hf)
            log(f"saved {args.out_dir}")

    show_answers(model, tokenizer, [train_raw[0], *val_raw[:1]], dev, log)
    dist.destroy_process_group()

# Plumbing: checkpoints in (Meta's and Hugging Face's layouts), out (Meta's, the resume state, HF's), the command line.

def read_meta_checkpoint(path):
    params = json.loads(Path(path, "params.json").read_text())
    config = ModelArgs(**{k: v for k, v in params.items() if k in {f.name for f in fields(ModelArgs)}})
    # Without rope.freqs, the rotary table Meta stores: we compute it.
    shards = [{k: v for k, v in torch.load(f, map_location="cpu", mmap=True, weights_only=True).items()
               if k != "rope.freqs"} for f in sorted(Path(path).glob("consolidated.*.pth"))]
    if not shards:
        raise SystemExit(f"{path}: no consolidated.*.pth files")
    # Meta's Llama 3.2 files carry output.weight (a copy of the embedding); ours omit it when tied.
    config.tie_word_embeddings = "output.weight" not in shards[0]
    if config.vocab_size <= 0:  # LLaMA-1 writes -1 and leaves the size to the tokenizer
        config.vocab_size = sum(s["output.weight"].shape[0] for s in shards)
    # Larger models come split for model parallelism; each tensor is cut along the one dim where the pieces add up to
    # the full size (column-parallel along 0, row-parallel along 1), or is replicated. Misfits: the strict load names.
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    state = {}
    for name, pieces in ((k, [s[k] for s in shards]) for k in shards[0]):
        full = expected[name].shape if name in expected else pieces[0].shape
        dims = [d for d in range(pieces[0].dim()) if sum(p.shape[d] for p in pieces) == full[d]]
        state[name] = torch.cat(pieces, dim=dims[0]) if pieces[0].shape != full and dims else pieces[0]
    return config, state

# Hugging Face's names of ModelArgs' fields (config.json) and of the tensors, for read_hf_checkpoint and export_hf.
HF_CONFIG = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 n_kv_heads="num_key_value_heads", norm_eps="rms_norm_eps", max_seq_len="max_position_embeddings",
                 **{name: name for name in ("vocab_size", "head_dim", "tie_word_embeddings", "sliding_window")})
HF_LLAMA3_ROPE = dict(rope_scaling_factor="factor", low_freq_factor="low_freq_factor",
                      high_freq_factor="high_freq_factor", original_max_seq_len="original_max_position_embeddings")
HF_BLOCK = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}

def hf_names(config):
    # {Hugging Face tensor name: ours} for every tensor of the model (the output layer is absent when tied).
    return {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"} | {f"model.layers.{i}.{h}.weight": f"layers.{i}.{m}.weight"
                                                  for i in range(config.n_layers) for h, m in HF_BLOCK.items()}

def hf_to_meta_qk(w, n_heads, inverse=False):
    # HF orders each head's q/k rows halves-first for its rotate-half RoPE, Meta interleaves them; inverse: to HF's.
    halves = (n_heads, w.shape[0] // n_heads // 2, 2) if inverse else (n_heads, 2, w.shape[0] // n_heads // 2)
    return w.reshape(*halves, w.shape[1]).transpose(1, 2).reshape(w.shape)

def config_from_hf(cfg, where):
    # ModelArgs from transformers 4.x's or 5.x's config.json, refusing (by key) what this LLaMA does not compute.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for key, refused, why in (
            ("model_type", cfg.get("model_type") not in ("llama", "mistral"),
             "only the LLaMA family (llama, mistral) is implemented"),
            ("hidden_act", cfg.get("hidden_act", "silu") != "silu", "this LLaMA's feed-forward is SwiGLU (silu)"),
            *((key, cfg.get(key), "this LLaMA's linear layers have no bias") for key in ("attention_bias", "mlp_bias")),
            ("rope_parameters" if "rope_parameters" in cfg else "rope_scaling", rope_type not in ("default", "llama3"),
             f"rope_type '{rope_type}' is not implemented (only default and llama3)")):
        if refused:
            raise SystemExit(f"{where}: {key}={json.dumps(cfg.get(key))}: {why}")
    config = ModelArgs(**{"norm_eps": 1e-6, **{name: cfg[key] for name, key in HF_CONFIG.items() if key in cfg}},
                       rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type == "llama3":
        config.use_scaled_rope = True
        config.__dict__.update({name: rope[key] for name, key in HF_LLAMA3_ROPE.items()})
    if config.sliding_window is not None:  # full attention equals sliding-window attention up to the window
        config.max_seq_len = min(config.max_seq_len, config.sliding_window)
    # HF stores the FFN width itself; choose multiple_of and the multiplier so LLaMA's rule lands exactly on it.
    config.multiple_of = cfg["intermediate_size"]
    config.ffn_dim_multiplier = cfg["intermediate_size"] / int(8 * config.dim / 3)
    return config

def read_hf_checkpoint(path):
    config = config_from_hf(json.loads(Path(path, "config.json").read_text()), os.path.join(path, "config.json"))
    # model*: Mistral's repos also hold a consolidated.safetensors in Mistral's own names.
    files = sorted(Path(path).glob("model*.safetensors")) or sorted(Path(path).glob("pytorch_model*.bin"))
    if not files:
        raise SystemExit(f"{path}: no model*.safetensors or pytorch_model*.bin files")
    # A name not in the table keeps its own, which the strict load in from_pretrained reports as unexpected.
    names, state, kv_heads = hf_names(config), {}, config.n_kv_heads or config.n_heads
    for file in files:
        tensors = safetensors.torch.load_file(file) if file.suffix == ".safetensors" else \
            torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in tensors.items():
            if name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor = hf_to_meta_qk(tensor, config.n_heads if "q_proj" in name else kv_heads)
            state[names.get(name, name)] = tensor
    return config, state

# Llama 3's tokenizer as Meta's reference builds it: its split pattern, and 256 special tokens after the BPE ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]

def write_atomic(path, payload):
    # Bytes (or an object, torch.save'd) via a temp file and a rename: a crash never leaves half a file.
    with open(f"{path}.tmp", "wb") as f:
        f.write(payload) if isinstance(payload, bytes) else torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)

# The resume state is out_dir/resume/<n>/, n counting saves: the step, model and optimizer (with LoRA only what trains)
# sharded by torch.distributed.checkpoint, so a run may resume on another number of processes. Its .metadata, written
# last, marks it complete. The newest complete one is read; a save deletes the others once its own is complete.

def save_checkpoint(model, optimizer, step, tokenizer_path, out_dir, lora_meta=None, save_hf=False):
    # The model in Meta's layout (LoRA merged), LoRA's adapters.safetensors (metadata: lora_meta), the resume state.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        if lora_meta:
            adapters = {name: t.float().contiguous() for name, t in full.items() if ".lora_" in name}
            write_atomic(os.path.join(out_dir, "adapters.safetensors"), safetensors.torch.save(adapters, lora_meta))
            full = merge_lora(full, float(lora_meta["lora_alpha"]) / int(lora_meta["lora_rank"]))
        write_atomic(os.path.join(out_dir, "consolidated.00.pth"), full)
        write_atomic(os.path.join(out_dir, "params.json"), json.dumps(model.args.__dict__, indent=2).encode())
        if save_hf:
            export_hf(full, model.args, tokenizer_path, os.path.join(out_dir, "hf"))
        if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
            write_atomic(os.path.join(out_dir, "tokenizer.model"), Path(tokenizer_path).read_bytes())
    del full
    states = resume_states(out_dir)  # listed by every process before any writes to them: one name for the new one
    dist.barrier()
    new = Path(out_dir, "resume", str(int(states[-1].name) + 1 if states else 1))
    dcp.save({"step": step, **trainable_state(model, optimizer)}, checkpoint_id=new)
    if dist.get_rank() == 0:
        for old in states:  # a delete cut short leaves an older state, or one without .metadata: both ignored
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()

def resume_states(out_dir, complete=False):
    states = sorted((d for d in Path(out_dir, "resume").glob("*") if d.name.isdigit()), key=lambda d: int(d.name))
    return [d for d in states if not complete or (d / ".metadata").exists()]

def trainable_state(model, optimizer):
    # As saved and loaded: only what trains (dcp.load refuses a checkpoint that lacks any of it).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optim": get_optimizer_state_dict(model, optimizer)}

def load_resume_state(model, optimizer, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    if not (states := resume_states(out_dir, complete=True)):
        raise SystemExit(f"--resume: no saved state in {out_dir}")
    state = {"step": 0, **trainable_state(model, optimizer)}
    dcp.load(state, checkpoint_id=states[-1])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    return state["step"]

def export_hf(state, config, tokenizer_path, folder):
    # A LlamaForCausalLM folder (transformers 4.x, 5.x, vLLM), stop ids in generation_config.json; via folder.tmp.
    tokenizer, kv_heads = Tokenizer(tokenizer_path), config.n_kv_heads or config.n_heads
    tensors = {hf: state[name] for hf, name in hf_names(config).items() if name in state}
    tensors = {hf: (hf_to_meta_qk(w, config.n_heads if "q_proj" in hf else kv_heads, inverse=True) if hf.endswith(
        ("q_proj.weight", "k_proj.weight")) else w).contiguous() for hf, w in tensors.items()}
    rope = dict(rope_type="llama3", **{key: getattr(config, name) for name, key in HF_LLAMA3_ROPE.items()}) \
        if config.use_scaled_rope else None
    hf = {key: getattr(config, name) for name, key in HF_CONFIG.items()} | dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=kv_heads,
        intermediate_size=ffn_hidden_dim(config), hidden_act="silu", rope_theta=config.rope_theta, rope_scaling=rope,
        rope_parameters={**(rope or {"rope_type": "default"}), "rope_theta": config.rope_theta},
        torch_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    generation = dict(bos_token_id=tokenizer.bos_id, eos_token_id=sorted(tokenizer.stop_ids))
    # Where each kind of tokenizer file sits in a Hugging Face folder (Llama 3's Meta file goes to original/).
    name = "tokenizer.json" if hasattr(tokenizer, "hf") else "original/tokenizer.model" if hasattr(tokenizer, "tt") \
        else "tokenizer.model"
    files = {"config.json": hf, "generation_config.json": generation, name: Path(tokenizer_path).read_bytes()}
    # transformers and vLLM find BOS through tokenizer_config.json: an --init folder's own tokenizer files go along;
    # for a sentencepiece model without them, one naming BOS and EOS (transformers converts tokenizer.model itself).
    source = Path(os.path.dirname(tokenizer_path).removesuffix(os.sep + "original"))
    extras = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} - set(files)
    files |= {extra: (source / extra).read_bytes() for extra in extras if (source / extra).exists()}
    if "tokenizer_config.json" not in files and hasattr(tokenizer, "sp"):
        files["tokenizer_config.json"] = dict(bos_token=tokenizer.sp.id_to_piece(tokenizer.bos_id), add_bos_token=True,
                                              eos_token=tokenizer.sp.id_to_piece(tokenizer.eos_id), add_eos_token=False)
    tmp = Path(folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / name).parent.mkdir(parents=True)
    safetensors.torch.save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    for file, payload in files.items():
        (tmp / file).write_bytes(payload if isinstance(payload, bytes) else json.dumps(payload, indent=2).encode())
    shutil.rmtree(folder, ignore_errors=True)  # a crash here leaves no hf/ (never half of one); the next save writes it
    os.replace(tmp, folder)

def parse_args(argv):
    # The settings at the top as flags, their values as defaults (booleans also bare); tiny_recipe's without --init.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for name, default in settings.items():
        demo = f"; without --init {tiny_recipe[name]!r} (tiny_recipe)" if name in tiny_recipe else ""
        kind = dict(type=str.lower, choices=["true", "false", "1", "0"], nargs="?", const="true",
                    metavar="true|false") if isinstance(default, bool) else dict(type=type(default))
        parser.add_argument(f"--{name}", help=f"default {default!r}{demo}", **kind)
    given = {k: v in ("true", "1") if isinstance(settings[k], bool) else v
             for k, v in vars(parser.parse_args(argv)).items()}
    return argparse.Namespace(**{**settings, **({} if given.get("init", settings["init"]) else tiny_recipe), **given})

if __name__ == "__main__":
    main()
