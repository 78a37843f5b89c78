"""The LLaMA family as people bring it, checked against the real producers: tiny random models of each family built
and saved by transformers (LLaMA 2, Llama 3, 3.1's scaled RoPE, 3.2's tied embeddings, TinyLlama's GQA, Mistral
with its own head_dim) in every layout (HF 5.x and 4.x config dialects, safetensors and pytorch_model.bin, sharded
or not, Meta's consolidated.*.pth in 1 and 2 shards) give transformers' logits and greedy continuations; the
--save_hf export loads back into transformers; Llama 3's tokenizer reads Meta's tiktoken file and tokenizer.json as
tiktoken and tokenizers do; RoPE stays fp32 under FSDP2's bf16 mixed precision."""
import base64
import collections
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import sample
import train

transformers = pytest.importorskip("transformers")  # requirements-test.txt; a missing one is reported as a skip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_TASKS = os.path.join(REPO, "seed_tasks.jsonl")
VOCAB = 600
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama2": dict(num_key_value_heads=4, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "llama3": dict(num_key_value_heads=2, rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    "llama3.1": dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_SCALING, rope_theta=500000.0)),
    "llama3.2": dict(num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters=dict(LLAMA3_SCALING, factor=32.0, rope_theta=500000.0)),
    "tinyllama": dict(num_key_value_heads=1, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mistral": dict(num_key_value_heads=2, head_dim=32, sliding_window=4096,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6)),
}
PROMPTS = [[1, 17, 250, 33, 5, 480, 91], [1, 400, 12, 9, 301, 77, 5, 6, 42, 599, 3, 8]]
NEW_TOKENS = 8


def build(family, seed=0):
    """A random transformers model of the family, with weights scaled so activations are of order one and the
    attention far from uniform (a RoPE or head-order mistake shows in the logits, greedy choices are clear)."""
    cls = transformers.MistralForCausalLM if family == "mistral" else transformers.LlamaForCausalLM
    config_cls = transformers.MistralConfig if family == "mistral" else transformers.LlamaConfig
    torch.manual_seed(seed)
    model = cls(config_cls(**COMMON, **FAMILIES[family])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


BUILT = {}


def built(name, tmp_path_factory):
    """The family's model saved by save_pretrained, and transformers' own logits and greedy continuations
    (built once per test session)."""
    if name not in BUILT:
        model = build(name)
        folder = tmp_path_factory.mktemp(name.replace(".", "_"))
        model.save_pretrained(folder / "hf")
        tokens = torch.tensor([PROMPTS[1]])
        model.generation_config.eos_token_id = None  # as ours without eos_id: every row runs NEW_TOKENS steps
        with torch.no_grad():
            logits = model(tokens).logits
            greedy = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
        BUILT[name] = dict(name=name, model=model, folder=folder, tokens=tokens, logits=logits, greedy=greedy)
    return BUILT[name]


@pytest.fixture(params=list(FAMILIES))
def family(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def hf_permute_inverse(w, n_heads):
    # HF's rotate-half order back to Meta's interleaved pairs, as HF's conversion script does in reverse.
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_meta(model, folder, n_shards, llama3):
    """Meta's layout of the model: params.json as Meta writes it, consolidated.NN.pth cut for model parallelism
    (column-parallel along dim 0, row-parallel along 1, the embedding along 1 in LLaMA 2 and along 0 in Llama 3)."""
    cfg, sd = model.config, model.state_dict()
    names = {h: m for h, m in train.hf_names(train.ModelArgs(n_layers=cfg.num_hidden_layers)).items()}
    state = {}
    for h, w in sd.items():
        if h == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if h.endswith(("q_proj.weight", "k_proj.weight")):
            w = hf_permute_inverse(w, cfg.num_attention_heads if "q_proj" in h else cfg.num_key_value_heads)
        state[names[h]] = w
    if cfg.tie_word_embeddings:  # Meta's Llama 3.2 files carry the output layer as a copy of the embedding
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        if name.endswith("norm.weight"):
            pieces = [w] * n_shards
        elif name.endswith(("wo.weight", "w2.weight")) or (name == "tok_embeddings.weight" and not llama3):
            pieces = w.chunk(n_shards, dim=1)
        else:
            pieces = w.chunk(n_shards, dim=0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    rope = cfg.rope_parameters
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                  n_kv_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size, multiple_of=32,
                  ffn_dim_multiplier=0.94,  # int(0.94 * int(8 * 64 / 3)) = 159, rounded up to 160
                  norm_eps=cfg.rms_norm_eps, rope_theta=rope["rope_theta"], max_seq_len=128)
    if rope["rope_type"] == "llama3":
        params.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"])
    os.makedirs(folder)
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.zeros(8)
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def to_4x_dialect(src, folder):
    """The same folder as transformers 4.x wrote it: top-level rope_theta, rope_scaling (None when unscaled)."""
    import shutil
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def to_bin(model, folder, n_files):
    """pytorch_model.bin as transformers 4.x wrote with safe_serialization=False (5.x no longer writes it)."""
    os.makedirs(folder)
    model.config.save_pretrained(folder)
    sd = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    if n_files == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    names, weight_map = list(sd), {}
    for i in range(n_files):
        file = f"pytorch_model-{i + 1:05d}-of-{n_files:05d}.bin"
        torch.save({k: sd[k] for k in names[i::n_files]}, folder / file)
        weight_map.update({k: file for k in names[i::n_files]})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


LAYOUTS = ["hf", "hf-sharded", "hf-4.x-config", "hf-bin", "hf-bin-sharded", "meta", "meta-2-shards"]


def make_layout(fam, layout):
    model, folder = fam["model"], fam["folder"]
    if layout == "hf":
        return folder / "hf"
    if layout == "hf-sharded":
        model.save_pretrained(folder / layout, max_shard_size="40KB")
        assert len(list((folder / layout).glob("*.safetensors"))) > 1
        return folder / layout
    if layout == "hf-4.x-config":
        return to_4x_dialect(folder / "hf", folder / layout)
    if layout.startswith("hf-bin"):
        return to_bin(model, folder / layout, 3 if layout.endswith("sharded") else 1)
    return to_meta(model, folder / layout, 2 if layout.endswith("shards") else 1, fam["name"] != "llama2")


# Mistral and TinyLlama are published in Hugging Face's layout only: no Meta layout exists for them.
@pytest.mark.parametrize("name,layout", [(f, l) for f in FAMILIES for l in LAYOUTS
                                         if not (l.startswith("meta") and f in ("mistral", "tinyllama"))])
def test_every_family_and_layout_gives_transformers_logits_and_greedy_continuations(name, layout, tmp_path_factory):
    family = built(name, tmp_path_factory)
    path = make_layout(family, layout)
    model = train.Transformer.from_pretrained(str(path))
    with torch.no_grad():
        logits = model(family["tokens"])
    assert logits.dtype == torch.float32
    assert (logits - family["logits"]).abs().max().item() <= 1e-4
    # Through sample.py's generate, batched (left-padded) as the batch mode and the server run it.
    assert sample.generate(model, PROMPTS, NEW_TOKENS, temperature=0) == family["greedy"]


def test_the_comparison_sees_a_missing_rope_scaling(tmp_path_factory):
    # Sharp enough to matter: 3.1's scaled RoPE read as plain RoPE gives other logits at these short positions.
    family = built("llama3.1", tmp_path_factory)
    model = train.Transformer.from_pretrained(str(family["folder"] / "hf"))
    model.args.use_scaled_rope = False
    with torch.no_grad():
        assert (model(family["tokens"]) - family["logits"]).abs().max().item() > 1e-3


def test_save_hf_export_loads_back_into_transformers(family, tmp_path, tiktoken_file):
    ours = train.Transformer.from_pretrained(str(family["folder"] / "hf"))
    train.export_hf(ours.state_dict(), ours.args, tiktoken_file, str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(family["tokens"]).logits - family["logits"]).abs().max().item() <= 1e-5
    assert back.config.tie_word_embeddings == bool(family["model"].config.tie_word_embeddings)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [300 + 1, 300 + 8, 300 + 9]  # end_of_text, eom_id, eot_id
    assert os.path.exists(tmp_path / "hf" / "original" / "tokenizer.model")
    # And our own loader reads the export back (a second round trip changes nothing).
    again = train.Transformer.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert (again(family["tokens"]) - family["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("key,value,why", [
    ("attention_bias", True, "no bias"), ("mlp_bias", True, "no bias"), ("hidden_act", "gelu", "silu"),
    ("model_type", "qwen2", "LLaMA family"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type 'yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_type 'linear'"),
])
def test_what_this_llama_does_not_compute_is_refused_naming_file_and_key(tmp_path, key, value, why):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": VOCAB, key: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        train.Transformer.from_pretrained(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}/config.json: {key}={json.dumps(value)}: ") and why in str(e.value)


def test_sliding_window_shorter_than_the_context_is_refused(tmp_path):
    model = build("mistral")
    model.config.sliding_window = 32
    model.save_pretrained(tmp_path)
    loaded = train.Transformer.from_pretrained(str(tmp_path))  # within the window full attention is exact
    assert loaded.args.max_seq_len == 32
    loaded.args.max_seq_len = 64  # what train.py does for --max_seq_len=64
    with pytest.raises(SystemExit, match="longer than the checkpoint's sliding_window 32"):
        train.Transformer(loaded.args)


# Meta's reference (meta-llama/llama3 tokenizer.py), typed out independently of train.py's copy.
META_PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def seed_texts():
    return [train.format_prompt(e["instruction"], e["input"]) + e["output"] for e in train.read_examples(SEED_TASKS)]


def learn_bpe(texts, n_merges):
    """Byte-level BPE learned on texts (split with Meta's pattern), as tiktoken ranks: bytes 0..255, then each
    merge's token in the order learned. Returns the ranks and the merges."""
    import regex
    words = collections.Counter(tuple(bytes([b]) for b in w.encode()) for t in texts for w in regex.findall(META_PAT_STR, t))
    ranks, merges = {bytes([b]): b for b in range(256)}, []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        ranks[a + b] = len(ranks)
        new_words = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return ranks, merges


@pytest.fixture(scope="module")
def bpe():
    return learn_bpe(seed_texts()[:60], 44)  # 300 ranks, as Llama 3's 128000 but small


@pytest.fixture(scope="module")
def tiktoken_file(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in bpe[0].items()))  # Meta's format
    return str(path)


TRICKY = ["Hello world!  It's 12345 o'clock\n\n\tdone", "naïve café — 日本語 😀", "### Response:-A set",
          "<|eot_id|> is text here", "a\r\nb   \n  c"]


def test_llama3_tiktoken_file_gives_tiktokens_ids_and_metas_special_ids(bpe, tiktoken_file):
    import tiktoken
    ranks = bpe[0]
    reference = tiktoken.Encoding("ref", pat_str=META_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    tok = train.Tokenizer(tiktoken_file)
    for text in seed_texts()[100:] + TRICKY:
        assert tok.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # Meta's ids: the 256 special tokens follow the ranks (for Llama 3: 128000, 128001, 128008, 128009).
    n = len(ranks)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (n, n + 1, -1, n + 256)
    assert tok.stop_ids == {n + 1, n + 8, n + 9}
    assert tok.encode("hi", bos=True, eos=True) == [n, *reference.encode("hi"), n + 1]
    assert tok.decode([n + 9]) == "<|eot_id|>"


def test_tokenizer_json_gives_the_tokenizers_librarys_ids(bpe, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")  # comes with transformers; test-only
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    ranks, merges = bpe
    spell = bytes_to_unicode()
    s = lambda t: "".join(spell[b] for b in t)
    model = tokenizers.models.BPE(vocab={s(t): r for t, r in ranks.items()}, merges=[(s(a), s(b)) for a, b in merges],
                                  ignore_merges=True)
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(META_PAT_STR), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.save(str(tmp_path / "no_specials.json"))
    with pytest.raises(SystemExit, match="no_specials.json: no BOS and EOS tokens"):
        train.Tokenizer(str(tmp_path / "no_specials.json"))
    tk.add_special_tokens(train.LLAMA3_SPECIAL)
    tk.save(str(tmp_path / "tokenizer.json"))
    assert train.find_tokenizer(str(tmp_path)) == str(tmp_path / "tokenizer.json")
    tok = train.Tokenizer(str(tmp_path / "tokenizer.json"))
    for text in seed_texts()[100:] + TRICKY[:3] + TRICKY[4:]:
        assert tok.encode(text) == tk.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text)) == tk.decode(tk.encode(text).ids)
    # And Meta's rule, as tiktoken applies it: a special token's text in the data is plain text, never the token.
    import tiktoken
    reference = tiktoken.Encoding("ref", pat_str=META_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    for text in seed_texts()[100:] + TRICKY:
        assert tok.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id) == (tk.token_to_id("<|begin_of_text|>"), tk.token_to_id("<|end_of_text|>"))
    assert tok.stop_ids == {tk.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}


def test_hf_llama3_folder_uses_metas_file_in_original(tmp_path, tiktoken_file):
    os.makedirs(tmp_path / "original")
    (tmp_path / "original" / "tokenizer.model").write_bytes(open(tiktoken_file, "rb").read())
    (tmp_path / "tokenizer.json").write_text("{}")
    assert train.find_tokenizer(str(tmp_path)) == str(tmp_path / "original" / "tokenizer.model")


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo") / "tokenizer.model")
    train.train_tokenizer(seed_texts(), path, train.tiny_model["vocab_size"])  # the demo's
    return train.Tokenizer(path)


def test_save_hf_tokenizer_reads_in_transformers_with_our_ids_and_bos(demo_tokenizer, tmp_path):
    # The demo's sentencepiece model, exported: AutoTokenizer (as vLLM loads it) gives our ids, BOS first, and EOS.
    model = train.Transformer(train.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=demo_tokenizer.vocab_size,
                                              multiple_of=16, max_seq_len=64))
    train.export_hf(model.state_dict(), model.args, demo_tokenizer.path, str(tmp_path / "hf"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.eos_token_id == demo_tokenizer.eos_id
    for text in seed_texts()[:20]:
        assert hf(text)["input_ids"] == demo_tokenizer.encode(text, bos=True)

def test_a_sentencepiece_tokenizer_saved_by_transformers_reads_with_sentencepieces_ids(demo_tokenizer, tmp_path):
    # transformers 5 saves a LLaMA or Mistral tokenizer as tokenizer.json alone (no tokenizer.model): read with the
    # tokenizers library, it gives sentencepiece's ids, BOS and EOS.
    model = train.Transformer(train.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=demo_tokenizer.vocab_size,
                                              multiple_of=16, max_seq_len=64))
    train.export_hf(model.state_dict(), model.args, demo_tokenizer.path, str(tmp_path / "hf"))
    transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "tokenizer.model").exists()
    assert train.find_tokenizer(str(tmp_path / "saved")) == str(tmp_path / "saved" / "tokenizer.json")
    tok = train.Tokenizer(str(tmp_path / "saved" / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size) == (
        demo_tokenizer.bos_id, demo_tokenizer.eos_id, {demo_tokenizer.eos_id}, demo_tokenizer.vocab_size)
    for text in seed_texts() + TRICKY:
        assert tok.encode(text, bos=True, eos=True) == demo_tokenizer.encode(text, bos=True, eos=True), text
        assert tok.decode(tok.encode(text)) == demo_tokenizer.decode(demo_tokenizer.encode(text))

def test_save_hf_takes_an_init_folders_own_tokenizer_files(demo_tokenizer, tmp_path, tiktoken_file):
    for folder, tokenizer in (("sp", demo_tokenizer.path), ("llama3", tiktoken_file)):
        init = tmp_path / folder
        (init / "original").mkdir(parents=True)
        where = init / "tokenizer.model" if folder == "sp" else init / "original" / "tokenizer.model"
        where.write_bytes(open(tokenizer, "rb").read())
        own = {name: json.dumps({"from": folder, "file": name}) for name in
               ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
        for name, text in own.items():
            (init / name).write_text(text)
        config = train.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=train.Tokenizer(str(where)).vocab_size,
                                 multiple_of=16, max_seq_len=64)
        train.export_hf(train.Transformer(config).state_dict(), config, str(where), str(tmp_path / f"{folder}.hf"))
        for name, text in own.items():  # as the producer wrote them, byte for byte
            assert (tmp_path / f"{folder}.hf" / name).read_text() == text, (folder, name)

def test_training_input_is_the_joint_tokenization_on_every_seed_task(demo_tokenizer, tiktoken_file):
    stats = {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0}
    for tok in (demo_tokenizer, train.Tokenizer(tiktoken_file)):
        straddles = 0
        for e in train.read_examples(SEED_TASKS):
            prompt = train.format_prompt(e["instruction"], e["input"])
            ids, n_prompt = train.tokenize_example(tok, e, 10 ** 6, stats)
            assert ids == tok.encode(prompt + e["output"], bos=True, eos=True)
            alone = tok.encode(prompt, bos=True)
            assert ids[:n_prompt] == alone[:n_prompt]
            # Every character of the response is supervised: the response's tokens decode to text ending in it.
            assert tok.decode(ids[n_prompt:-1]).endswith(e["output"]) and prompt.startswith(tok.decode(ids[1:n_prompt]))
            straddles += n_prompt < len(alone)
        if tok is demo_tokenizer:  # the case the issue found: 10 of the 175 seed tasks
            assert straddles > 0
    assert stats == {"prompts_cut": 0, "responses_cut": 0, "tokens_dropped": 0}


def test_straddling_piece_counts_as_response(demo_tokenizer):
    for e in train.read_examples(SEED_TASKS):
        prompt = train.format_prompt(e["instruction"], e["input"])
        ids, n_prompt = train.tokenize_example(demo_tokenizer, e, 10 ** 6, {"prompts_cut": 0, "responses_cut": 0,
                                                                            "tokens_dropped": 0})
        if n_prompt < len(demo_tokenizer.encode(prompt, bos=True)):
            # The prompt's tokens stop short of its end; the first target token holds the rest of the prompt
            # and the response's first character(s).
            head, with_straddler = demo_tokenizer.decode(ids[1:n_prompt]), demo_tokenizer.decode(ids[1:n_prompt + 1])
            assert prompt.startswith(head) and len(head) < len(prompt) < len(with_straddler)
            assert (prompt + e["output"]).startswith(with_straddler)
            return
    pytest.fail("no seed task straddles the boundary with the demo tokenizer")


def test_rope_stays_fp32_in_a_block_under_fsdp2_bf16_mixed_precision():
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # The rotation is made once per forward, outside the blocks, and handed to each: complex64, which FSDP2's
    # MixedPrecisionPolicy does not cast (complex is not floating point), so it stays exact.
    config = train.ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16)
    block = train.TransformerBlock(config)
    inputs = []
    block.attention.register_forward_pre_hook(lambda m, a: inputs.append(a))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        x = torch.randn(2, 8, 64)
        rotation = train.rope_rotation(config, torch.arange(2000, 2008).expand(2, 8))
        out = block(x, rotation)
        out.float().sum().backward()
    finally:
        if started:
            dist.destroy_process_group()
    assert inputs[0][0].dtype == torch.bfloat16   # FSDP did cast the block's floating-point input ...
    assert inputs[0][1].dtype == torch.complex64  # ... but not the rotation
    assert torch.equal(inputs[0][1], rotation)
    exact = (torch.arange(2000, 2008, dtype=torch.float64)[:, None] * train.rope_inv_freq(config).double()).cos()
    assert (inputs[0][1][0, :, 0].real.double() - exact).abs().max() < 1e-3  # bf16 angles: ~1 rad off at 2000


def test_train_py_fine_tunes_a_llama3_folder_and_save_hf_output_serves_with_transformers(tmp_path, tiktoken_file):
    model = build("llama3.2")
    model.save_pretrained(tmp_path / "init")
    os.makedirs(tmp_path / "init" / "original")
    (tmp_path / "init" / "original" / "tokenizer.model").write_bytes(open(tiktoken_file, "rb").read())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(train.read_examples(SEED_TASKS)[:6]))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--init={tmp_path / 'init'}",
                             f"--data={data}", f"--out_dir={out}", "--max_steps=1", "--warmup_ratio=0", "--batch_size=4",
                             "--max_seq_len=128", "--dtype=float32", "--device=cpu", "--val_fraction=0",
                             "--save_hf", "--learning_rate=1e-3"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ours = train.Transformer.from_pretrained(str(out))
    assert ours.args.tie_word_embeddings and ours.args.use_scaled_rope
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
        assert (back(tokens).logits - model(tokens).logits).abs().max().item() > 1e-4  # it did train
    tok = train.Tokenizer(train.find_tokenizer(str(out / "hf")))
    assert tok.vocab_size == 556 and tok.eos_id == 301
