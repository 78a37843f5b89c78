import functools
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import watermark as wm

V = 32000
KEY = wm.DEFAULT_KEY


def rule_lefthash(prev, vocab_size, gamma, key):
    """The written rule, directly: seed = key x previous token (mod 2**64 - 1), CPU randperm, first gamma*V ids."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((key * prev) % (2**64 - 1))
    return torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)]


@functools.lru_cache(maxsize=1)
def reference_table():
    generator = torch.Generator(device="cpu")
    generator.manual_seed(2971215073)
    return torch.randperm(1_000_003, generator=generator)


def rule_selfhash_seed(window, key):
    """The reference's anchored min-hash PRF written with torch int64 tensors (which wrap on overflow) instead of the
    module's Python integers, so the two implementations check each other."""
    hashed = reference_table()[torch.tensor(window) % 1_000_003] + 1
    raw = (key * hashed * hashed[-1]).min().item()
    return raw, raw % (2**64 - 1)


def rule_selfhash_green(window, vocab_size, gamma, key):
    generator = torch.Generator(device="cpu")
    generator.manual_seed(rule_selfhash_seed(window, key)[1])
    return window[-1] in torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)].tolist()


def green_list(prev, vocab_size, gamma=0.25, key=KEY):
    """The module's lefthash green list after prev, in permutation order (the functions detection uses)."""
    return wm.green_ids(wm.lefthash_seed(prev, key), vocab_size, gamma)


def make_processor(*args, **kwargs):
    kwargs.setdefault("key", 987654321)  # not the default key: no warning noise
    return wm.WatermarkProcessor(*args, **kwargs)


def simulate(proc, vocab_size, steps, scale, seed, watermark=True):
    """A stand-in language model: random logits each step, watermarked by proc, sampled with a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    history = [int(torch.randint(vocab_size, (1,), generator=generator)) for _ in range(4)]
    for _ in range(steps):
        logits = torch.randn(1, vocab_size, generator=generator) * scale
        if watermark:
            logits = proc([history], logits)
        history.append(int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=generator)))
    return history[4:]


def test_lefthash_green_list_is_the_written_rule():
    for vocab_size, gamma, key in ((V, 0.25, KEY), (V, 0.5, KEY), (50257, 0.25, 2**62 + 7), (1000, 0.1, 3)):
        for prev in (0, 1, 7, 999, 29871 % vocab_size):
            expected = rule_lefthash(prev, vocab_size, gamma, key)
            assert torch.equal(green_list(prev, vocab_size, gamma, key), expected)
            mask = wm.lefthash_mask(prev, vocab_size, gamma, key)
            assert torch.equal(mask.nonzero().flatten(), expected.sort().values)
            proc = make_processor(vocab_size, gamma=gamma, delta=2.0, key=key)
            out = proc([[3, prev]], torch.zeros(1, vocab_size))
            assert torch.equal(out[0].nonzero().flatten(), expected.sort().values)
            assert set(out[0].unique().tolist()) == {0.0, 2.0}


def test_lefthash_matches_hugging_face_vectors():
    # First 8 green ids from transformers 4.46.0 WatermarkLogitsProcessor(vocab_size=32000, device="cpu",
    # greenlist_ratio=0.25, hashing_key=...)._get_greenlist_ids: an independent implementation of the same rule.
    assert green_list(1, V)[:8].tolist() == [958, 17083, 30553, 27350, 1329, 24091, 15003, 13468]
    assert green_list(1234, V)[:8].tolist() == [13720, 6735, 1887, 18600, 22145, 24621, 18685, 26781]
    assert green_list(31999, V)[:8].tolist() == [10511, 24288, 8406, 1661, 12440, 18393, 10037, 9371]
    # key x token >= 2**64 exercises the modulo
    assert green_list(29871, V, key=2**62 + 7)[:8].tolist() == [21604, 6322, 8399, 13888, 5003, 25452, 28304, 30022]


def test_selfhash_seed_matches_reference_int64_arithmetic():
    rng = random.Random(0)
    windows = [[rng.randrange(V) for _ in range(4)] for _ in range(200)] + [[0, 0, 0, 0], [31999, 5, 31998, 2]]
    wrapped = 0
    for window in windows:
        raw, seed = rule_selfhash_seed(window, KEY)
        assert wm.selfhash_seed(window, KEY) == seed
        wrapped += raw < 0
    assert wrapped > 10  # the int64 overflow path really was exercised
    for window in windows[:20]:
        assert wm.selfhash_is_green(tuple(window), V, 0.25, KEY) == rule_selfhash_green(window, V, 0.25, KEY)


def test_selfhash_processor_biases_self_consistent_top_candidates():
    proc = make_processor(V, gamma=0.25, delta=2.0, scheme="selfhash", key=KEY)
    generator = torch.Generator().manual_seed(1)
    histories = [[11, 22, 33, 44], [31999, 31998, 7], [5, 6]]  # the last row is too short to seed
    logits = torch.randn(3, V, generator=generator)
    out = proc(histories, logits.clone())
    for row in range(2):
        top = torch.sort(logits[row], descending=True, stable=True).indices[:41].tolist()
        expected = sorted(c for c in top if rule_selfhash_green(histories[row][-3:] + [c], V, 0.25, KEY))
        assert expected, "no candidate green: the test would prove nothing"
        assert (out[row] - logits[row]).nonzero().flatten().tolist() == expected
    assert torch.equal(out[2], logits[2])
    # all logits tied: the top 41 are the 41 lowest ids, whatever sort the device would use
    out = proc([[1, 2, 3]], torch.zeros(1, V))
    expected = [c for c in range(41) if rule_selfhash_green([1, 2, 3, c], V, 0.25, KEY)]
    assert out[0].nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("scheme", ["lefthash", "selfhash"])
def test_watermarked_streams_are_detected(scheme):
    proc = make_processor(V, gamma=0.25, delta=2.0, scheme=scheme)
    scale = 1.0 if scheme == "lefthash" else 4.0  # selfhash only touches the top 41, so it needs peaked logits
    for seed in range(2):
        tokens = simulate(proc, V, 200, scale, seed)
        result = wm.detect(tokens, V, 0.25, scheme, proc.key)
        assert result["z_score"] > 4 and result["verdict"] == "watermarked" and result["prediction"] is True
        assert result["p_value_binomial"] < 1e-4
        plain = wm.detect(simulate(proc, V, 200, scale, seed, watermark=False), V, 0.25, scheme, proc.key)
        assert plain["z_score"] < 4 and plain["verdict"] == "no watermark"
        assert wm.detect(tokens, V, 0.25, scheme, proc.key + 1)["z_score"] < 4  # the wrong key sees nothing


def test_false_positive_rate_matches_nominal_p_value():
    # Unwatermarked streams: the green count is Binomial(T, gamma), so P(z > 2) is an exact binomial tail.
    vocab_size, gamma, length, streams = 1000, 0.25, 50, 2000
    rng = random.Random(2)
    hits, greens = 0, 0
    for _ in range(streams):
        result = wm.detect([rng.randrange(vocab_size) for _ in range(length)], vocab_size, gamma, "lefthash", KEY,
                           counting="all")
        hits += result["z_score"] > 2
        greens += result["num_green_tokens"]
    T = length - 1
    first = next(g for g in range(T + 1) if (g - gamma * T) / math.sqrt(T * gamma * (1 - gamma)) > 2)
    expected = sum(math.comb(T, g) * gamma**g * (1 - gamma) ** (T - g) for g in range(first, T + 1))
    sd = math.sqrt(expected * (1 - expected) / streams)
    assert abs(hits / streams - expected) < 4 * sd, (hits / streams, expected)
    assert abs(greens / (streams * T) - gamma) < 0.01


def test_same_green_lists_whatever_the_logits_device_or_dtype():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    generator = torch.Generator().manual_seed(3)
    # bf16 values are exact in fp16 and fp32, so every dtype sees the same ranking (selfhash reads it)
    base = (torch.randn(2, V, generator=generator) * 3).to(torch.bfloat16).float()
    histories = [[10, 20, 30, 40], [31999, 1, 2, 3]]
    for scheme in ("lefthash", "selfhash"):
        proc = make_processor(V, scheme=scheme)
        reference = None
        for device in devices:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                logits = base.to(device=device, dtype=dtype)
                out = proc(histories, logits.clone())
                assert out.device == logits.device and out.dtype == dtype
                green = (out.float() != logits.float()).cpu()
                reference = green if reference is None else reference
                assert torch.equal(green, reference), (scheme, device, dtype)
        assert reference.sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that a CUDA model gets CPU green lists")
def test_green_lists_on_cuda_come_from_the_cpu_generator():
    proc = make_processor(V)
    out = proc([[1234]], torch.zeros(1, V, device="cuda"))
    assert torch.equal(out[0].nonzero().flatten().cpu(), rule_lefthash(1234, V, 0.25, proc.key).sort().values)


def all_green_tokens(count, vocab_size, gamma, key):
    tokens = [1]
    while len(tokens) < count + 1:
        tokens.append(int(green_list(tokens[-1], vocab_size, gamma, key)[0]))
    return tokens


def test_short_text_rule():
    # gamma 0.25, threshold 4: all green reaches z = sqrt(3T), which first exceeds 4 at T = 6.
    five = wm.detect(all_green_tokens(5, 1000, 0.25, KEY), 1000)
    assert five["num_green_tokens"] == 5 and five["verdict"] == "too short" and five["prediction"] is False
    six = wm.detect(all_green_tokens(6, 1000, 0.25, KEY), 1000)
    assert six["num_green_tokens"] == 6 and six["verdict"] == "watermarked"
    single = wm.detect([42], 1000)
    assert single["num_tokens_scored"] == 0 and single["verdict"] == "too short" and single["z_score"] is None
    json.dumps(single)


def test_false_positive_rate_on_repetitive_text_over_many_keys():
    # Unwatermarked text is repetitive: Zipf-distributed tokens, like words. 120 texts of 100 tokens, each with its
    # own random key. At z > 2 the z-test promises 2.3% (2.7 of 120; 9 or more has probability < 0.2%). Counting
    # each selfhash 4-gram once (the reference's way) flags a quarter of them; each (seed, token) pair once does not.
    rng = np.random.default_rng(0)
    flagged = {("lefthash", "pairs"): 0, ("selfhash", "pairs"): 0, ("selfhash", "ngrams"): 0}
    for _ in range(120):
        key, ids = int(rng.integers(1, 2**62)), ((rng.zipf(1.5, 100) - 1) % 1000).tolist()
        for scheme, counting in flagged:
            flagged[scheme, counting] += wm.detect(ids, 1000, 0.25, scheme, key, 2.0, counting)["prediction"]
    assert flagged["lefthash", "pairs"] <= 8 and flagged["selfhash", "pairs"] <= 8, flagged
    assert flagged["selfhash", "ngrams"] >= 18, flagged


def test_repeated_ngrams_are_counted_once():
    tokens = all_green_tokens(2, 1000, 0.25, KEY)  # a, b, c with (a, b) and (b, c) green
    looped = tokens * 20
    once = wm.detect(looped, 1000)
    every = wm.detect(looped, 1000, counting="all")
    assert once["num_tokens_scored"] == 3  # (a,b), (b,c), (c,a)
    assert every["num_tokens_scored"] == len(looped) - 1
    assert once["verdict"] == "too short" and every["verdict"] == "watermarked"  # repetition alone fools counting all
    positions, greens = wm.score_tokens([5, 6, 5, 6, 7], 1000, 0.25, "lefthash", KEY)
    assert positions == [1, 2, 4]  # the second (5, 6) is skipped


def test_statistics():
    for green, total, gamma in ((0, 10, 0.25), (3, 10, 0.25), (10, 10, 0.5), (7, 20, 0.1)):
        direct = sum(math.comb(total, g) * gamma**g * (1 - gamma) ** (total - g) for g in range(green, total + 1))
        assert wm.binomial_p_value(green, total, gamma) == pytest.approx(direct, rel=1e-9)
    assert 0 < wm.binomial_p_value(1500, 5000, 0.25) < 1e-8  # large T stays finite
    result = wm.detect(list(range(100)), 1000, gamma=0.5, counting="all")
    g, t = result["num_green_tokens"], result["num_tokens_scored"]
    assert result["z_score"] == pytest.approx((g - 0.5 * t) / math.sqrt(t * 0.25))
    assert result["p_value"] == pytest.approx(0.5 * math.erfc(result["z_score"] / math.sqrt(2)))
    assert result["green_fraction"] == pytest.approx(g / t)


def test_window_locates_a_watermarked_span():
    vocab_size, rng = 1000, random.Random(4)
    human = [rng.randrange(vocab_size) for _ in range(300)]
    proc = make_processor(vocab_size, delta=4.0)
    marked = simulate(proc, vocab_size, 80, 1.0, seed=5)
    tokens = human + marked + [rng.randrange(vocab_size) for _ in range(300)]
    result = wm.detect(tokens, vocab_size, key=proc.key, window=True)
    span = result["window"]
    overlap = min(span["end"], 380) - max(span["start"], 300)
    assert overlap > 0.7 * (span["end"] - span["start"]) and overlap > 50, span
    assert result["verdict"] == "watermarked" and span["p_value_corrected"] < wm.normal_p_value(4)
    assert span["p_value_corrected"] == pytest.approx(min(1, span["p_value_binomial"] * span["num_windows"]))
    plain = wm.detect(human * 2, vocab_size, key=proc.key, window=True, counting="all")
    assert plain["verdict"] == "no watermark" and plain["window"]["z_score"] > 2  # the search finds some high z...
    assert plain["window"]["p_value_corrected"] > 0.01  # ...which the correction discounts


def test_processor_params_validation_and_warning(capsys):
    proc = wm.WatermarkProcessor(V)
    assert "default key" in capsys.readouterr().err
    params = json.loads(json.dumps(proc.params))
    assert params == {"scheme": "lefthash", "gamma": 0.25, "delta": 2.0, "vocab_size": V, "context_width": 1,
                      "key_fingerprint": wm.key_fingerprint(KEY)}
    assert str(KEY) not in json.dumps(params) and wm.key_fingerprint(KEY) != wm.key_fingerprint(KEY + 1)
    assert make_processor(V, scheme="selfhash").params["context_width"] == 4
    for kwargs in ({"gamma": 0.0}, {"gamma": 1.0}, {"scheme": "minhash"}, {"key": 0}, {"key": 2**63}):
        with pytest.raises(ValueError):
            make_processor(V, **kwargs)
    with pytest.raises(ValueError, match="logits dimension"):
        make_processor(V)([[1]], torch.zeros(1, V + 64))
    logits = torch.randn(2, V)
    out = make_processor(V)([[], [7]], logits.clone())
    assert torch.equal(out[0], logits[0]) and not torch.equal(out[1], logits[1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        wm.detect([1, 2, V], V)
    with pytest.raises(ValueError, match="empty"):
        wm.detect([], V)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    import sentencepiece
    rng = random.Random(0)
    words = ("the a model learns to follow an instruction and writes short answers about cats dogs science "
             "history music water light time people data text green red list token").split()
    sentences = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=f, vocab_size=120,
                                                 model_type="bpe", minloglevel=2)
    return str(path)


def run_cli(capsys, *args):
    wm.main(["detect", *args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_text_ids_and_jsonl(tokenizer_path, capsys, tmp_path):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    text = "the model writes short answers about green cats and red dogs " * 3
    [out] = run_cli(capsys, f"--tokenizer={tokenizer_path}", f"--text={text}", "--json")
    assert out == wm.detect(sp.encode(text), sp.get_piece_size())
    [out] = run_cli(capsys, "--vocab_size=500", "--ids=12 87 3, 4 99 5", "--json", "--gamma=0.5")
    assert out["num_tokens_scored"] == 5 and out["gamma"] == 0.5 and out["counting"] == "pairs"
    looped = " ".join(["7 8 9"] * 10)  # one selfhash 4-gram per position of the loop, 27 windows in all
    counted = {c: run_cli(capsys, "--vocab_size=500", f"--ids={looped}", "--json", "--scheme=selfhash",
                          f"--counting={c}")[0]["num_tokens_scored"] for c in wm.COUNTINGS}
    assert counted["all"] == 27 and counted["pairs"] <= counted["ngrams"] == 3

    proc = make_processor(sp.get_piece_size(), delta=6.0)
    marked = simulate(proc, sp.get_piece_size(), 120, 1.0, seed=6)
    rows = [{"output": marked, "watermark": proc.params}, {"output": sp.decode(marked[:60])}, {"output": ""}]
    path = tmp_path / "outputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = run_cli(capsys, f"--tokenizer={tokenizer_path}", f"--in={path}", f"--key={proc.key}", "--json")
    assert [r["line"] for r in results] == [1, 2, 3]
    assert results[0]["verdict"] == "watermarked" and results[2]["verdict"] == "too short"
    wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}", f"--key={proc.key}", "--window"])
    assert "best window" in capsys.readouterr().out


def test_cli_refuses_mismatches_and_bad_input(tokenizer_path, tmp_path, capsys):
    params = make_processor(4000).params
    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps({"output": "the cats", "watermark": params}) + "\n")
    with pytest.raises(SystemExit, match=r"outputs.jsonl:1: field 'watermark'.*vocab_size=4000"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}", "--key=987654321"])
    with pytest.raises(SystemExit, match=r"outputs.jsonl:1: .*fingerprint"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}", "--vocab_size=4000"])
    with pytest.raises(SystemExit, match=r"outputs.jsonl:1: .*gamma=0.25"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}", "--vocab_size=4000", "--gamma=0.5",
                 "--key=987654321"])
    path.write_text('{"output": "ok"}\n{"output": \n')
    with pytest.raises(SystemExit, match=r"outputs.jsonl:2: not valid JSON"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}"])
    # a last line with no newline is the torn write of a killed sample.py: said and not scored, the file left as is
    path.write_text('{"output": "the cats"}\n{"output": "the do')
    wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}", "--json"])
    out, err = capsys.readouterr()
    assert [json.loads(line)["line"] for line in out.splitlines()] == [1] and "outputs.jsonl:2: no newline" in err
    assert path.read_text().endswith('"the do')
    path.write_text('{"text": "ok"}\n')
    with pytest.raises(SystemExit, match=r"outputs.jsonl:1: field 'output' missing"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}"])
    path.write_text("\n")
    with pytest.raises(SystemExit, match="empty input"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", f"--in={path}"])
    with pytest.raises(SystemExit, match="empty input"):
        wm.main(["detect", f"--tokenizer={tokenizer_path}", "--text= "])
    with pytest.raises(SystemExit, match="vocab_size unknown"):
        wm.main(["detect", "--ids=1 2 3"])
    with pytest.raises(SystemExit, match="unknown scheme"):
        wm.main(["detect", "--ids=1 2 3", "--vocab_size=10", "--scheme=minhash"])
    with pytest.raises(SystemExit, match="gamma must lie strictly between 0 and 1"):
        wm.main(["detect", "--ids=1 2 3", "--vocab_size=10", "--gamma=1.5"])
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        wm.main(["detect", "--ids=1 2 30", "--vocab_size=10"])


def test_cli_runs_as_a_script():
    out = subprocess.run([sys.executable, "watermark.py", "detect", "--vocab_size=1000", "--ids=" + " ".join(
        str(t) for t in all_green_tokens(20, 1000, 0.25, KEY))], capture_output=True, text=True, check=True,
                         cwd=wm.__file__.rsplit("/", 1)[0])
    assert out.stdout.startswith("watermarked: 20/20 tokens green")
