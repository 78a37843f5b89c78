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
import re
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
save_hf = False                   # also write out_dir/hf/: the model in Hugging Face's layout (transformers, vLLM)
# LoRA (Hu et al., 2021): freeze the model, train a low-rank update of its linear layers: a 7-8B model on one GPU
# (README). alpaca-lora used rank 8, alpha 16, dropout 0.05 and --learning_rate=3e-4 (adapters want a far higher
# rate than full fine-tuning's 2e-5: set it yourself) on wq and wv only; every linear layer of the blocks here, as
# QLoRA (Dettmers et al., 2023) found that needed to match full fine-tuning.
lora_rank = 0                     # 0: full fine-tuning (Alpaca); R > 0: rank-R adapters on a frozen model
lora_alpha = 16.0                 # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05               # on the adapters' input only
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
# With no --init there is no pretrained model to fine-tune, so the demo trains a tiny LLaMA from scratch on
# the seed tasks. From scratch needs other settings than fine-tuning: many passes, small batches, a high learning
# rate, Adam's second moment over fewer steps; these replace the settings above, only then. fp32: bf16 autocast
# gains little at this size. Two layers learn the examples by heart in far fewer passes than four (a deeper model
# sits longer on a plateau first), and a 4000-piece vocabulary (nearly whole words) leaves fewer tokens to learn;
# lr 3e-3 or more plateaus longer too. One row per forward: split_rows fills micro-batches up with empty rows, which
# cost a forward each. 28 passes: ~70 s on 2 idle CPU cores, loss 8.3 -> ~0.1, the training answer word for word
# (ROUGE-L 1.00), the held-out one noise (0.05): 171 examples are learned, not generalised from.
tiny_model = dict(dim=128, n_layers=2, n_heads=4, vocab_size=4000, multiple_of=32, max_seq_len=512)
tiny_recipe = dict(epochs=28, batch_size=8, micro_batch_size=1, learning_rate=2e-3, warmup_ratio=0.05, beta2=0.99,
                   dtype="float32")

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
    head_dim: Optional[int] = None    # dim // n_heads unless a checkpoint says otherwise (HF's head_dim)
    # Llama 3.1+: RoPE frequencies stretched for long context, with the factors of Meta's reference.
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the output layer is the embedding matrix
    sliding_window: Optional[int] = None  # Mistral v0.1; exact only while the context is no longer than it

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The mean of squares is taken in fp32: bf16 has too few bits to normalise well.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.type_as(x) * self.weight
        # Under autocast the matmuls that follow would each cast their own bf16 copy (three for q, k, v, two for
        # the FFN), and each copy costs a pass forward and one back; cast once here instead, to the same values.
        if torch.is_autocast_enabled(x.device.type):
            return y.to(torch.get_autocast_dtype(x.device.type))
        return y


def rope_inv_freq(args, device=None):
    """The rotary frequencies of each head's feature pairs, in fp32; for Llama 3.1+ scaled as Meta's apply_scaling:
    long wavelengths slowed by the factor, short ones kept, the band between blended smoothly."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)
    if not args.use_scaled_rope:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low, high = args.low_freq_factor, args.high_freq_factor
    smooth = (args.original_max_seq_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / args.rope_scaling_factor + smooth * inv_freq
    scaled = torch.where(wavelen > args.original_max_seq_len / low, inv_freq / args.rope_scaling_factor, blended)
    return torch.where(wavelen < args.original_max_seq_len / high, inv_freq, scaled)


def rope_cos_sin(positions, inv_freq):
    """cos and sin of the rotary angles for each position: (B, T, head_dim/2), in fp32."""
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Meta's convention rotates interleaved pairs (x0, x1), (x2, x3), ... of each head: as complex numbers
    # x0 + i x1, that is one multiplication by cos + i sin, in fp32. One kernel each way instead of about ten
    # (the same values as x1 cos - x2 sin, x1 sin + x2 cos), a large share of an eager step on CPU.
    rotation = torch.complex(cos, sin)[:, :, None, :]
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.args, self.head_dim = args, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, positions, mask, cache, cache_pos):
        B, T, _ = x.shape
        # The angles are computed here, from integer positions, so they are fp32 whatever dtype the block's
        # inputs and weights come in (FSDP's mixed precision casts floating-point inputs, not integer ones).
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.args, x.device))
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

    def forward(self, x, positions, mask=None, cache=None, cache_pos=0):
        x = x + self.attention(self.attention_norm(x), positions, mask, cache, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.sliding_window is not None and args.sliding_window < args.max_seq_len:
            raise SystemExit(f"context {args.max_seq_len} is longer than the checkpoint's sliding_window "
                             f"{args.sliding_window}: this LLaMA attends to the whole context")
        # Tied: no output layer of its own, so the one matrix is sharded, saved and trained once.
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
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
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, positions, mask, use_reentrant=False)
            else:
                h = layer(h, positions, mask, None if cache is None else cache[i], cache_pos)
        h = self.norm(h)
        if targets is None:
            return self.logits(h[:, -1:] if last_only else h)
        # Only response tokens carry a loss, so only they go through the (large) output layer. Their count is
        # padded to a multiple of 256 with ignored entries: few distinct shapes, as each new one costs a kernel
        # setup on CPU and a recompile under torch.compile.
        targets = targets.flatten()
        keep = (targets != -100).nonzero().squeeze(1)
        pad = -len(keep) % 256
        logits = self.logits(h.flatten(0, 1)[F.pad(keep, (0, pad))])
        return F.cross_entropy(logits, F.pad(targets[keep], (0, pad), value=-100), reduction="sum")

    def logits(self, h):
        return (self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)).float()

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    @staticmethod
    def from_pretrained(path, dtype=None):
        """A LLaMA from a Meta folder (params.json + consolidated.*.pth) or a Hugging Face folder (config.json +
        *.safetensors or pytorch_model*.bin), with weights memory-mapped rather than copied where possible."""
        if os.path.exists(os.path.join(path, "params.json")):
            args, state = read_meta_checkpoint(path)
        elif os.path.exists(os.path.join(path, "config.json")):
            args, state = read_hf_checkpoint(path)
        else:
            raise SystemExit(f"{path}: neither a Meta (params.json) nor a Hugging Face (config.json) LLaMA folder")
        with torch.device("meta"):
            model = Transformer(args)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        try:  # strict: a missing, unexpected or misshapen tensor is named
            model.load_state_dict(state, assign=True)
        except RuntimeError as e:
            raise SystemExit(f"{path}: {e}")
        return model


def read_meta_checkpoint(path):
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known})
    shard_files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shard_files:
        raise SystemExit(f"{path}: no consolidated.*.pth files")
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in shard_files]
    for shard in shards:
        shard.pop("rope.freqs", None)  # Meta stores the rotary table; we compute it
    # Meta's Llama 3.2 files carry output.weight (a copy of the embedding); ours omit it when tied.
    args.tie_word_embeddings = "output.weight" not in shards[0]
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


def hf_to_meta_qk(w, n_heads):
    # Hugging Face reorders each head's q/k rows so its rotate-half RoPE matches Meta's interleaved pairs;
    # put them back: HF keeps first halves then second halves, Meta interleaves them.
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf_qk(w, n_heads):
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# Hugging Face names of one block's tensors, and the rest; the output layer is absent when tied.
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                  "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}


def hf_names(args):
    """{Hugging Face tensor name: ours} for every tensor of the model."""
    names = dict(HF_NAMES)
    for i in range(args.n_layers):
        names.update({f"model.layers.{i}.{h}.weight": f"layers.{i}.{m}.weight" for h, m in HF_LAYER_NAMES.items()})
    return names


def hf_args(cfg, where):
    """ModelArgs from a config.json as transformers 4.x (top-level rope_theta, rope_scaling) or 5.x
    (rope_parameters) writes it. Whatever this LLaMA does not compute is refused, naming the key."""
    def refuse(key, why):
        raise SystemExit(f"{where}: {key}={json.dumps(cfg.get(key))}: {why}")
    if cfg.get("model_type") not in ("llama", "mistral"):
        refuse("model_type", "only the LLaMA family (llama, mistral) is implemented")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "this LLaMA's feed-forward is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            refuse(key, "this LLaMA's linear layers have no bias")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        refuse("rope_parameters" if "rope_parameters" in cfg else "rope_scaling",
               f"rope_type '{rope_type}' is not implemented (only default and llama3)")
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), head_dim=cfg.get("head_dim"),
                     rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                     max_seq_len=cfg.get("max_position_embeddings", 2048),
                     tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                     sliding_window=cfg.get("sliding_window"))
    if args.sliding_window is not None:  # full attention equals sliding-window attention up to the window
        args.max_seq_len = min(args.max_seq_len, args.sliding_window)
    if rope_type == "llama3":
        args.use_scaled_rope = True
        args.rope_scaling_factor, args.low_freq_factor = rope["factor"], rope["low_freq_factor"]
        args.high_freq_factor = rope["high_freq_factor"]
        args.original_max_seq_len = rope["original_max_position_embeddings"]
    # HF stores the FFN width itself; choose multiple_of so LLaMA's rule lands exactly on it.
    hidden = cfg["intermediate_size"]
    args.multiple_of = hidden
    if int(8 * args.dim / 3) > hidden:
        args.ffn_dim_multiplier = hidden / int(8 * args.dim / 3)
    return args


def read_hf_checkpoint(path):
    with open(os.path.join(path, "config.json")) as f:
        args = hf_args(json.load(f), os.path.join(path, "config.json"))
    from safetensors.torch import load_file  # memory-maps the file
    # The index names the shards (Mistral's repos also hold a consolidated.safetensors in Mistral's own names).
    load_bin = lambda f: torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    for stem, ext, load in (("model", "safetensors", load_file), ("pytorch_model", "bin", load_bin)):
        index = os.path.join(path, f"{stem}.{ext}.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        else:
            files = sorted(glob.glob(os.path.join(path, f"{stem}*.{ext}")))
        if files:
            break
    else:
        raise SystemExit(f"{path}: no model*.safetensors or pytorch_model*.bin files")
    names, state = hf_names(args), {}
    for file in files:
        for name, tensor in load(file).items():
            if name.endswith("rotary_emb.inv_freq") or (args.tie_word_embeddings and name == "lm_head.weight"):
                continue
            if name not in names:
                raise SystemExit(f"{file}: unexpected tensor '{name}' in the checkpoint")
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor = hf_to_meta_qk(tensor, args.n_heads if "q_proj" in name else args.n_kv_heads or args.n_heads)
            state[names[name]] = tensor
    return args, state


# Llama 3's tokenizer as Meta's reference builds it: its split pattern, and 256 special tokens after the BPE ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]


def find_tokenizer(folder):
    """A checkpoint folder's tokenizer: tokenizer.model (sentencepiece, or Llama 3's tiktoken ranks), where HF's
    Llama 3 repos keep Meta's (original/), or a Hugging Face tokenizer.json; none: tokenizer.model, for the
    caller to report missing."""
    paths = [os.path.join(folder, n) for n in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")]
    return next((p for p in paths if os.path.exists(p)), paths[0])


class Tokenizer:
    """LLaMA's tokenizer, whichever the file is: sentencepiece (LLaMA 1/2, Mistral, the demo) or Llama 3's
    byte-level BPE, read with tiktoken from Meta's rank file or from a tokenizer.json. LLaMA has no pad token
    (pad_id is -1); padding never reaches the loss. stop_ids: the ids that end a generation (an instruct
    Llama 3 ends its turn with <|eot_id|>, not with EOS)."""

    def __init__(self, path):
        self.path, self.pad_id = path, -1
        with open(path, "rb") as f:
            head = f.readline(200)
        if head.startswith(b"{") or re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", head):
            import tiktoken
            if head.startswith(b"{"):
                ranks, pattern, special = read_tokenizer_json(path)
            else:
                ranks, pattern = read_tiktoken_ranks(path), LLAMA3_PATTERN
                special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
            self.tt = tiktoken.Encoding(os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                                        special_tokens=special)
            self.bos_id, self.eos_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]
            self.stop_ids = {special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in special}
            self.vocab_size = self.tt.n_vocab
        else:
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=path)
            self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
            self.stop_ids, self.vocab_size = {self.eos_id}, self.sp.get_piece_size()

    def encode(self, text, bos=False, eos=False):
        # Special tokens' text is encoded as plain text, as Meta's reference does: data cannot inject them.
        ids = self.tt.encode(text, disallowed_special=()) if hasattr(self, "tt") else self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return self.tt.decode(list(ids)) if hasattr(self, "tt") else self.sp.decode(list(ids))


def read_tiktoken_ranks(path):
    # Meta's format: a base64 token and its rank per line. (tiktoken's load_tiktoken_bpe caches files by path,
    # so it would return a stale copy after a path's file is replaced, as out_dir's is.)
    import base64
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise SystemExit(f"{path}:{lineno}: expected a base64 token and its rank")
    return ranks


def read_tokenizer_json(path):
    """The BPE ranks and split pattern of a byte-level tokenizer.json (Llama 3's), for tiktoken. Its token ids
    serve as ranks, which equals Hugging Face's merge order only when the merges come in id order: checked."""
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    splits = pre.get("pretokenizers", [])
    if model.get("type") != "BPE" or tj.get("normalizer") or [p.get("type") for p in splits] != ["Split", "ByteLevel"]:
        raise SystemExit(f"{path}: only Llama 3's kind of tokenizer.json is read (byte-level BPE, a Split regex, "
                         f"no normalizer); for sentencepiece models give tokenizer.model")
    # Byte-level BPE spells each byte as a printable character (GPT-2's table); map the spellings back to bytes.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = sorted(set(range(256)) - set(printable))
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    if not {"<|begin_of_text|>", "<|end_of_text|>"} <= set(special):
        raise SystemExit(f"{path}: added_tokens lack Llama 3's <|begin_of_text|> and <|end_of_text|>")
    vocab, last = {t: i for t, i in model["vocab"].items() if t not in special}, -1
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}
    for merge in model.get("merges", []):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if vocab[left + right] < last:
            raise SystemExit(f"{path}: merge {left!r} + {right!r} is out of id order; tiktoken cannot read this file")
        last = vocab[left + right]
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise SystemExit(f"{path}: model.vocab ids are not 0..{len(ranks) - 1}")
    return ranks, splits[0]["pattern"]["Regex"], special


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
    in the self-instruct seed format ({instruction, instances: [{input, output}]}) gives one example per instance;
    a databricks-dolly-15k record (instruction, context, response, category) gives context as input, response as
    output."""
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
            for field in ("instruction", "input", "output"):
                if not isinstance(example[field], str):
                    problem = "missing" if example[field] is None else "must be a string"
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
    """Token ids of prompt + response + EOS, and how many leading ids are prompt (no loss on those)."""
    prompt = format_prompt(example["instruction"], example["input"])
    # As in Alpaca, the input is the joint tokenization of prompt + response: text the tokenizer really produces.
    # The prompt's tokens are those it shares with the prompt tokenized alone. A piece that straddles the
    # boundary (":-" of "Response:-") counts as response, so no character of the response goes unsupervised.
    ids, alone = tokenizer.encode(prompt + example["output"], bos=True, eos=True), tokenizer.encode(prompt, bos=True)
    n_prompt = next((i for i, (a, b) in enumerate(zip(ids, alone)) if a != b), len(alone))
    prompt_ids, response_ids = ids[:n_prompt], ids[n_prompt:]
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
    q_dim, kv_dim = args.n_heads * args.head_dim, (args.n_kv_heads or args.n_heads) * args.head_dim
    block_params = args.n_layers * (2 * args.dim * q_dim + 2 * args.dim * kv_dim + 3 * args.dim * hidden)
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
        if save_hf: export_hf(full, args, tokenizer_path, os.path.join(out_dir, "hf"))
        if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
            with open(tokenizer_path, "rb") as f:
                write_atomic(os.path.join(out_dir, "tokenizer.model"), f.read())
    del full
    resume_dir, tmp_dir, old_dir = (os.path.join(out_dir, name) for name in ("resume", "resume.tmp", "resume.old"))
    if rank == 0:
        repair_resume(out_dir)  # after it only resume/ may exist, so the renames below cannot fail
    dist.barrier()
    trained = StateDictOptions(ignore_frozen_params=True)
    dcp.save({"model": get_model_state_dict(model, options=trained),
              "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp_dir)
    if rank == 0:
        # step.json marks a complete state, so it is written last and atomically.
        write_atomic(os.path.join(tmp_dir, "step.json"), json.dumps({"step": step}).encode())
        if os.path.exists(resume_dir):
            os.replace(resume_dir, old_dir)
        os.replace(tmp_dir, resume_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    dist.barrier()


def export_hf(state, args, tokenizer_path, folder):
    """The model as a Hugging Face LlamaForCausalLM folder: config.json (read by transformers 4.x and 5.x),
    model.safetensors with q/k rows in HF's rotate-half order, the tokenizer, generation_config.json with the stop
    ids. Written to folder.tmp, then renamed into place."""
    from safetensors.torch import save_file
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {}
    for hf_name, name in hf_names(args).items():
        if name in state:
            w = state[name]
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                w = meta_to_hf_qk(w, args.n_heads if "q_proj" in hf_name else args.n_kv_heads or args.n_heads)
            tensors[hf_name] = w.contiguous()
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tokenizer = Tokenizer(tokenizer_path)
    rope = dict(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=args.low_freq_factor,
                high_freq_factor=args.high_freq_factor, original_max_position_embeddings=args.original_max_seq_len) \
        if args.use_scaled_rope else None
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
                  intermediate_size=ffn_hidden_dim(args), num_hidden_layers=args.n_layers,
                  num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads or args.n_heads,
                  head_dim=args.head_dim, vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps,
                  max_position_embeddings=args.max_seq_len, hidden_act="silu", attention_bias=False, mlp_bias=False,
                  tie_word_embeddings=args.tie_word_embeddings, rope_theta=args.rope_theta, rope_scaling=rope,
                  rope_parameters={**(rope or {"rope_type": "default"}), "rope_theta": args.rope_theta},
                  torch_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
                  bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    generation = dict(bos_token_id=tokenizer.bos_id, eos_token_id=sorted(tokenizer.stop_ids))
    with open(tokenizer_path, "rb") as f:
        raw = f.read()
    # Where each kind of tokenizer file sits in a Hugging Face folder (Llama 3's Meta file goes to original/).
    name = ("tokenizer.json" if raw.startswith(b"{") else os.path.join("original", "tokenizer.model")
            if hasattr(tokenizer, "tt") else "tokenizer.model")
    os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
    for file, payload in (("config.json", config), ("generation_config.json", generation), (name, raw)):
        with open(os.path.join(tmp, file), "wb") as f:
            f.write(payload if isinstance(payload, bytes) else json.dumps(payload, indent=2).encode())
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def repair_resume(out_dir):
    """Undo what a crash inside save_checkpoint can leave (resume.tmp, resume.old, either half-deleted, or no
    resume/): keep the newest complete state (one with step.json) as resume/ and delete the rest. Every step
    leaves a state this function repairs again, so a crash here is harmless too. Rank 0 only."""
    resume_dir, tmp_dir, old_dir = (os.path.join(out_dir, name) for name in ("resume", "resume.tmp", "resume.old"))
    complete = {d: os.path.exists(os.path.join(d, "step.json")) for d in (resume_dir, tmp_dir, old_dir)}

    def discard(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):  # e.g. NFS keeps .nfs* files of deleted open files: move it out of the way
            os.replace(path, f"{path}.stale.{time.time_ns()}")
            print(f"warning: could not delete {path}; moved to {path}.stale.*, delete it by hand", file=sys.stderr)

    if complete[tmp_dir]:  # saved in full (newest), crashed before or between the renames
        discard(old_dir)
        if os.path.exists(resume_dir):
            os.replace(resume_dir, old_dir)
        os.replace(tmp_dir, resume_dir)
    elif complete[old_dir] and not complete[resume_dir]:  # an older save, moved aside when a crash came
        discard(resume_dir)
        os.replace(old_dir, resume_dir)
    for path in (tmp_dir, old_dir):
        discard(path)


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
    if dist.get_rank() == 0:
        repair_resume(out_dir)
    dist.barrier()
    resume_dir = os.path.join(out_dir, "resume")
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


def answer(model, tokenizer, instruction, input, dev, dtype, max_new_tokens=300):
    """Greedy answer to one instruction, for the end-of-run demo (sample.py is the real sampler): the prompt once,
    then one token at a time on the KV cache (in dtype, the blocks' compute dtype). Every process runs it (FSDP)."""
    model.eval()
    ids = tokenizer.encode(format_prompt(instruction, input), bos=True)
    a = model.args
    shape = (1, a.n_kv_heads or a.n_heads, len(ids) + max_new_tokens, a.head_dim)
    cache = [(torch.zeros(shape, device=dev, dtype=dtype), torch.zeros(shape, device=dev, dtype=dtype))
             for _ in range(a.n_layers)]
    new, tokens = [], torch.tensor([ids], device=dev)
    with torch.no_grad():
        while len(new) < max_new_tokens and len(ids) + len(new) < max_seq_len:
            pos = len(ids) + len(new) - tokens.shape[1]
            logits = model(tokens, cache=cache, cache_pos=pos, last_only=True)[0, -1]
            next_id = logits[:tokenizer.vocab_size].argmax().item()  # a model's vocab may be padded beyond it
            if next_id in tokenizer.stop_ids:
                break
            new.append(next_id)
            tokens = torch.tensor([[next_id]], device=dev)
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
    t_main = time.perf_counter()
    given = parse_config(sys.argv[1:])
    if not init:
        for k, v in tiny_recipe.items():
            if k not in given:
                globals()[k] = v
        if int(os.environ.get("RANK", 0)) == 0:
            print("no --init, the demo: a tiny LLaMA from scratch with " + ", ".join(
                f"{k}={globals()[k]}" for k in tiny_recipe) + " (tiny_recipe, unless set on the command line)")

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
        tokenizer_path = find_tokenizer(init)
    else:
        tokenizer_path = os.path.join(out_dir, "tokenizer.model")
        if rank == 0 and not (resume and os.path.exists(tokenizer_path)):
            os.makedirs(out_dir, exist_ok=True)
            train_tokenizer([format_prompt(e["instruction"], e["input"]) + e["output"] for e in train_raw],
                            tokenizer_path, tiny_model["vocab_size"])
        dist.barrier()
    if not os.path.exists(tokenizer_path):
        raise SystemExit(f"{tokenizer_path}: no tokenizer (nor original/tokenizer.model, tokenizer.json) there")
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
    spent = {"setup": t_start - t_main, "steps": 0.0, "validation": 0.0, "saving": 0.0}  # seconds, for the summary
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
        spent["steps"] += time.perf_counter() - t0

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
            t1 = time.perf_counter()
            log(f"step {step}: validation loss {evaluate(model, val_set, rank, world_size, dev, autocast):.4f}")
            spent["validation"] += time.perf_counter() - t1
        if step % save_interval == 0 or step == total_steps:
            t1 = time.perf_counter()
            save_checkpoint(model, optimizer, step, args, tokenizer_path, rank)
            log(f"saved {out_dir}")
            spent["saving"] += time.perf_counter() - t1

    # One instruction the model trained on and one it never saw: a small model learns the first long before it
    # can generalise to the second. ROUGE-L (the F-measure of the longest common word subsequence) says how close.
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    t1 = time.perf_counter()
    for kind, example in (("training", train_raw[0]), ("held-out", val_raw[0] if val_raw else None)):
        if example:
            reply = answer(model, tokenizer, example["instruction"], example["input"], dev,
                           amp_dtype if mp else torch.float32)
            rouge = scorer.score(example["output"], reply)["rougeL"].fmeasure
            log(f"\n{kind} instruction: {example['instruction']}"
                + (f"\ninput: {example['input']}" if example["input"] else "")
                + f"\nmodel's answer: {reply}\nreference answer: {example['output']}\nROUGE-L: {rouge:.2f}")
    spent["answers"] = time.perf_counter() - t1
    log("\ntime: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items())
        + f"; {time.perf_counter() - t_main:.1f} s in all (after Python's imports)")
    dist.destroy_process_group()


def resource_maxrss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
