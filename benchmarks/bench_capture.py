"""Cost of capturing post-instruction activations, against a bare forward of the body model.

Variants, each timed in a fresh subprocess (so one variant's allocator cache cannot hide another's peak):
  a  bare forward of ``model.model`` (no LM head), the floor
  b  ``refusal_probe.probe.activations.capture`` (pre-hooks copying the last P positions), including tokenising
  c  ``model(..., output_hidden_states=True)`` with the LM head, slicing the last P positions afterwards
  d  transformer-lens 4 ``TransformerBridge.run_with_cache`` with a names_filter of ``blocks.{l}.hook_resid_pre``
Each timed pass of b, c, d follows a bare pass (a) in the same process; the median of those paired ratios is the
number to read on a shared machine, where medians taken minutes apart in different processes drift with the load.
Peak memory is the peak RSS (psutil, sampled every 2 ms in a thread) above the RSS once the model is loaded and
one warm-up batch has run. Usage:
  python benchmarks/bench_capture.py --model tiny --n 64 --batch-size 16
  python benchmarks/bench_capture.py --model qwen2.5-coder-0.5b-instruct   # the lead's run on real weights
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VARIANTS = {
    "a": "bare forward of model.model (no LM head)",
    "b": "hook capture (refusal_probe capture)",
    "c": "model(..., output_hidden_states=True)",
    "d": "transformer-lens run_with_cache (resid_pre filter)",
}


class PeakRSS:
    """Peak resident memory of this process, sampled in a background thread (tracemalloc cannot see torch)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def prompts(n: int) -> list[str]:
    from refusal_probe import data

    return data.harmful_train()[: n - n // 2] + data.harmless_train()[: n // 2]


def run_variant(args: argparse.Namespace) -> dict:
    """Runs in a child process: load, warm up on one batch, then time ``repeats`` passes over all prompts."""
    import psutil
    import torch

    from refusal_probe.core.batching import left_pad, length_sorted_batches, pad_token_id, position_ids
    from refusal_probe.core.template import tokenize_prompts
    from refusal_probe.models.source import load_model
    from refusal_probe.probe.activations import body_model, capture, decoder_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    texts = prompts(args.n)
    ids, post = tokenize_prompts(tok, texts)
    n_pos, n_layers = len(post), len(decoder_layers(model))
    device = next(model.parameters()).device
    batches = []
    for index in length_sorted_batches(ids, args.batch_size):
        input_ids, mask = left_pad([ids[i] for i in index], pad_token_id(tok))
        batches.append((input_ids.to(device), mask.to(device), position_ids(mask).to(device)))
    body = body_model(model)

    def bare(batch):
        body(input_ids=batch[0], attention_mask=batch[1], position_ids=batch[2], use_cache=False)

    def full_hidden(batch):
        out = model(
            input_ids=batch[0],
            attention_mask=batch[1],
            position_ids=batch[2],
            use_cache=False,
            output_hidden_states=True,
        )
        return [h[:, -n_pos:].to("cpu", torch.float64) for h in out.hidden_states[:n_layers]]

    bridge = None
    boot_s = None
    if args.variant == "d":
        from transformer_lens.model_bridge import TransformerBridge

        t0 = time.perf_counter()
        bridge = TransformerBridge.boot_transformers(args.model, hf_model=model, tokenizer=tok)
        boot_s = time.perf_counter() - t0
        names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]

    def tl(batch):
        _, cache = bridge.run_with_cache(
            batch[0], attention_mask=batch[1], position_ids=batch[2], names_filter=names, return_type=None
        )
        return [cache[name][:, -n_pos:].to("cpu", torch.float64) for name in names]

    def one_pass(warm: bool = False) -> None:
        if args.variant == "b":
            capture(
                model,
                tok,
                texts[: args.batch_size] if warm else texts,
                batch_size=args.batch_size,
                progress=False,
            )
            return
        fn = {"a": bare, "c": full_hidden, "d": tl}[args.variant]
        with torch.inference_mode():
            for batch in batches[:1] if warm else batches:
                fn(batch)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare_pass() -> None:
        with torch.inference_mode():
            for batch in batches:
                bare(batch)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    one_pass(warm=True)
    with torch.inference_mode():
        bare(batches[0])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    loaded = psutil.Process().memory_info().rss
    times, bare_times, peaks = [], [], []
    for _ in range(args.repeats):
        # A bare pass right before each timed pass: the paired ratio cancels load from other processes.
        if args.variant != "a":
            bare_times.append(timed(bare_pass))
        with PeakRSS() as mem:
            times.append(timed(one_pass))
        peaks.append(mem.peak)
    paired = [t / b for t, b in zip(times, bare_times, strict=True)] if bare_times else [1.0] * len(times)
    result = {
        "variant": args.variant,
        "what": VARIANTS[args.variant],
        "seconds": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "bare_seconds_paired": bare_times,
        "paired_ratio_vs_bare": statistics.median(paired),
        "peak_rss_above_loaded_mib": (max(peaks) - loaded) / 2**20,
        "rss_loaded_mib": loaded / 2**20,
        "n_layers": n_layers,
        "n_positions": n_pos,
        "tokens": int(sum(int(b[1].numel()) for b in batches)),
    }
    if device.type == "cuda":
        result["cuda_peak_above_loaded_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    if boot_s is not None:
        result["bridge_boot_s"] = boot_s
    return result


def build_tiny(root: Path, layers: int, hidden: int) -> str:
    from refusal_probe.testing.tiny import make_tiny_model

    return str(make_tiny_model(root / "tiny", arch="qwen2", n_layers=layers, hidden=hidden))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="qwen2.5-coder-0.5b-instruct",
        help="model spec for load_model (embedded name, dir, .gguf, hub id) or 'tiny' for a random one",
    )
    parser.add_argument("--n", type=int, default=64, help="number of prompts (half harmful, half harmless)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts per variant")
    parser.add_argument("--variants", default="abcd", help="which variants to run (letters a-d)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="device to run on (cpu, cuda)")
    parser.add_argument("--tiny-layers", type=int, default=8, help="layers of the --model tiny model")
    parser.add_argument("--tiny-hidden", type=int, default=256, help="hidden size of the --model tiny model")
    parser.add_argument(
        "--out", default="benchmarks/results/capture.json", help="where to write the JSON results"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model = (
            build_tiny(Path(tmp), args.tiny_layers, args.tiny_hidden) if args.model == "tiny" else args.model
        )
        results = {}
        for v in args.variants:
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                v,
                "--model",
                model,
                "--n",
                str(args.n),
                "--batch-size",
                str(args.batch_size),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            results[v] = json.loads(proc.stdout.strip().splitlines()[-1])

    # Medians from different processes drift with the machine's load; the paired ratio (a bare pass right
    # before each timed pass, in the same process) is the one to trust on a shared machine.
    floor = results.get("a", {}).get("median_s")
    for r in results.values():
        r["ratio_vs_a"] = r["median_s"] / floor if floor else None
    import torch

    report = {
        "model": args.model
        if args.model != "tiny"
        else f"tiny qwen2 ({args.tiny_layers} layers, d={args.tiny_hidden})",
        "n": args.n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": args.device,
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "machine": platform.platform(),
        "results": results,
    }
    out = Path(args.out)
    from refusal_probe.core.io import write_json

    write_json(out, report)
    print(
        f"model: {report['model']}, n={args.n}, batch {args.batch_size}, {args.repeats} repeats, "
        f"{report['threads']} threads, {args.device}"
    )
    print(
        "| variant | what | median s | min s | x bare (medians) | x bare (paired) | peak RSS above loaded (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for v, r in results.items():
        ratio = f"{r['ratio_vs_a']:.2f}" if r["ratio_vs_a"] else "-"
        paired = f"{r['paired_ratio_vs_bare']:.2f}"
        print(
            f"| {v} | {r['what']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {ratio} | {paired} | "
            f"{r['peak_rss_above_loaded_mib']:.0f} |"
        )
    print(
        "x bare (paired): median over repeats of (pass time / a bare pass run just before it, same process)"
    )
    if "d" in results:
        print(f"transformer-lens bridge boot: {results['d']['bridge_boot_s']:.2f} s (not in the times above)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
