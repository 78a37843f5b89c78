"""Tests for train.py's LLaMA and its checkpoint loading: Meta and Hugging Face folders (single and sharded) give
the same logits as an independent Hugging Face-style LLaMA written here, errors name the tensor at fault, and
weights stay memory-mapped."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import train

VOCAB = 128


def tiny_args(n_kv_heads=2, rope_theta=10000.0, **overrides):
    return train.ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB,
                                     multiple_of=16, norm_eps=1e-6, rope_theta=rope_theta, max_seq_len=64),
                              **overrides})


def random_meta_state(args, hidden, seed=0):
    """Random weights under Meta's names, scaled so activations and attention scores are of order one
    (attention far from uniform, so a RoPE or head-order mistake shows in the logits)."""
    g = torch.Generator().manual_seed(seed)
    head_dim = args.dim // args.n_heads
    kv_dim = (args.n_kv_heads or args.n_heads) * head_dim

    def linear(out_dim, in_dim):
        return torch.randn(out_dim, in_dim, generator=g) / math.sqrt(in_dim)

    def norm():
        return 1 + 0.2 * torch.randn(args.dim, generator=g)

    state = {"tok_embeddings.weight": 0.25 * torch.randn(args.vocab_size, args.dim, generator=g)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wq.weight"] = linear(args.dim, args.dim)
        state[p + "attention.wk.weight"] = linear(kv_dim, args.dim)
        state[p + "attention.wv.weight"] = linear(kv_dim, args.dim)
        state[p + "attention.wo.weight"] = linear(args.dim, args.dim)
        state[p + "feed_forward.w1.weight"] = linear(hidden, args.dim)
        state[p + "feed_forward.w2.weight"] = linear(args.dim, hidden)
        state[p + "feed_forward.w3.weight"] = linear(hidden, args.dim)
        state[p + "attention_norm.weight"] = norm()
        state[p + "ffn_norm.weight"] = norm()
    state["norm.weight"] = norm()
    state["output.weight"] = linear(args.vocab_size, args.dim)
    return state


def meta_params(args):
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                  multiple_of=args.multiple_of, norm_eps=args.norm_eps, rope_theta=args.rope_theta)
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    return params


def write_meta(folder, params, shards):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(folder, f"consolidated.{i:02d}.pth"))
    return str(folder)


def split_for_model_parallel(state, n_shards, head_dim):
    """Meta's model-parallel layout: column-parallel layers cut along dim 0, row-parallel (wo, w2) along dim 1,
    the embedding along dim 1 (LLaMA 1/2's ParallelEmbedding), norms replicated; each file also has rope.freqs."""
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        if name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
            pieces = w.chunk(n_shards, dim=1)
        elif name.endswith("norm.weight"):
            pieces = [w] * n_shards
        else:
            pieces = w.chunk(n_shards, dim=0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for shard in shards:
        shard["rope.freqs"] = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return shards


def hf_permute(w, n_heads):
    # What Hugging Face's conversion does to q and k: each head's interleaved (Meta) rows become two halves,
    # so that rotate-half RoPE computes what Meta's pairwise RoPE does.
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf(state, args):
    n_kv = args.n_kv_heads or args.n_heads
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = hf_permute(state[m + "attention.wq.weight"], args.n_heads)
        hf[h + "self_attn.k_proj.weight"] = hf_permute(state[m + "attention.wk.weight"], n_kv)
        hf[h + "self_attn.v_proj.weight"] = state[m + "attention.wv.weight"]
        hf[h + "self_attn.o_proj.weight"] = state[m + "attention.wo.weight"]
        hf[h + "mlp.gate_proj.weight"] = state[m + "feed_forward.w1.weight"]
        hf[h + "mlp.down_proj.weight"] = state[m + "feed_forward.w2.weight"]
        hf[h + "mlp.up_proj.weight"] = state[m + "feed_forward.w3.weight"]
        hf[h + "input_layernorm.weight"] = state[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = state[m + "ffn_norm.weight"]
    return hf


def hf_config(args, hidden):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": hidden, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads or args.n_heads,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": args.max_seq_len, "hidden_act": "silu", "rope_scaling": None,
            "tie_word_embeddings": False, "torch_dtype": "float32"}


def write_safetensors(path, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_hf(folder, config, hf, n_files=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if n_files == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), hf)
        return str(folder)
    names = list(hf)
    weight_map = {}
    for i in range(n_files):
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = names[i::n_files]
        write_safetensors(os.path.join(folder, file), {k: hf[k] for k in part})
        weight_map.update({k: file for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(folder)


def hf_reference_logits(hf, config, tokens):
    """An independent LLaMA in the Hugging Face style, in float64: rotate-half RoPE on the HF-permuted q/k
    weights, explicit softmax attention under a causal mask, repeat_kv for grouped-query attention."""
    w = {k: v.double() for k, v in hf.items()}
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    dim, eps = config["hidden_size"], config["rms_norm_eps"]
    head_dim = dim // n_heads
    B, T = tokens.shape

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat((-x[..., head_dim // 2:], x[..., :head_dim // 2]), dim=-1)

    def repeat_kv(x):
        return x[:, :, None].expand(B, n_kv, n_heads // n_kv, T, head_dim).reshape(B, n_heads, T, head_dim)

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, n_heads, head_dim).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, n_kv, head_dim).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, n_kv, head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = q @ repeat_kv(k).transpose(-1, -2) / math.sqrt(head_dim) + causal
        attn = (scores.softmax(-1) @ repeat_kv(v)).transpose(1, 2).reshape(B, T, dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
            w[p + "mlp.down_proj.weight"].T
    lm_head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return rms_norm(x, w["model.norm.weight"]) @ lm_head.T


def tokens_for_test(seed=1, batch=2, length=24):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("n_kv_heads,rope_theta", [(2, 10000.0), (None, 500000.0)])
@pytest.mark.parametrize("layout", ["meta", "meta-2-shards", "hf", "hf-2-files"])
def test_every_layout_gives_the_logits_of_an_independent_llama(tmp_path, layout, n_kv_heads, rope_theta):
    args = tiny_args(n_kv_heads, rope_theta)
    hidden = train.ffn_hidden_dim(args)
    state = random_meta_state(args, hidden)
    hf = meta_to_hf(state, args)
    config = hf_config(args, hidden)
    if layout == "meta":
        path = write_meta(tmp_path / layout, meta_params(args), [state])
    elif layout == "meta-2-shards":
        params = {**meta_params(args), "vocab_size": -1}  # as LLaMA 1 wrote it: the size comes from the weights
        path = write_meta(tmp_path / layout, params, split_for_model_parallel(state, 2, args.dim // args.n_heads))
    else:
        path = write_hf(tmp_path / layout, config, hf, n_files=2 if layout == "hf-2-files" else 1)

    model = train.Transformer.from_pretrained(path)
    assert model.args.vocab_size == VOCAB and model.args.rope_theta == rope_theta
    assert (model.args.n_kv_heads or model.args.n_heads) == (n_kv_heads or args.n_heads)
    tokens = tokens_for_test()
    logits = model_logits(model, tokens)
    expected = hf_reference_logits(hf, config, tokens)
    assert logits.dtype == torch.float32
    assert (logits.double() - expected).abs().max().item() <= 1e-5
    # The comparison is sharp enough to see a q/k layout mistake: unpermuted weights give other logits.
    wrong = hf_reference_logits(meta_to_hf_without_permutation(state, args), config, tokens)
    assert (wrong - expected).abs().max().item() > 1e-2


def meta_to_hf_without_permutation(state, args):
    hf = meta_to_hf(state, args)
    for i in range(args.n_layers):
        hf[f"model.layers.{i}.self_attn.q_proj.weight"] = state[f"layers.{i}.attention.wq.weight"]
        hf[f"model.layers.{i}.self_attn.k_proj.weight"] = state[f"layers.{i}.attention.wk.weight"]
    return hf


@pytest.mark.parametrize("intermediate_size", [100, 300])
def test_hf_ffn_width_off_llamas_rule_and_tied_embeddings(tmp_path, intermediate_size):
    # HF configs state the FFN width directly; it need not follow LLaMA's 8/3·dim rounding rule.
    args = tiny_args()
    state = random_meta_state(args, intermediate_size)
    hf = meta_to_hf(state, args)
    del hf["lm_head.weight"]
    config = {**hf_config(args, intermediate_size), "tie_word_embeddings": True}
    model = train.Transformer.from_pretrained(write_hf(tmp_path / "hf", config, hf))
    assert train.ffn_hidden_dim(model.args) == intermediate_size
    tokens = tokens_for_test()
    expected = hf_reference_logits(hf, config, tokens)
    assert (model_logits(model, tokens).double() - expected).abs().max().item() <= 1e-5


def test_meta_params_with_ffn_dim_multiplier(tmp_path):
    args = tiny_args(ffn_dim_multiplier=1.3)
    hidden = train.ffn_hidden_dim(args)
    assert hidden == 224  # int(1.3 · int(8·64/3)) = 221, rounded up to a multiple of 16
    state = random_meta_state(args, hidden)
    model = train.Transformer.from_pretrained(write_meta(tmp_path / "meta", meta_params(args), [state]))
    tokens = tokens_for_test()
    expected = hf_reference_logits(meta_to_hf(state, args), hf_config(args, hidden), tokens)
    assert (model_logits(model, tokens).double() - expected).abs().max().item() <= 1e-5


def test_from_pretrained_dtype(tmp_path):
    args = tiny_args()
    state = random_meta_state(args, train.ffn_hidden_dim(args))
    model = train.Transformer.from_pretrained(write_meta(tmp_path / "meta", meta_params(args), [state]),
                                              dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.layers[1].attention.wk.weight, state["layers.1.attention.wk.weight"].bfloat16())


def test_hf_permutation_round_trip_for_q_and_grouped_k():
    g = torch.Generator().manual_seed(0)
    n_heads, n_kv_heads, head_dim, dim = 4, 2, 16, 64
    for n in (n_heads, n_kv_heads):
        w = torch.randn(n * head_dim, dim, generator=g)
        permuted = hf_permute(w, n)
        assert not torch.equal(permuted, w)
        assert torch.equal(train.hf_to_meta_qk(permuted, n), w)
        assert torch.equal(hf_permute(train.hf_to_meta_qk(w, n), n), w)
    # The head count matters: undoing the permutation with the wrong one does not give the weights back.
    w = torch.randn(n_heads * head_dim, dim, generator=g)
    assert not torch.equal(train.hf_to_meta_qk(hf_permute(w, n_heads), n_kv_heads), w)


def test_meta_rope_on_meta_weights_equals_rotate_half_on_hf_weights():
    # What the permutation is for: Meta's interleaved-pair RoPE of Meta's q equals HF's rotate-half RoPE of
    # HF's q, up to the same reordering of each head's features.
    g = torch.Generator().manual_seed(0)
    n_heads, head_dim, dim, T = 2, 8, 16, 5
    w, x = torch.randn(n_heads * head_dim, dim, generator=g), torch.randn(1, T, dim, generator=g)
    rotation = train.rope_rotation(train.ModelArgs(dim=head_dim, n_heads=1), torch.arange(T)[None])
    cos, sin = rotation.real[:, :, 0], rotation.imag[:, :, 0]
    meta = train.apply_rope((x @ w.T).view(1, T, n_heads, head_dim), rotation)
    hf_q = (x @ hf_permute(w, n_heads).T).view(1, T, n_heads, head_dim)
    cos2, sin2 = torch.cat((cos, cos), -1)[:, :, None], torch.cat((sin, sin), -1)[:, :, None]
    hf = hf_q * cos2 + torch.cat((-hf_q[..., head_dim // 2:], hf_q[..., :head_dim // 2]), -1) * sin2
    meta_order = torch.stack((hf[..., :head_dim // 2], hf[..., head_dim // 2:]), -1).flatten(-2)
    torch.testing.assert_close(meta, meta_order, atol=1e-5, rtol=0)


@pytest.fixture
def meta_folder(tmp_path):
    args = tiny_args()
    state = random_meta_state(args, train.ffn_hidden_dim(args))
    return args, state, tmp_path / "bad"


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"layers.1.attention.wk.weight": torch.zeros(64, 64)}),
     "size mismatch for layers.1.attention.wk.weight: copying a param with shape torch.Size([64, 64]) from "
     "checkpoint, the shape in current model is torch.Size([32, 64])"),
    (lambda s: s.pop("layers.0.ffn_norm.weight"), 'Missing key(s) in state_dict: "layers.0.ffn_norm.weight"'),
    (lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(64)}),
     'Unexpected key(s) in state_dict: "layers.0.attention.wq.bias"'),
])
def test_meta_checkpoint_errors_name_the_tensor(meta_folder, change, message):
    args, state, folder = meta_folder
    change(state)
    path = write_meta(folder, meta_params(args), [state])
    with pytest.raises(SystemExit, match=f"^{re.escape(path)}: (.|\n)*" + re.escape(message)):
        train.Transformer.from_pretrained(path)


def test_meta_shards_that_do_not_assemble(meta_folder):
    args, state, folder = meta_folder
    shards = split_for_model_parallel(state, 2, 16)
    shards[1]["layers.0.feed_forward.w1.weight"] = shards[1]["layers.0.feed_forward.w1.weight"][:-1]
    with pytest.raises(SystemExit, match="size mismatch for layers.0.feed_forward.w1.weight"):  # the strict load
        train.Transformer.from_pretrained(write_meta(folder, meta_params(args), shards))


@pytest.mark.parametrize("change,message", [
    (lambda hf: hf.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     'Unexpected key(s) in state_dict: "model.layers.0.self_attn.q_proj.bias"'),  # the strict load names it
    (lambda hf: hf.pop("model.layers.1.mlp.up_proj.weight"), 'Missing key(s) in state_dict: "layers.1.feed_forward.w3.weight"'),
    (lambda hf: hf.update({"model.norm.weight": torch.ones(63)}), "size mismatch for norm.weight: copying a param with shape torch.Size([63])"),
])
def test_hf_checkpoint_errors_name_the_tensor(tmp_path, change, message):
    args = tiny_args()
    hidden = train.ffn_hidden_dim(args)
    hf = meta_to_hf(random_meta_state(args, hidden), args)
    change(hf)
    path = write_hf(tmp_path / "bad", hf_config(args, hidden), hf)
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.Transformer.from_pretrained(path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(SystemExit, match="neither a Meta"):
        train.Transformer.from_pretrained(str(tmp_path))


def file_mappings(filename):
    """Address ranges where this process has the file memory-mapped (Linux's /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == os.path.realpath(filename):
                begin, end = (int(a, 16) for a in parts[0].split("-"))
                if ranges and ranges[-1][1] == begin:  # one mapping may be listed in adjacent pieces
                    begin = ranges.pop()[0]
                ranges.append((begin, end))
    return ranges


def inside(tensor, ranges):
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    return any(lo <= begin and end <= hi for lo, hi in ranges)


def test_meta_weights_are_memory_mapped_not_copied(tmp_path):
    # A 7B checkpoint is 13 GB: from_pretrained must hand the model the file's pages, not a copy in RAM.
    args = tiny_args()
    state = random_meta_state(args, train.ffn_hidden_dim(args))
    path = write_meta(tmp_path / "meta", meta_params(args), [state])
    model = train.Transformer.from_pretrained(path)
    ranges = file_mappings(os.path.join(path, "consolidated.00.pth"))
    assert ranges, "the checkpoint file is not memory-mapped"
    for name, p in model.named_parameters():
        assert inside(p, ranges), f"{name} was copied out of the checkpoint file"
        assert torch.equal(p, state[name])


def test_hf_weights_are_memory_mapped_not_copied(tmp_path):
    # Only q and k are copied: undoing HF's permutation reorders their rows.
    args = tiny_args()
    hidden = train.ffn_hidden_dim(args)
    path = write_hf(tmp_path / "hf", hf_config(args, hidden), meta_to_hf(random_meta_state(args, hidden), args))
    model = train.Transformer.from_pretrained(path)
    ranges = file_mappings(os.path.join(path, "model.safetensors"))
    assert ranges, "the safetensors file is not memory-mapped"
    for name, p in model.named_parameters():
        if not name.endswith(("wq.weight", "wk.weight")):
            assert inside(p, ranges), f"{name} was copied out of the checkpoint file"


def test_grouped_query_attention_equals_explicit_repeat():
    # Each kv head serves n_heads / n_kv_heads consecutive q heads: a GQA model equals the plain multi-head model
    # whose k and v weights repeat each kv head's rows for its group.
    args = tiny_args(n_kv_heads=2)
    hidden = train.ffn_hidden_dim(args)
    state = random_meta_state(args, hidden)
    gqa = train.Transformer(args)
    gqa.load_state_dict(state)
    head_dim = args.dim // args.n_heads
    assert gqa.layers[0].attention.wk.weight.shape == (2 * head_dim, args.dim)
    assert gqa.layers[0].attention.wv.weight.shape == (2 * head_dim, args.dim)
    assert gqa.layers[0].attention.wq.weight.shape == (args.dim, args.dim)
    full_state = dict(state)
    for i in range(args.n_layers):
        for w in ("wk", "wv"):
            name = f"layers.{i}.attention.{w}.weight"
            full_state[name] = state[name].view(2, head_dim, args.dim).repeat_interleave(2, dim=0).flatten(0, 1)
    mha = train.Transformer(tiny_args(n_kv_heads=None))
    mha.load_state_dict(full_state)
    tokens = tokens_for_test()
    torch.testing.assert_close(model_logits(gqa, tokens), model_logits(mha, tokens), atol=1e-5, rtol=0)


def test_kv_cache_gives_the_logits_of_a_full_forward():
    # sample.py decodes with the cache: token-by-token logits must match one pass over the whole sequence.
    args = tiny_args(n_kv_heads=2)
    model = train.Transformer(args)
    model.load_state_dict(random_meta_state(args, train.ffn_hidden_dim(args)))
    tokens = tokens_for_test(length=12)
    head_dim = args.dim // args.n_heads
    cache = [(torch.zeros(2, 2, 16, head_dim), torch.zeros(2, 2, 16, head_dim)) for _ in range(args.n_layers)]
    with torch.no_grad():
        pieces = [model(tokens[:, :5], cache=cache, cache_pos=0)]
        pieces += [model(tokens[:, t:t + 1], cache=cache, cache_pos=t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), model_logits(model, tokens), atol=1e-5, rtol=0)
