"""Where weights come from: a hub id, a local directory, a .gguf file or an embedded name -> a local HF directory.

One code path for every source: whatever the spec, it resolves to a plain directory (config + safetensors + tokenizer,
or a PEFT adapter) and is loaded the same way. Routing is by what is on disk, never by the model's name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from refusal_probe.core.devices import check_device
from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import sha256_file
from refusal_probe.core.io import cache_root, read_json
from refusal_probe.models import embedded
from refusal_probe.models.handle import ModelHandle
from refusal_probe.models.quant import QuantSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    )


def looks_local(spec: str) -> bool:
    """A spec a user meant as a path: starts with '.', '/' or '~', or its first component exists here.

    Such a spec is never sent to the hub, so a typo reads "no such folder", not a network error.
    """
    text = str(spec)
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text):
        return True
    first = Path(text).parts[0] if Path(text).parts else ""
    return bool(first) and Path(first).exists()


def resolve_relative(spec: str, folder: Path) -> str:
    """A path recorded in a file (run.json, adapter_config.json) read relative to that file's folder."""
    text = str(spec)
    if text in embedded.EMBEDDED or os.path.isabs(text) or text.startswith("~"):
        return text
    candidate = folder / text
    if text.startswith(".") or candidate.exists():
        return str(candidate.resolve())
    return text  # a hub id


def pickle_only(path: Path) -> bool:
    """Weights only as pickle files (pytorch_model.bin, *.pt, *.pth, *.ckpt), no safetensors."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return False
    return any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in path.iterdir() if p.is_file())


PICKLE_ADVICE = (
    "refusal-probe never unpickles weights (a pickle can run code); convert once with "
    "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir_out, safe_serialization=True)"
)


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """A local directory holding the model (full weights or adapter) that ``spec`` names."""
    text = str(spec)
    if text in embedded.EMBEDDED:
        return embedded.fetch(text)
    path = Path(text).expanduser()
    if not path.exists() and looks_local(text):
        raise UserError(f"{text}: no such file or folder")
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _gguf_dir(path)
            raise UserError(f"{path}: a model is a directory, a .gguf file, an embedded name or a hub id")
        if is_model_dir(path) or is_adapter_dir(path):
            check_config(path)
            return path
        if pickle_only(path):
            raise UserError(f"{path}: only pickle weights (*.bin/*.pt); {PICKLE_ADVICE}")
        raise UserError(f"{path}: no model here (no config.json with *.safetensors, no {ADAPTER_CONFIG})")
    if HUB_ID.match(text):
        return _hub_dir(text)
    raise UserError(
        f"'{text}' is not an existing path, a .gguf file, an embedded model ({', '.join(embedded.EMBEDDED)}) "
        "or a Hugging Face hub id (org/name)"
    )


def _gguf_dir(path: Path) -> Path:
    digest = sha256_file(path)
    out = cache_root() / "models" / f"gguf-{path.stem}-{digest[:12]}"
    if not (out / embedded.SOURCE_FILE).is_file():
        embedded.convert_gguf(path, out, {"sha256": digest})
    return out


def _hub_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, gated, missing: all need the same advice
        reason = _first_line(exc).split(". ")[0]  # the hub's first sentence, never cut mid-word
        raise UserError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub ({reason}); download it where the hub is reachable "
            f"and pass the local folder (or .gguf file) instead, with --base DIR where it is a tree's base"
        ) from None


def check_config(path: Path) -> None:
    """config.json of a model folder must be a JSON object: name the file, not a loader's stack."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return
    try:
        raw = read_json(cfg)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{cfg}: not valid JSON ({_first_line(exc)}); restore it from the training run"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"{cfg}: expected a JSON object; restore it from the training run")


def model_revision(spec: str) -> str | None:
    """A content identity for the model behind ``spec``: embedded sha256, hub commit, or None."""
    if spec in embedded.EMBEDDED:
        return embedded.revision(spec)
    d = resolve_model_dir(spec)
    m = re.search(r"snapshots/([0-9a-f]{40})", str(d))
    if m:
        return f"hub:{m.group(1)}"
    if (d / embedded.SOURCE_FILE).is_file():
        return "sha256:" + str(read_json(d / embedded.SOURCE_FILE).get("sha256"))
    return None


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json as a dict; a missing or damaged file is a one-line user error."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {ADAPTER_CONFIG}; is this a PEFT adapter directory?")
    try:
        cfg = read_json(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model spec an adapter names, mapped to an embedded name when its recorded path is one of ours."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        return None
    if not Path(base).expanduser().exists() and Path(base).name in embedded.EMBEDDED:
        return Path(base).name  # trained on another machine against the same embedded model
    return resolve_relative(base, adapter_dir)


def load_tokenizer(path: Path, fallback: Path | None = None):
    from transformers import AutoTokenizer

    src = path if (path / "tokenizer_config.json").is_file() or fallback is None else fallback
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{src}: no usable tokenizer ({_first_line(exc)}); pass --base MODEL to take the base's"
        ) from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str | os.PathLike,
    *,
    base: str | None = None,
    dtype: Any = None,
    device: str = "cpu",
    quant: QuantSpec | None = None,
):
    """The handle of full weights or a PEFT adapter over its base (unpacks as ``model, tokenizer``); eval mode,
    left-padding tokenizer, NaN-free weights."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    check_device(device)
    path = resolve_model_dir(spec)
    if is_adapter_dir(path):
        base_spec = base or adapter_base(path)
        if not base_spec:
            raise UserError(f"{path}: adapter names no base model; pass --base MODEL")
        base_dir = resolve_model_dir(base_spec)
        if is_adapter_dir(base_dir):
            raise UserError(
                f"{base_dir}: the base of adapter {path} is itself an adapter; pass --base with full weights"
            )
        model = _from_pretrained(AutoModelForCausalLM, base_dir, dtype, device, quant)
        from peft import PeftModel
        from safetensors import SafetensorError

        verify_safetensors(path)
        try:
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        except (RuntimeError, ValueError, KeyError, SafetensorError) as exc:
            raise UserError(
                f"{path}: adapter does not fit base {base_spec} ({_first_line(exc)}); pass the right --base"
            ) from None
        tokenizer = load_tokenizer(path, fallback=base_dir)
    else:
        model = _from_pretrained(AutoModelForCausalLM, path, dtype, device, quant)
        tokenizer = load_tokenizer(path, fallback=resolve_model_dir(base) if base else None)
    check_finite(model, path)
    model.eval()
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelHandle(model, tokenizer, path, quant)


def verify_safetensors(path: Path) -> None:
    """Open every safetensors header (cheap, no tensor data) so a truncated file is named before loading."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(
                f"{file}: truncated or corrupt safetensors file ({_first_line(exc)}); copy or save it again"
            ) from None


def check_loading_info(path: Path, info: dict) -> None:
    """Refuse weights that do not fill the model: transformers would initialise the missing ones at random and every
    number measured on them would look plausible and be wrong."""
    for what, keys in (
        ("missing from", "missing_keys"),
        ("not expected in", "unexpected_keys"),
        ("of the wrong shape in", "mismatched_keys"),
    ):
        found = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(keys) or ())
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise UserError(
                f"{path}: tensor {found[0]}{more} {what} the weights; the checkpoint is incomplete or "
                "damaged: copy or save it again"
            )


def check_finite(model, path: Path) -> None:
    """Refuse weights holding NaN or inf (a diverged run): every number measured on them would be meaningless."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise UserError(
                f"{path}: weight {name} holds NaN or inf values (training diverged?); "
                "remove this checkpoint from the tree or retrain it"
            )


def _from_pretrained(cls, path: Path, dtype, device: str, quant: QuantSpec | None):
    verify_safetensors(path)
    check_config(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant.bnb_config(device)
        kwargs["device_map"] = device
    from safetensors import SafetensorError

    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(
            f"{path}: cannot load weights ({_first_line(exc)}); check the files are complete"
        ) from None
    check_loading_info(path, info)
    if quant is None:
        model.to(device)
    elif not device.startswith("cuda"):
        # bitsandbytes on CPU dequantizes every 4-bit weight on every forward, which makes generation crawl.
        # Dequantizing once gives the very weights its float32-compute kernel multiplies by (the
        # outputs are identical: tests/test_models.py), at float32 speed; on CUDA the 4-bit memory saving stays.
        model = model.dequantize()
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
