"""Cost of weight-delta analysis, against the obvious dense computation.

Comparisons, each variant timed in a fresh subprocess (so one variant's allocator cache cannot hide another's peak):
  lora_factors  refusal_probe.probe.weights.adapter_deltas: norms from r x r Gram matrices of the LoRA factors
  lora_merge    peft PeftModel.from_pretrained + merge_and_unload, then subtract the base weights and take norms
  full_stream   refusal_probe.probe.weights.full_deltas: both checkpoints streamed tensor by tensor (safe_open)
  full_naive    from_pretrained of base and checkpoint, subtract parameter by parameter, take norms
Every variant computes the same metrics (delta_fro, base_fro, delta_along_refusal for residual writers) in
float64; the script checks they agree. Time = median over --repeats fresh processes of the whole operation (files
in, metrics out), after imports: cold (first call in the process: lazy imports, thread pools) and warm (second
call; for adapter_deltas the base norms are then cached, as when analysing several checkpoints of one run).
The dense variants run with --threads torch threads; refusal-probe's functions switch to one thread internally
(their ops are small or memory-bound; on a loaded machine thread hand-offs cost more than the arithmetic);
--threads 1 compares the algorithms alone. Memory = peak RSS of the child (VmHWM; getrusage's ru_maxrss elsewhere), also
shown above the RSS after imports (psutil), since every child imports the same libraries first.

The test inputs are built in a temp dir: a LoRA r=8 adapter on q,k,v,o_proj with random A and B, and a full
checkpoint with every weight perturbed; refusal directions are random unit vectors (the cost does not depend on them).
Usage:
  python benchmarks/bench_weight_deltas.py --model tiny --out /tmp/weight_deltas.json
  python benchmarks/bench_weight_deltas.py                      # qwen2.5-coder-0.5b-instruct, the lead's run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "lora_factors": "LoRA metrics from factors (adapter_deltas)",
    "lora_merge": "peft merge_and_unload, subtract base",
    "full_stream": "streamed full deltas (full_deltas)",
    "full_naive": "from_pretrained both, subtract",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ------------------------------------------------------------------------------------------------ setup (child)


def build_inputs(base: Path, work: Path, rank: int, seed: int) -> dict:
    """Write work/adapter (LoRA r on q,k,v,o, random factors), work/full (all weights perturbed), directions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    torch.save({i: torch.randn(d_model, generator=g) for i in range(n_layers)}, work / "directions.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(work / "full")
    del model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(work / "adapter")
    n_params = sum(p.numel() for p in model.parameters())
    return {"n_layers": n_layers, "d_model": d_model, "n_params": n_params}


# ------------------------------------------------------------------------------------------------ variants (child)


def _metrics_dense(base_w, new_w, r_hat, residual: bool) -> dict:
    """The obvious way: subtract whole tensors in float64, take norms."""
    d = new_w.double() - base_w.double()
    out = {"delta_fro": float(d.norm()), "base_fro": float(base_w.double().norm())}
    if r_hat is not None and residual:
        out["delta_along_refusal"] = float((r_hat @ d).norm())
    return out


def _rows_to_dict(rows: list[dict]) -> dict:
    return {
        f"{r['layer']}|{r['module']}|{r['metric']}": r["value"]
        for r in rows
        if r["metric"] in ("delta_fro", "base_fro", "delta_along_refusal")
    }


def _operation(variant: str, base: Path, work: Path, directions: dict) -> dict:
    """One full computation, files in, metrics out: ``{"layer|module|metric": value}``."""
    import torch
    from safetensors.torch import load_file

    from refusal_probe.probe.measures import unit
    from refusal_probe.probe.weights import RESIDUAL_WRITERS, adapter_deltas, full_deltas, locate

    if variant == "lora_factors":
        return _rows_to_dict(adapter_deltas(work / "adapter", base, directions, progress=False))
    if variant == "full_stream":
        return _rows_to_dict(full_deltas(base, work / "full", directions, progress=False))
    from transformers import AutoModelForCausalLM

    result = {}
    if variant == "lora_merge":
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
        base_state = {}
        for f in sorted(base.glob("*.safetensors")):
            base_state.update(load_file(f))
        targets = tuple(f".{t}.weight" for t in LORA_TARGETS)
        for key, w in merged.state_dict().items():
            loc = locate(key)
            if loc is None or not key.endswith(targets):
                continue
            layer, module = loc
            r_hat = unit(directions[layer]) if layer in directions else None
            for m, v in _metrics_dense(base_state[key], w, r_hat, module in RESIDUAL_WRITERS).items():
                result[f"{layer}|{module}|{m}"] = v
        return result
    if variant == "full_naive":
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        ckpt_state = AutoModelForCausalLM.from_pretrained(work / "full", dtype=torch.float32).state_dict()
        seen = set()
        for key, w in base_model.state_dict().items():
            loc = locate(key)
            if loc is None or w.dim() != 2 or w.data_ptr() in seen:
                continue  # skip what we do not analyse and tied duplicates (lm_head sharing embed_tokens)
            seen.add(w.data_ptr())
            layer, module = loc
            r_hat = unit(directions[layer]) if layer in directions else None
            for m, v in _metrics_dense(w, ckpt_state[key], r_hat, module in RESIDUAL_WRITERS).items():
                result[f"{layer}|{module}|{m}"] = v
        return result
    raise SystemExit(f"unknown variant {variant}")


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM on Linux. ru_maxrss is not used there because Linux carries it over
    from the parent across fork + exec, so a big parent would set every child's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_variant(variant: str, base: Path, work: Path) -> dict:
    """In a fresh child: the operation twice, cold (first call: lazy imports, thread pools) and warm."""
    import gc

    # every child imports the same libraries before the baseline, so RSS above it is the operation's own cost
    import peft  # noqa: F401
    import psutil
    import torch
    import transformers  # noqa: F401

    import refusal_probe.probe.weights  # noqa: F401

    directions = torch.load(work / "directions.pt")
    rss_after_imports = psutil.Process().memory_info().rss
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        result = _operation(variant, base, work, directions)
        times.append(time.perf_counter() - t0)
        gc.collect()
    peak = _peak_rss_bytes()
    return {
        "seconds_cold": times[0],
        "seconds_warm": times[1],
        "peak_rss_mib": peak / 2**20,
        "rss_after_imports_mib": rss_after_imports / 2**20,
        "above_imports_mib": (peak - rss_after_imports) / 2**20,
        "result": result,
    }


# ------------------------------------------------------------------------------------------------ parent


def _child(args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {' '.join(extra)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resolve_base(args: argparse.Namespace, work: Path) -> Path:
    if args.model == "tiny":
        from refusal_probe.testing.tiny import make_tiny_model

        return make_tiny_model(work / "base", n_layers=args.tiny_layers, hidden=args.tiny_hidden)
    from refusal_probe.models.source import resolve_model_dir

    return resolve_model_dir(args.model)


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference over the values both variants computed."""
    worst = 0.0
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        scale = max(abs(x), abs(y), 1e-30)
        worst = max(worst, abs(x - y) / scale)
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="qwen2.5-coder-0.5b-instruct", help="model spec, or 'tiny' for a random one"
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/weight_deltas.json"), help="JSON result"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the test adapter")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions per variant (fresh process each)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random adapter, perturbation and directions"
    )
    p.add_argument("--tiny-layers", type=int, default=4, help="layers of the --model tiny model")
    p.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the --model tiny model")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where to build the inputs (default: a temp dir)"
    )
    p.add_argument("--keep", action="store_true", help="keep the built inputs")
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_setup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args._setup:
        base = _resolve_base(args, args._work)
        print(json.dumps({"base": str(base), **build_inputs(base, args._work, args.rank, args.seed)}))
        return 0
    if args._variant:
        print(json.dumps(run_variant(args._variant, args._base, args._work)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-weight-deltas-", dir=args.workdir))
    try:
        # the base model is resolved (or built) in the setup child, so this process stays small
        print(f"building adapter (r={args.rank}) and perturbed checkpoint in {work}", file=sys.stderr)
        setup = ["--_setup", "--_work", str(work), "--model", args.model, "--rank", str(args.rank)]
        setup += ["--seed", str(args.seed), "--tiny-layers", str(args.tiny_layers)]
        setup += ["--tiny-hidden", str(args.tiny_hidden)]
        info = _child(args, setup)
        base = Path(info.pop("base"))
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for i in range(args.repeats):
            for v in VARIANTS:
                print(f"repeat {i + 1}/{args.repeats}: {v}", file=sys.stderr)
                runs[v].append(_child(args, ["--_variant", v, "--_base", str(base), "--_work", str(work)]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for v, rs in runs.items():
        summary[v] = {
            "label": VARIANTS[v],
            "seconds_warm_median": statistics.median(r["seconds_warm"] for r in rs),
            "seconds_cold_median": statistics.median(r["seconds_cold"] for r in rs),
            "seconds_warm_all": [r["seconds_warm"] for r in rs],
            "seconds_cold_all": [r["seconds_cold"] for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "above_imports_mib": max(r["above_imports_mib"] for r in rs),
            "n_values": len(rs[0]["result"]),
        }
    res = {v: rs[0]["result"] for v, rs in runs.items()}
    agreement = {
        "lora_keys_equal": set(res["lora_merge"]) == set(res["lora_factors"]),
        "lora_max_rel_diff": _max_rel_diff(res["lora_factors"], res["lora_merge"]),
        "full_keys_equal": set(res["full_naive"]) == set(res["full_stream"]),
        "full_max_rel_diff": _max_rel_diff(res["full_stream"], res["full_naive"]),
    }
    s = summary

    def ratio(slow: str, fast: str, field: str, floor: float = 0.0) -> float:
        return s[slow][field] / max(s[fast][field], floor) if max(s[fast][field], floor) > 0 else math.inf

    ratios = {
        "lora_speedup_warm": ratio("lora_merge", "lora_factors", "seconds_warm_median"),
        "lora_speedup_cold": ratio("lora_merge", "lora_factors", "seconds_cold_median"),
        "lora_memory_ratio_above_imports": ratio("lora_merge", "lora_factors", "above_imports_mib", 1.0),
        "full_speedup_warm": ratio("full_naive", "full_stream", "seconds_warm_median"),
        "full_speedup_cold": ratio("full_naive", "full_stream", "seconds_cold_median"),
        "full_memory_ratio_above_imports": ratio("full_naive", "full_stream", "above_imports_mib", 1.0),
    }
    report = {
        "model": args.model,
        "inputs": {**info, "lora_rank": args.rank, "lora_targets": LORA_TARGETS},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "repeats": args.repeats,
        "variants": summary,
        "ratios": ratios,
        "agreement": agreement,
        "lora_target_20x_met": ratios["lora_speedup_warm"] >= 20,
    }

    print(
        f"\nWeight deltas on {args.model} ({info['n_layers']} layers, d={info['d_model']}, "
        f"{info['n_params'] / 1e6:.1f} M params), median of {args.repeats} fresh processes, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| variant | warm time (s) | cold time (s) | peak RSS (MiB) | above imports (MiB) | values |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in summary.values():
        print(
            f"| {r['label']} | {r['seconds_warm_median']:.3f} | {r['seconds_cold_median']:.3f} | "
            f"{r['peak_rss_mib']:.0f} | {r['above_imports_mib']:.0f} | {r['n_values']} |"
        )
    print()
    print("| comparison | time ratio warm | time ratio cold | memory ratio (above imports) | max rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for name, key in (("LoRA: merge / factors", "lora"), ("full: naive / streamed", "full")):
        print(
            f"| {name} | {ratios[key + '_speedup_warm']:.1f}x | {ratios[key + '_speedup_cold']:.1f}x | "
            f"{ratios[key + '_memory_ratio_above_imports']:.1f}x | {agreement[key + '_max_rel_diff']:.1e} |"
        )
    if not (agreement["lora_keys_equal"] and agreement["full_keys_equal"]):
        print("WARNING: the variants did not compute the same set of values", file=sys.stderr)
    for key in ("lora", "full"):
        if not agreement[f"{key}_max_rel_diff"] <= 1e-5:
            print(f"WARNING: the {key} variants disagree beyond 1e-5 relative", file=sys.stderr)

    from refusal_probe.core.io import write_json

    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
