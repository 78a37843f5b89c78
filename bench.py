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

    def median_times(runs, repeats):
        # Runs take turns, so a busy moment on a shared machine slows all of them alike.
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and not cuda:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True  # as sample.py --compile does on CPU
    print(f"device {device}, {torch.get_num_threads()} threads, {args.new_tokens} decode steps per run, "
          f"median of {args.repeats} runs" + (", compiled" if args.compile else ""))

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
            # Summing a buffer as large as the weights reads it as a decode step reads them: from DRAM, or from
            # a cache that holds it (this machine's L3 holds the bench model). It is timed in turns with decoding.
            buffer = torch.ones(min(weight_bytes, 2**30) // 4, device=device)
            print(f"{name} model, {dtype_name}: {weight_bytes / 1e6:.0f} MB of weights read per step", flush=True)
            for batch in (1, 16):
                prompts = [[1 + (i * 7 + j) % 31000 for j in range(args.prompt_len)] for i in range(batch)]

                def run(n, processor=None):
                    return lambda: generate(model, prompts, n, temperature=0, logits_processor=processor)

                run(steps)()  # warm up kernels and allocator
                # Decode time alone: a run of 1 + steps tokens minus a run of 1 token (prefill and first sample).
                # A logits processor of the watermark's call shape that does nothing gives the hook's own cost.
                runs = {"prefill": run(1), "decode": run(1 + steps)}
                if batch == 1:
                    runs["hooked"] = run(1 + steps, lambda prev_tokens, logits: logits)
                    runs["read"] = buffer.sum
                t = median_times(runs, args.repeats)
                decode = t["decode"] - t["prefill"]
                tokens_per_s = batch * steps / decode
                line = f"  batch {batch:2d}: {tokens_per_s:8.1f} tokens/s ({1e3 * decode / steps:.2f} ms/step)"
                if batch == 1:
                    bandwidth = buffer.numel() * 4 / t["read"]
                    roofline = bandwidth / weight_bytes
                    line += (f"; bandwidth {bandwidth / 1e9:.1f} GB/s, roofline {roofline:.0f} tokens/s, reached "
                             f"{100 * tokens_per_s / roofline:.0f}%; a no-op logits hook adds "
                             f"{1e3 * (t['hooked'] - t['decode']) / steps:+.3f} ms/step")
                print(line, flush=True)
            del model, buffer

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
