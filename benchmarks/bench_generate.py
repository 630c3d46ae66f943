"""Early exit vs full-length batched generation for the refusal verdict, in the same run.

Both modes see the same prompts, batch size and max_new_tokens (256 by default, the study's setting):
  full   HF ``model.generate``, greedy, every response to EOS or max_new_tokens (what the study ran)
  early  refusal_probe's decode loop: a response stops once a keyword of the judge matched (or EOS), and finished
         rows leave the batch and the KV cache
Reported: wall time of each (each mode timed ``--repeats`` times, alternating, median), tokens generated, verdict
agreement (must be 1.0) and the speed-up full/early (target >= 2.5x on a refusing model).

On ``--model tiny`` (random weights) no response contains a refusal keyword, so the judge is replaced by a
synthetic one whose keyword is a 3-character string found early in about ``--synthetic-rate`` of the full-length
responses (real refusals: keyword by token 3 median, 14 max, on 79% of AdvBench for Qwen 0.5B). Use
``--tiny-hidden 512 --tiny-layers 8`` so that the forward pass, not Python, dominates a step as on a real model.
It shows the mechanism, not the speed-up on a real model. Usage:
  python benchmarks/bench_generate.py --model tiny --n 32 --tiny-hidden 512 --tiny-layers 8
  python benchmarks/bench_generate.py --model qwen2.5-coder-0.5b-instruct --n 64 --batch-size 16   # the lead
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def synthetic_judge(texts: list[str], rate: float, within: int = 24):
    """A judge whose keyword (3 characters) occurs within the first ``within`` characters of about ``rate`` of
    the responses, the way refusal keywords open real refusals."""
    from refusal_probe.evaluate.judge import KeywordJudge

    df: Counter[str] = Counter()
    for t in texts:
        low = t.lower()[:within]
        df.update({low[i : i + 3] for i in range(len(low) - 2) if low[i : i + 3].strip() == low[i : i + 3]})
    target = rate * len(texts)
    best = min(sorted(df), key=lambda k: (abs(df[k] - target), k))
    return KeywordJudge("synthetic", (best,), normalized=False, empty_is_refusal=False)


class ForwardLog:
    """Times every forward of the model (HF generate's and our loop's alike): decode steps (one new token per
    row) apart from prefills, with the rows each carried, to say where a mode's time goes."""

    def __init__(self, model):
        self.calls: list[tuple[int, int, float]] = []  # (rows, new tokens per row, seconds)
        self._t = 0.0
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._t = time.perf_counter()

    def _post(self, module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append((int(ids.shape[0]), int(ids.shape[1]), time.perf_counter() - self._t))

    def take(self) -> dict:
        calls, self.calls = self.calls, []
        decode = [c for c in calls if c[1] == 1]
        prefill = [c for c in calls if c[1] > 1]
        return {
            "decode_steps": len(decode),
            "decode_s": round(sum(c[2] for c in decode), 2),
            "decode_row_steps": sum(c[0] for c in decode),
            "s_per_step": round(sum(c[2] for c in decode) / max(1, len(decode)), 4),
            "prefills": len(prefill),
            "prefill_s": round(sum(c[2] for c in prefill), 2),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="tiny", help="'tiny' (random Llama built on the spot) or any model spec"
    )
    ap.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the tiny model")
    ap.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny model")
    ap.add_argument(
        "--synthetic-rate", type=float, default=0.8, help="tiny: share of responses the keyword stops"
    )
    ap.add_argument("--n", type=int, default=32, help="AdvBench prompts (first N)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per response (study: 256)")
    ap.add_argument(
        "--judge", default="keywords", choices=("keywords", "seed-keywords"), help="refusal judge"
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed passes of each mode (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("--out", default=None, help="write the result JSON here too")
    args = ap.parse_args(argv)

    import torch

    from refusal_probe.core.generate import generate_detailed
    from refusal_probe.data import advbench
    from refusal_probe.evaluate.judge import get_judge
    from refusal_probe.models.source import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model
    if spec == "tiny":
        from refusal_probe.testing.tiny import make_tiny_model

        spec = str(
            make_tiny_model(
                Path(tempfile.mkdtemp()) / "tiny",
                arch="llama",
                n_layers=args.tiny_layers,
                hidden=args.tiny_hidden,
            )
        )
    model, tok = load_model(spec, device=args.device)
    prompts = advbench()[: args.n]
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    generate_detailed(
        model, tok, prompts[: min(2, len(prompts))], max_new_tokens=4, batch_size=2, progress=False
    )

    log = ForwardLog(model)
    full_times, early_times, full, early = [], [], None, None
    profile: dict[str, dict] = {}
    judge = get_judge(args.judge)
    for r in range(args.repeats):
        t = time.perf_counter()
        full = generate_detailed(model, tok, prompts, **gen)
        full_times.append(time.perf_counter() - t)
        profile["full"] = log.take()
        print(f"full: {full_times[-1]:.1f} s {profile['full']}", file=sys.stderr, flush=True)
        if r == 0 and args.model == "tiny":
            judge = synthetic_judge([g.text for g in full], args.synthetic_rate)
        t = time.perf_counter()
        early = generate_detailed(model, tok, prompts, stop=judge.has_keyword, **gen)
        early_times.append(time.perf_counter() - t)
        profile["early"] = log.take()
        print(f"early: {early_times[-1]:.1f} s {profile['early']}", file=sys.stderr, flush=True)

    v_full = [judge.is_refusal(g.text) for g in full]
    v_early = [judge.is_refusal(g.text) for g in early]
    stopped = [g.n_tokens for g in early if g.finish == "stop"]
    result = {
        "model": args.model,
        "judge": judge.signature,
        "n": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "full_s": round(statistics.median(full_times), 3),
        "early_s": round(statistics.median(early_times), 3),
        "speedup": round(statistics.median(full_times) / statistics.median(early_times), 2),
        "verdict_agreement": sum(a == b for a, b in zip(v_full, v_early, strict=True)) / len(prompts),
        "refusal_rate": sum(v_full) / len(prompts),
        "tokens_full": sum(g.n_tokens for g in full),
        "tokens_early": sum(g.n_tokens for g in early),
        "stopped_early": len(stopped),
        "stop_token_median": statistics.median(stopped) if stopped else None,
        "stop_token_max": max(stopped) if stopped else None,
        "forwards_last_repeat": profile,
        "tokens_per_prompt_early": [g.n_tokens for g in early],
        "finish_early": "".join(g.finish[0] for g in early),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if result["verdict_agreement"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
