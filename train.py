"""
Supervised fine-tuning of LLaMA on instruction data: the Stanford Alpaca recipe in one file.

    python train.py                                    # tiny LLaMA on seed_tasks.jsonl, on CPU, in minutes
    torchrun --nproc_per_node=8 train.py --init=/path/to/llama-7b --data=alpaca_data.json

Reads top to bottom: the recipe's settings, the model, checkpoint loading, the tokenizer, the data (prompt
format, loss mask, packing), then the training loop. Any setting below can be overridden as --name=value.
"""
import glob
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# The Alpaca-7B recipe (Taori et al., 2023): 3 epochs, 128 examples per step, lr 2e-5, cosine with 3% warmup.
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
# LoRA (Hu et al., 2021): freeze the model, train a low-rank update of its linear layers: a 7-8B model on one GPU
# (README). alpaca-lora used rank 8, alpha 16, dropout 0.05 and --learning_rate=3e-4 (adapters want a far higher
# rate than full fine-tuning's 2e-5: set it yourself) on wq and wv only; every linear layer of the blocks here, as
# QLoRA (Dettmers et al., 2023) found that needed to match full fine-tuning.
lora_rank = 0                     # 0: full fine-tuning (Alpaca); R > 0: rank-R adapters on a frozen model
lora_alpha = 16.0                 # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05               # on the adapters' input only
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
# With no --init there is no pretrained model to fine-tune, so the demo trains a tiny LLaMA from scratch on
# the seed tasks. That needs a high learning rate, small batches and many passes; these apply only then.
tiny_model = dict(dim=192, n_layers=4, n_heads=6, vocab_size=2000, multiple_of=32, max_seq_len=512)
# On CPU, fp32 is faster than bf16 autocast for matrices this small.
tiny_recipe = dict(epochs=20, batch_size=16, learning_rate=2e-3, warmup_ratio=0.05, micro_batch_size=4, dtype="float32")

config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


@dataclass
class ModelArgs:
    # Field names follow Meta's params.json, so a checkpoint's params.json loads as is.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The mean of squares is taken in fp32: bf16 has too few bits to normalise well.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_cos_sin(positions, head_dim, theta):
    """cos and sin of the rotary angles for each position: (B, T, head_dim/2), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Meta's convention rotates interleaved pairs (x0, x1), (x2, x3), ... of each head.
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, cache_pos):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:  # sampling: keys and values of earlier tokens come from the cache
            cache_k, cache_v = cache
            cache_k[:, :, cache_pos:cache_pos + T] = k
            cache_v[:, :, cache_pos:cache_pos + T] = v
            k, v = cache_k[:, :, :cache_pos + T], cache_v[:, :, :cache_pos + T]
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a group of q heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def ffn_hidden_dim(args):
    # LLaMA's rule: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to a multiple of multiple_of.
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        hidden = ffn_hidden_dim(args)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al., 2021): y = W x + (alpha / R) B A x, with A
    (R x in) and B (out x R) in fp32. The weight keeps its name (wq.weight): merged, the names are the base's."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=base.weight.device))
        self.scale, self.dropout = alpha / rank, dropout

    def forward(self, x):
        # In x's dtype, as autocast would do: a bf16 model also runs without it (the end-of-run answers).
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        update = F.linear(F.linear(F.dropout(x, self.dropout, self.training), a), b)
        return F.linear(x, self.weight) + self.scale * update


def add_lora(model, rank, alpha, dropout, targets, seed):
    """Freeze the model and put the target linear layers of each block in LoRALinear. Returns the adapters' initial
    values, drawn on the CPU from a seeded generator, so the same on any number of processes: A as nn.Linear draws a
    weight (uniform, +-1/sqrt(in), as PEFT does), B zero, so that step 0 is the base model exactly."""
    known = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    if not targets or any(t not in known for t in targets):
        raise SystemExit(f"--lora_targets={','.join(targets)}: expected some of {','.join(known)}")
    model.requires_grad_(False)
    for block in model.layers:
        for part in (block.attention, block.feed_forward):
            for name in targets:
                if name in part._modules:
                    setattr(part, name, LoRALinear(getattr(part, name), rank, alpha, dropout))
    generator, init = torch.Generator().manual_seed(seed), {}
    for name, p in model.named_parameters():
        if name.endswith(".lora_a"):
            init[name] = (torch.rand(p.shape, generator=generator) * 2 - 1) / math.sqrt(p.shape[1])
        elif name.endswith(".lora_b"):
            init[name] = torch.zeros(p.shape)
    return init


def merge_lora(state, scale):
    """Fold each adapter of a state dict into its weight, W + scale * B A, in place, and drop the adapters. Every
    tensor comes out in fp32, as a full run writes them: rounding W + B A to bf16 would lose much of the update."""
    for name in [n for n in state if n.endswith(".lora_a")]:
        prefix = name[:-len("lora_a")]
        a, b = state.pop(prefix + "lora_a").float(), state.pop(prefix + "lora_b").float()
        state[prefix + "weight"] = state[prefix + "weight"].float() + scale * (b @ a)
    for name in state:
        state[name] = state[name].float()
    return state


def apply_adapters(state, path):
    """A base model's state dict with the adapters of a run's adapters.safetensors merged in: what that run's own
    consolidated.00.pth holds, for whoever has the base model and only the small adapters file."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta, adapters = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    if "lora_rank" not in meta or "lora_alpha" not in meta:
        raise SystemExit(f"{path}: no lora_rank/lora_alpha in its metadata: not an adapters file of train.py")
    for name, t in adapters.items():
        weight, dim = state.get(name.rsplit(".", 1)[0] + ".weight"), int(name.endswith(".lora_a"))
        if weight is None or t.shape[dim] != weight.shape[dim]:
            raise SystemExit(f"{path}: adapter '{name}' of shape {tuple(t.shape)} does not fit the base model")
    return merge_lora({**state, **adapters}, float(meta["lora_alpha"]) / int(meta["lora_rank"]))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.activation_checkpointing = False

    def forward(self, tokens, positions=None, mask=None, targets=None, cache=None, cache_pos=0, last_only=False):
        """Logits (B, T, vocab) for tokens (B, T); or, given targets, the summed cross-entropy over the
        positions whose target is not -100.

        positions: (B, T) position of each token (packed examples restart at 0); default 0..T-1 after cache_pos.
        mask: (B, 1, T, S) boolean, True where a query may attend to a key; default causal.
        cache: per layer (k, v) tensors of shape (B, n_kv_heads, S_max, head_dim); this call writes slots
               cache_pos..cache_pos+T and attends over slots 0..cache_pos+T.
        last_only: logits for the last position only (B, 1, vocab), all that sampling needs after a prefill.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=tokens.device).expand(B, T)
        if mask is None and cache is not None and T > 1:  # causal over the cached tokens and these
            mask = torch.ones(T, cache_pos + T, dtype=torch.bool, device=tokens.device).tril(cache_pos)
        cos, sin = rope_cos_sin(positions, self.args.dim // self.args.n_heads, self.args.rope_theta)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, None if cache is None else cache[i], cache_pos)
        h = self.norm(h)
        if targets is None:
            return self.output(h[:, -1:] if last_only else h).float()
        # Only response tokens carry a loss, so only they go through the (large) output layer. Their count is
        # padded to a multiple of 256 with ignored entries: few distinct shapes, as each new one costs a kernel
        # setup on CPU and a recompile under torch.compile.
        targets = targets.flatten()
        keep = (targets != -100).nonzero().squeeze(1)
        pad = -len(keep) % 256
        logits = self.output(h.flatten(0, 1)[F.pad(keep, (0, pad))]).float()
        return F.cross_entropy(logits, F.pad(targets[keep], (0, pad), value=-100), reduction="sum")

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    @staticmethod
    def from_pretrained(path, dtype=None):
        """A LLaMA from a Meta folder (params.json + consolidated.*.pth) or a Hugging Face folder
        (config.json + *.safetensors), with weights memory-mapped rather than copied where possible."""
        if os.path.exists(os.path.join(path, "params.json")):
            args, state = read_meta_checkpoint(path)
        elif os.path.exists(os.path.join(path, "config.json")):
            args, state = read_hf_checkpoint(path)
        else:
            raise SystemExit(f"{path}: neither a Meta (params.json) nor a Hugging Face (config.json) LLaMA folder")
        with torch.device("meta"):
            model = Transformer(args)
        check_state_dict(model, state, path)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model


def check_state_dict(model, state, path):
    """Refuse a checkpoint that does not fit the model exactly, naming the tensor at fault."""
    expected = model.state_dict()
    for name in expected:
        if name not in state:
            raise SystemExit(f"{path}: tensor '{name}' missing from the checkpoint")
        if tuple(state[name].shape) != tuple(expected[name].shape):
            raise SystemExit(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    for name in state:
        if name not in expected:
            raise SystemExit(f"{path}: unexpected tensor '{name}' in the checkpoint")


def read_meta_checkpoint(path):
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    if params.get("use_scaled_rope"):
        raise SystemExit(f"{path}/params.json: use_scaled_rope (LLaMA 3.1) is not supported by this LLaMA")
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known})
    shard_files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shard_files:
        raise SystemExit(f"{path}: no consolidated.*.pth files")
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in shard_files]
    for shard in shards:
        shard.pop("rope.freqs", None)  # Meta stores the rotary table; we compute it
    if args.vocab_size <= 0:  # LLaMA-1 writes -1 and leaves the size to the tokenizer
        args.vocab_size = sum(s["output.weight"].shape[0] for s in shards)
    if len(shards) == 1:
        return args, shards[0]
    # Larger models come split for model parallelism; each tensor is cut along the one dim where the
    # pieces add up to the full size (column-parallel along 0, row-parallel along 1), or is replicated.
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    state = {}
    for name, pieces in ((k, [s[k] for s in shards]) for k in shards[0]):
        full = expected[name].shape if name in expected else pieces[0].shape
        if pieces[0].shape == full:
            state[name] = pieces[0]
            continue
        for d in range(pieces[0].dim()):
            if sum(p.shape[d] for p in pieces) == full[d]:
                state[name] = torch.cat(pieces, dim=d)
                break
        else:
            raise SystemExit(f"{path}: tensor '{name}' shards of shape {tuple(pieces[0].shape)} "
                             f"do not assemble into {tuple(full)}")
    return args, state


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def read_safetensors(filename):
    # The format is an 8-byte header length, a JSON header of {name: dtype, shape, offsets}, then raw bytes;
    # small enough to read by hand, memory-mapped so a large file is not copied into RAM.
    with open(filename, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    buffer = np.memmap(filename, dtype=np.uint8, mode="c")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = torch.frombuffer(buffer, dtype=torch.uint8, offset=8 + header_len + begin, count=end - begin)
        tensors[name] = raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def hf_to_meta_qk(w, n_heads):
    # Hugging Face reorders each head's q/k rows so its rotate-half RoPE matches Meta's interleaved pairs;
    # put them back: HF keeps first halves then second halves, Meta interleaves them.
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_hf_checkpoint(path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("rope_scaling"):
        raise SystemExit(f"{path}/config.json: rope_scaling is not supported by this LLaMA")
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
                     max_seq_len=cfg.get("max_position_embeddings", 2048))
    # HF stores the FFN width itself; choose multiple_of so LLaMA's rule lands exactly on it.
    hidden = cfg["intermediate_size"]
    args.multiple_of = hidden
    if int(8 * args.dim / 3) > hidden:
        args.ffn_dim_multiplier = hidden / int(8 * args.dim / 3)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise SystemExit(f"{path}: no *.safetensors files")
    hf = {}
    for file in files:
        hf.update(read_safetensors(file))
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    n_kv = args.n_kv_heads or args.n_heads
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                 "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                 "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                 "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(args.n_layers):
        for hf_name, meta_name in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"layers.{i}.{meta_name}.weight"
    state = {}
    for name, tensor in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in names:
            raise SystemExit(f"{path}: unexpected tensor '{name}' in the checkpoint")
        if name.endswith("q_proj.weight"):
            tensor = hf_to_meta_qk(tensor, args.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = hf_to_meta_qk(tensor, n_kv)
        state[names[name]] = tensor
    return args, state


class Tokenizer:
    """LLaMA's sentencepiece tokenizer. LLaMA has no pad token (pad_id is -1); padding never reaches the loss."""

    def __init__(self, path):
        import sentencepiece as spm
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode(list(ids))


def train_tokenizer(texts, path, vocab_size):
    """A small LLaMA-style BPE tokenizer (unk 0, bos 1, eos 2, byte fallback) for the from-scratch demo."""
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    # As LLaMA's, it keeps text as is (sentencepiece's default turns newlines into spaces): decode(encode(t)) == t.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
                                   max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    write_atomic(path, model.getvalue())


# Alpaca's prompt, byte for byte: released Alpaca models (and sample.py) expect exactly this text.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction, input=""):
    return (PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT).format(instruction=instruction, input=input)


def read_records(path):
    """(where, number, record) for each JSON value of a JSON array or a JSONL file: `where` names the file and line
    (or array item) for error messages, `number` is that line or item number."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
            if not isinstance(items, list):
                raise SystemExit(f"{path}: expected a JSON array")
            return [(f"{path}: item {i}", i, item) for i, item in enumerate(items)]
        records = []
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append((f"{path}:{lineno}", lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return records


def read_examples(path):
    """{instruction, input, output} examples from a JSON array (alpaca_data.json) or a JSONL file; a JSONL line
    in the self-instruct seed format ({instruction, instances: [{input, output}]}) gives one example per instance."""
    examples = []
    for where, _, record in read_records(path):
        if not isinstance(record, dict):
            raise SystemExit(f"{where}: expected a JSON object")
        instances = record.get("instances", [record])
        if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
            raise SystemExit(f"{where}: field 'instances' must be a non-empty list of objects")
        for instance in instances:
            example = {"instruction": record.get("instruction"), "input": instance.get("input", ""),
                       "output": instance.get("output")}
            for field in ("instruction", "input", "output"):
                if not isinstance(example[field], str):
                    problem = "missing" if example[field] is None else "must be a string"
                    raise SystemExit(f"{where}: field '{field}' {problem}")
            if not example["instruction"].strip():
                raise SystemExit(f"{where}: field 'instruction' is empty")
            examples.append(example)
    if not examples:
        raise SystemExit(f"{path}: no examples")
    return examples


def tokenize_example(tokenizer, example, max_seq_len, stats):
    """Token ids of prompt + response + EOS, and how many leading ids are prompt (no loss on those)."""
    prompt = format_prompt(example["instruction"], example["input"])
    prompt_ids = tokenizer.encode(prompt, bos=True)
    # As in Alpaca, the response is tokenized together with the prompt, so its first piece is the one the model
    # sees at sampling time, right after "### Response:".
    response_ids = tokenizer.encode(prompt + example["output"], bos=True)[len(prompt_ids):] + [tokenizer.eos_id]
    if len(prompt_ids) + len(response_ids) > max_seq_len:
        # Cut the middle of the prompt first (keeping its start and the "### Response:" cue), and the end of the
        # response only if it alone would leave the prompt less than a quarter of the row: every example keeps
        # supervised tokens, unlike plain right-truncation which can drop the whole response.
        keep = max(max_seq_len - len(response_ids), max_seq_len // 4)
        if len(prompt_ids) > keep:
            stats["prompts_cut"] += 1
            stats["tokens_dropped"] += len(prompt_ids) - keep
            prompt_ids = prompt_ids[:keep // 2] + prompt_ids[len(prompt_ids) - (keep - keep // 2):]
        if len(prompt_ids) + len(response_ids) > max_seq_len:
            stats["responses_cut"] += 1
            stats["tokens_dropped"] += len(prompt_ids) + len(response_ids) - max_seq_len
            response_ids = response_ids[:max_seq_len - len(prompt_ids)]
    return prompt_ids + response_ids, len(prompt_ids)


def pack(examples, max_seq_len):
    """Group examples into rows of at most max_seq_len input tokens (first-fit decreasing: few rows, and
    deterministic). Each example of n tokens uses n - 1 positions: inputs are tokens[:-1], targets tokens[1:]."""
    rows, space = [], []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0]) - 1
        for r in range(len(rows)):
            if space[r] >= n:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_seq_len - n)
    return rows


def make_batch(rows, examples, dev):
    """Tensors for a micro-batch of packed rows: tokens, targets (-100 where there is no loss), positions that
    restart for each example, and an attention mask that keeps every example to itself (causal, same example)."""
    length = max(sum(len(examples[i][0]) - 1 for i in row) for row in rows)
    length = 64 * math.ceil(max(length, 1) / 64)  # few distinct shapes (see Transformer.forward)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    doc = torch.full((len(rows), length), -1, dtype=torch.long)  # padding is a document of its own
    for r, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            ids, n_prompt = examples[i]
            n = len(ids) - 1
            tokens[r, t:t + n] = torch.tensor(ids[:-1])
            targets[r, t + n_prompt - 1:t + n] = torch.tensor(ids[n_prompt:])
            positions[r, t:t + n] = torch.arange(n)
            doc[r, t:t + n] = d
            t += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return tokens.to(dev), targets.to(dev), positions.to(dev), mask[:, None].to(dev)


def split_rows(rows, rank, world_size, micro_batch_size):
    """This process's share of a step's rows, as micro-batches. Every process runs the same number of
    micro-batches (FSDP's collectives need that), so the short ones get empty rows, which carry no loss."""
    mine = rows[rank::world_size]
    n_micro = max(1, math.ceil(math.ceil(len(rows) / world_size) / micro_batch_size))
    mine = mine + [[]] * (n_micro * micro_batch_size - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def lr_at(step, total_steps):
    # Linear warmup then cosine decay to zero, as Hugging Face's cosine schedule used by Alpaca (step 0 has lr 0).
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return learning_rate * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def flops_of(rows, examples, args, frozen=False):
    """Training FLOPs for packed rows: 6 per parameter per token for the blocks, the output layer only on
    supervised tokens, and causal attention (6·L·dim·n² for an example of n tokens). A frozen model (LoRA) takes
    4, as its weights need no gradient (the adapters' own FLOPs, about 1% at rank 16, are left out)."""
    hidden = ffn_hidden_dim(args)
    kv_dim = (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    block_params = args.n_layers * (2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * hidden)
    total = 0
    for row in rows:
        for i in row:
            ids, n_prompt = examples[i]
            n = len(ids) - 1
            total += (4 if frozen else 6) * (block_params * n + args.dim * args.vocab_size * (n - n_prompt + 1))
            total += 6 * args.n_layers * args.dim * n * n
    return total


def measure_peak_flops(dev, dt):
    # No spec sheet for a CPU: time a large matmul in the training dtype and call that the peak.
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        table = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16
        return next((v for k, v in table.items() if k in name), None) if dt == torch.bfloat16 else None
    a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)


def write_atomic(path, payload):
    """Write bytes (or torch.save an object) to path via a temp file and rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    if isinstance(payload, bytes):
        with open(tmp, "wb") as f:
            f.write(payload)
    else:
        torch.save(payload, tmp)
    os.replace(tmp, path)


def save_checkpoint(model, optimizer, step, args, tokenizer_path, rank):
    """The model in Meta's layout (what sample.py and from_pretrained read), then the resume state: sharded
    model and optimizer (torch.distributed.checkpoint, so a run may resume on another number of processes).
    With LoRA, the adapters alone go to adapters.safetensors and merged into the weights everywhere else; the
    resume state holds only what trains (the adapters and their optimizer): the frozen model is --init's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if lora_rank:
            save_adapters(full, os.path.join(out_dir, "adapters.safetensors"))
            full = merge_lora(full, lora_alpha / lora_rank)
        write_atomic(os.path.join(out_dir, "consolidated.00.pth"), full)
        write_atomic(os.path.join(out_dir, "params.json"), json.dumps(args.__dict__, indent=2).encode())
        if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
            with open(tokenizer_path, "rb") as f:
                write_atomic(os.path.join(out_dir, "tokenizer.model"), f.read())
    del full
    resume_dir, tmp_dir, old_dir = (os.path.join(out_dir, name) for name in ("resume", "resume.tmp", "resume.old"))
    if rank == 0 and os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    dist.barrier()
    trained = StateDictOptions(ignore_frozen_params=True)
    dcp.save({"model": get_model_state_dict(model, options=trained),
              "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp_dir)
    if rank == 0:
        with open(os.path.join(tmp_dir, "step.json"), "w") as f:
            json.dump({"step": step}, f)
        if os.path.exists(resume_dir):
            os.replace(resume_dir, old_dir)
        os.replace(tmp_dir, resume_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    dist.barrier()


def save_adapters(state, path):
    """The adapters of a full state dict, with what it takes to apply them (see apply_adapters), in a small file."""
    from safetensors.torch import save
    tensors = {name: t.float().contiguous() for name, t in state.items() if ".lora_" in name}
    meta = {"lora_rank": str(lora_rank), "lora_alpha": str(lora_alpha), "lora_targets": lora_targets,
            "lora_dropout": str(lora_dropout), "init": init}
    write_atomic(path, save(tensors, metadata=meta))


def load_resume_state(model, optimizer):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_state_dict)
    resume_dir = os.path.join(out_dir, "resume")
    if not os.path.exists(resume_dir) and os.path.exists(resume_dir + ".old"):
        resume_dir += ".old"  # a crash between the two renames of save_checkpoint
    if not os.path.exists(os.path.join(resume_dir, "step.json")):
        raise SystemExit(f"--resume: no saved state in {out_dir}")
    # As saved: only what trains (dcp.load refuses a checkpoint that lacks any of it).
    state = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=resume_dir)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    with open(os.path.join(resume_dir, "step.json")) as f:
        return json.load(f)["step"]


def evaluate(model, examples, rank, world_size, dev, autocast):
    """Mean loss per response token over the validation examples, across all processes."""
    model.eval()
    loss_sum = torch.zeros(2, device=dev)
    with torch.no_grad():
        for micro in split_rows(pack(examples, max_seq_len), rank, world_size, micro_batch_size):
            tokens, targets, positions, mask = make_batch(micro, examples, dev)
            with autocast:
                loss_sum[0] += model(tokens, positions, mask, targets).float()
            loss_sum[1] += (targets != -100).sum()
    dist.all_reduce(loss_sum)
    model.train()
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


def answer(model, tokenizer, instruction, input, dev, max_new_tokens=100):
    """Greedy answer to one instruction, for the end-of-run demo (sample.py is the real sampler).
    Every process runs it: the sharded model's forward is collective."""
    model.eval()
    ids = tokenizer.encode(format_prompt(instruction, input), bos=True)
    new = []
    with torch.no_grad():
        while len(new) < max_new_tokens and len(ids) < max_seq_len:
            next_id = model(torch.tensor([ids], device=dev), last_only=True)[0, -1].argmax().item()
            if next_id == tokenizer.eos_id:
                break
            ids.append(next_id)
            new.append(next_id)
    model.train()
    return tokenizer.decode(new)


def parse_config(argv):
    """--name=value for any setting above; a bare --flag sets a boolean. Returns the names set explicitly."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for k in config_keys:
            print(f"  --{k}={globals()[k]}")
        sys.exit(0)
    given = set()
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: settings are given as --name=value (see --help)")
        key, has_value, value = arg[2:].partition("=")
        if key not in config_keys:
            raise SystemExit(f"unknown setting --{key} (see --help)")
        kind = type(globals()[key])
        if kind is bool:
            if has_value and value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key}={value}: expected true or false")
            globals()[key] = not has_value or value.lower() in ("true", "1")
        else:
            try:
                globals()[key] = kind(value)
            except ValueError:
                raise SystemExit(f"--{key}={value}: expected {kind.__name__}")
        given.add(key)
    return given


def main():
    given = parse_config(sys.argv[1:])
    if not init:
        for k, v in tiny_recipe.items():
            if k not in given:
                globals()[k] = v

    # One process (python train.py) or many (torchrun, FSDP): a process group either way, so the code is the same.
    launched = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if launched:
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(seed)
    amp_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()

    # The data: read, hold out a seeded validation split, and (for the demo) train a tokenizer on it.
    examples = read_examples(data)
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples)))) if val_fraction > 0 else 0
    val_raw, train_raw = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
    if init:
        tokenizer_path = os.path.join(init, "tokenizer.model")
    else:
        tokenizer_path = os.path.join(out_dir, "tokenizer.model")
        if rank == 0 and not (resume and os.path.exists(tokenizer_path)):
            os.makedirs(out_dir, exist_ok=True)
            train_tokenizer([format_prompt(e["instruction"], e["input"]) + e["output"] for e in train_raw],
                            tokenizer_path, tiny_model["vocab_size"])
        dist.barrier()
    if not os.path.exists(tokenizer_path):
        raise SystemExit(f"{tokenizer_path}: no tokenizer.model next to the checkpoint")
    tokenizer = Tokenizer(tokenizer_path)
    stats = {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0}
    train_set = [tokenize_example(tokenizer, e, max_seq_len, stats) for e in train_raw]
    val_set = [tokenize_example(tokenizer, e, max_seq_len, stats) for e in val_raw]
    log(f"data: {len(train_set)} train / {len(val_set)} validation examples from {data}; truncated to "
        f"{max_seq_len} tokens: {stats['prompts_cut']} prompts and {stats['responses_cut']} responses "
        f"({stats['tokens_dropped']} tokens dropped)")

    # The model: every process builds it on the meta device, shards it (FSDP2: each transformer block, then the
    # rest), then takes its shard of the weights.
    if init:
        pretrained = Transformer.from_pretrained(init)  # memory-mapped: the processes share one copy in RAM
        args, full_state = pretrained.args, pretrained.state_dict()
        if args.vocab_size != tokenizer.vocab_size:
            log(f"note: model vocab {args.vocab_size} != tokenizer vocab {tokenizer.vocab_size}")
    else:
        args = ModelArgs(**{**tiny_model, "vocab_size": tokenizer.vocab_size})
        scratch = Transformer(args)
        scratch.init_weights()
        full_state = scratch.state_dict()
    args.max_seq_len = max(args.max_seq_len, max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    model.activation_checkpointing = activation_checkpointing
    if lora_rank:
        # The frozen model is held in the compute dtype (bf16: 2 bytes a parameter, no gradient, no Adam state);
        # the adapters train in fp32.
        model.to(amp_dtype)
        adapters = add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets.split(","), seed)
        full_state = {**{k: v.to(amp_dtype) for k, v in full_state.items()}, **adapters}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # On GPUs FSDP keeps fp32 master weights but computes in bf16 and reduces gradients in fp32.
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if dev.type == "cuda" else None
    shard_options = {"mp_policy": mp} if mp else {}
    for layer in model.layers:
        if compile:
            layer.compile()
        if world_size > 1:  # a single process gains nothing from sharding, and a small model pays for its hooks
            fully_shard(layer, **shard_options)
    if world_size > 1:
        fully_shard(model, **shard_options)
    model.to_empty(device=dev)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True))
    del full_state
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    lora = f", LoRA rank {lora_rank} on {lora_targets}" if lora_rank else ""
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable ({100 * n_trainable / n_params:.2f}%"
        f"{lora}), {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}; {world_size} process(es) on "
        f"{dev.type}, {dtype}")

    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(beta1, beta2), eps=1e-8,
                                  weight_decay=weight_decay, fused=dev.type == "cuda" or None,
                                  foreach=dev.type != "cuda" or None)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total_steps = max_steps if max_steps > 0 else epochs * steps_per_epoch
    step = load_resume_state(model, optimizer) if resume else 0
    first_step = step
    if resume:
        log(f"resumed from {out_dir} at step {step}")
    peak_flops = measure_peak_flops(dev, amp_dtype)
    log(f"training: {total_steps} steps of {batch_size} examples, lr {learning_rate}, "
        f"{micro_batch_size} packed rows of {max_seq_len} per forward")

    t_start = time.perf_counter()
    while step < total_steps:
        t0 = time.perf_counter()
        torch.manual_seed(hash((seed, step, rank)))  # LoRA's dropout: a resumed run draws what a straight one would
        # Each step takes the next batch_size examples of this epoch's seeded shuffle; every process packs the
        # same examples and works on its share of the rows, so the step is the same on any number of processes.
        epoch, k = divmod(step, steps_per_epoch)
        shuffled = np.random.default_rng([seed, epoch]).permutation(len(train_set))
        batch = [train_set[i] for i in shuffled[k * batch_size:(k + 1) * batch_size]]
        rows = pack(batch, max_seq_len)
        n_targets = sum(len(ids) - n_prompt for ids, n_prompt in batch)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total_steps)
        micro_batches = split_rows(rows, rank, world_size, micro_batch_size)
        loss_sum = torch.zeros((), device=dev)
        for i, micro in enumerate(micro_batches):
            # Gradients are reduced across processes only on the last micro-batch.
            if world_size > 1:
                model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            tokens, targets, positions, mask = make_batch(micro, batch, dev)
            with autocast:
                loss = model(tokens, positions, mask, targets)
            # Divide by the step's total number of response tokens: the loss is a mean over tokens, not a mean
            # of per-batch means. FSDP averages gradients over processes, hence the world_size factor.
            (loss * world_size / n_targets).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % log_interval == 0 or step == total_steps:
            dist.all_reduce(loss_sum)
            dt = time.perf_counter() - t0
            n_tokens = sum(len(ids) - 1 for ids, _ in batch)
            mfu = (flops_of(rows, batch, args, frozen=lora_rank > 0) / dt / (peak_flops * world_size)
                   if peak_flops else None)
            memory = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                      else resource_maxrss()) / 2 ** 30
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            eta = (time.perf_counter() - t_start) / (step - first_step) * (total_steps - step)
            log(f"step {step}/{total_steps} | loss {loss_sum.item() / n_targets:.4f} | lr {lr_at(step - 1, total_steps):.2e} "
                f"| grad norm {grad_norm.item():.2f} | {n_tokens / dt:,.0f} tok/s"
                + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "")
                + f" | mem {memory:.2f} GiB | eta {eta / 60:.1f} min", flush=True)
        if val_set and (step % eval_interval == 0 or step == total_steps):
            log(f"step {step}: validation loss {evaluate(model, val_set, rank, world_size, dev, autocast):.4f}")
        if step % save_interval == 0 or step == total_steps:
            save_checkpoint(model, optimizer, step, args, tokenizer_path, rank)
            log(f"saved {out_dir}")

    # One instruction the model trained on and one it never saw: a small model learns the first long before it
    # can generalise to the second.
    for kind, example in (("training", train_raw[0]), ("held-out", val_raw[0] if val_raw else None)):
        if example:
            reply = answer(model, tokenizer, example["instruction"], example["input"], dev)
            log(f"\n{kind} instruction: {example['instruction']}"
                + (f"\ninput: {example['input']}" if example["input"] else "")
                + f"\nmodel's answer: {reply}\nreference answer: {example['output']}")
    dist.destroy_process_group()


def resource_maxrss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
