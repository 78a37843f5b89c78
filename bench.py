"""
Benchmarks of the recipe's scripts on this machine (not timed tests).

    python bench.py sample      # sample.py's decode speed against the memory-bandwidth roofline
"""
import argparse


def bench_sample(args):
    """Decode tokens/s of sample.generate at batch 1 and 16, in bf16 and fp32, against the roofline for batch 1:
    each decode step reads every weight once (the embedding only one row), so tokens/s cannot beat
    measured memory bandwidth / bytes of weights."""
    import time

    import torch

    from sample import generate
    from train import ModelArgs, Transformer

    device = args.device
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def median_time(fn, repeats):
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def read_bandwidth(nbytes):
        # Summing a buffer as large as the weights reads it the way a decode step reads them: from DRAM, or
        # from a cache where one holds it (this machine's L3 can hold the small bench model).
        buffer = torch.ones(nbytes // 4, device=device)
        return buffer.numel() * 4 / median_time(lambda: buffer.sum(), 9)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and not cuda:
        import torch._inductor.config
        torch._inductor.config.freezing = True  # as sample.py --compile does on CPU
    print(f"device {device}, {torch.get_num_threads()} threads; read bandwidth of a 1 GB buffer "
          f"{read_bandwidth(2**30) / 1e9:.1f} GB/s")

    configs = [("bench", dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000), ["bfloat16", "float32"])]
    if cuda:
        configs.append(("7B", dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000), ["bfloat16"]))
    steps = args.new_tokens
    for name, shape, dtypes in configs:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(0)
            with torch.device(device):
                model = Transformer(ModelArgs(**shape, max_seq_len=1024))
            model.init_weights()
            model = model.to(dtype).eval()
            weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                               if n != "tok_embeddings.weight")
            if args.compile:
                model = torch.compile(model, dynamic=True)
            bandwidth = read_bandwidth(min(weight_bytes, 2**30))
            roofline = bandwidth / weight_bytes
            print(f"{name} model, {dtype_name}: {weight_bytes / 1e6:.0f} MB of weights read per step at "
                  f"{bandwidth / 1e9:.1f} GB/s: roofline {roofline:.1f} tokens/s at batch 1")
            for batch in (1, 16):
                prompts = [[1 + (i * 7 + j) % 31000 for j in range(args.prompt_len)] for i in range(batch)]

                def run(n, processor=None):
                    return lambda: generate(model, prompts, n, temperature=0, logits_processor=processor)

                run(steps)()  # warm up kernels and allocator
                # Decode time alone: a run of 1 + steps tokens minus a run of 1 token (prefill and first sample).
                prefill = median_time(run(1), args.repeats)
                decode = median_time(run(1 + steps), args.repeats) - prefill
                tokens_per_s = batch * steps / decode
                line = f"  batch {batch:2d}: {tokens_per_s:8.1f} tokens/s ({1e3 * decode / steps:.2f} ms/step)"
                if batch == 1:
                    line += f", {100 * tokens_per_s / roofline:.0f}% of roofline"
                    # A logits processor of the watermark's call shape that does nothing: the hook's own cost.
                    hooked = median_time(run(1 + steps, lambda prev_tokens, logits: logits), args.repeats) - prefill
                    line += f"; with a no-op logits hook {1e3 * (hooked - decode) / steps:+.3f} ms/step"
                print(line, flush=True)
            del model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sample_parser = commands.add_parser("sample", help="decode tokens/s vs the memory-bandwidth roofline")
    sample_parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    sample_parser.add_argument("--new_tokens", type=int, default=64, help="decode steps timed per run")
    sample_parser.add_argument("--prompt_len", type=int, default=32)
    sample_parser.add_argument("--repeats", type=int, default=5)
    sample_parser.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    sample_parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sample_parser.set_defaults(run=bench_sample)
    args = parser.parse_args()
    args.run(args)
