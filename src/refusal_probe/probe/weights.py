"""Where the weights moved: per layer and module deltas of a checkpoint against its base, streamed from disk.

Full checkpoints are compared tensor by tensor through ``safetensors.safe_open`` (read-only; one handle per read,
big tensors in row chunks, float64 work in reused buffers), so RSS stays at a few tensors however large the model
is and two models are never loaded. LoRA/QLoRA adapters are measured from their factors (``scale * B @ A`` via
r x r Gram matrices in :mod:`refusal_probe.probe.measures`), never merged; the base norms they need are cached per
base file. Both run torch on one thread (see :func:`_single_threaded`).

Rows are ``{"layer": int, "module": str, "metric": str, "value": float}``:

- ``delta_fro`` = ||W_ckpt - W_base||_F, ``base_fro`` = ||W_base||_F, ``rel_delta`` = delta_fro / base_fro;
- for modules that write into the residual stream (:data:`RESIDUAL_WRITERS`) and a layer present in
  ``directions``: ``delta_along_refusal`` = ||r_hat^T dW||_2 with r_hat = unit(directions[layer]) (what the update
  can add along the refusal direction, per unit of input) and ``delta_along_refusal_rel`` = that / delta_fro.
  An update with no preferred direction gives a rel of about 1/sqrt(d_model); larger means the update aims at r_hat.

Which tensors: 2-D ``weight``s of the transformer blocks (``...layers.<i>.<module>.weight``, also GPT-2's
``h.<i>``), keyed by block index ``i`` and the module path inside the block (``self_attn.o_proj``). Norms and
biases are skipped. Token embeddings and the LM head (``embed_tokens``, ``lm_head``, ``wte``, ...) are reported as
layer -1 rows with their own module names, without ``delta_along_*`` (they are not block outputs); a tied LM
head that is not saved separately has no row of its own. Modules an adapter targets outside the blocks are layer
-1 rows named by their full path. Vision/audio
towers of multimodal models are skipped. ``directions`` is keyed by the same block index: the caller decides which
residual direction applies to block ``i``'s writes (the base model's chosen direction for every layer, or one each).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from refusal_probe.core.errors import UserError
from refusal_probe.models.handle import RESIDUAL_WRITERS
from refusal_probe.probe import measures as pm

# Architectures whose linear weights are stored [d_in, d_out] (transformers' Conv1D), so d_model is axis 1.
CONV1D_MODEL_TYPES: frozenset[str] = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Embedding / unembedding tensors reported as layer -1 rows.
EMBEDDING_MODULES: frozenset[str] = frozenset(
    {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"}
)
SKIPPED_TOWERS = ("vision", "visual", "audio", "mm_projector", "multi_modal_projector")
METRICS = ("delta_fro", "base_fro", "rel_delta", "delta_along_refusal", "delta_along_refusal_rel")

_BLOCK_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)(?:layers|h|blocks)\.(?P<layer>\d+)\.(?P<module>.+)\.weight$")
# Rows of a tensor read at once; big tensors (embeddings, 7B MLPs) are read in slices of this many elements.
STREAM_ELEMENTS = 1 << 22
ADAPTER_PREFIX = "base_model.model."
# adapter_config.json fields naming LoRA variants whose update is not scale * B @ A (or not on weights we stream).
UNSUPPORTED_ADAPTER_FIELDS = {
    "use_dora": "DoRA",
    "use_qalora": "QALoRA",
    "arrow_config": "Arrow",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "aLoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "mica": "MiCA",
    "kasa_config": "KaSA",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


def locate(key: str) -> tuple[int, str] | None:
    """``(layer, module)`` for a tensor name we analyse, or None: block weights, and embeddings as layer -1."""
    if not key.endswith(".weight") or any(t in key for t in SKIPPED_TOWERS):
        return None
    m = _BLOCK_KEY.match(key)
    if m:
        return int(m["layer"]), m["module"]
    module = key[: -len(".weight")].rsplit(".", 1)[-1]
    if module in EMBEDDING_MODULES:
        return -1, module
    return None


# ---------------------------------------------------------------------------------------------- reading weights


def _model_type(model_dir: Path) -> str | None:
    cfg = model_dir / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError):
        return None


def _tied_embeddings(model_dir: Path) -> bool:
    cfg = model_dir / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    except (OSError, ValueError):
        return False
    return bool(
        data.get("tie_word_embeddings", data.get("text_config", {}).get("tie_word_embeddings", False))
    )


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file for a HF model directory (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model directory")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"{index}: not a valid safetensors index ({exc}); re-save the checkpoint"
            ) from exc
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise UserError(f"{index} names shard {path.name}, which is missing; re-save the checkpoint")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        with _open(single) as handle:
            return dict.fromkeys(handle.keys(), single)
    if (model_dir / "adapter_config.json").is_file():
        raise UserError(f"{model_dir} is a LoRA adapter, not full weights; measure it with adapter_deltas")
    if any(model_dir.glob("*.gguf")):
        raise UserError(
            f"{model_dir} holds a .gguf file; convert it to safetensors first (resolve_model_dir does)"
        )
    if any(model_dir.glob("pytorch_model*.bin")):
        raise UserError(
            f"{model_dir} has only pytorch_model*.bin; re-save it with save_pretrained() as safetensors"
        )
    raise UserError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json; is this a model directory?"
    )


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: truncated, corrupt, unreadable
        raise UserError(
            f"{path}: not a readable safetensors file ({exc}); the file is truncated or corrupt"
        ) from exc


class _Reader:
    """Read-only access to the tensors of one model directory (or adapter file), one tensor or row chunk at a time.

    safe_open maps the whole file and every page a read touches stays resident while the handle is open (measured:
    +78 MiB RSS after reading a 74 MiB file through one handle, +2 MiB when reopening per tensor). So each read
    opens its own handle and drops it with the tensor: RSS stays at the tensors in use, not the model size.
    """

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def _load_meta(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._meta:
            path = self.files[name]
            with _open(path) as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    self._meta[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            if name not in self._meta:
                raise UserError(
                    f"{path}: tensor {name} is listed in the index but not in the file; re-save it"
                )
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._load_meta(name)[0]

    def dtype(self, name: str) -> str:
        return self._load_meta(name)[1]

    def _corrupt(self, name: str, exc: Exception) -> UserError:
        return UserError(f"{self.files[name]}: cannot read tensor {name} ({exc}); the file is corrupt")

    def tensor(self, name: str) -> Tensor:
        with _open(self.files[name]) as handle:
            try:
                return handle.get_tensor(name)
            except Exception as exc:
                raise self._corrupt(name, exc) from exc

    def row_chunks(self, name: str) -> Iterator[tuple[int, Tensor]]:
        """``(first_row, rows)`` slices of at most STREAM_ELEMENTS elements (one slice for small tensors)."""
        shape = self.shape(name)
        per_row = max(1, math.prod(shape[1:]))
        step = max(1, STREAM_ELEMENTS // per_row)
        for start in range(0, shape[0], step):
            if start == 0 and shape[0] <= step:
                chunk = self.tensor(name)
            else:
                with _open(self.files[name]) as handle:
                    try:
                        chunk = handle.get_slice(name)[start : start + step]
                    except Exception as exc:
                        raise self._corrupt(name, exc) from exc
            yield start, chunk
            del chunk


def _check_float(reader: _Reader, name: str) -> None:
    dt = reader.dtype(name).upper()
    if not (dt.startswith("F") or dt.startswith("BF")):
        raise UserError(
            f"{reader.files[name]}: tensor {name} is stored as {dt} (quantized); weight deltas need float weights"
        )


# ------------------------------------------------------------------------------------------------ accumulation


def _direction(directions: dict[int, Tensor] | None, layer: int, module: str, d_model: int) -> Tensor | None:
    if directions is None or layer < 0 or module not in RESIDUAL_WRITERS or layer not in directions:
        return None
    d = torch.as_tensor(directions[layer]).detach().cpu().reshape(-1)
    if d.shape[0] != d_model:
        raise UserError(
            f"refusal direction for layer {layer} has {d.shape[0]} entries but {module} writes {d_model}; "
            "the directions come from another model"
        )
    return pm.unit(d)


def _rows(layer: int, module: str, delta_sq: float, base_sq: float, along: float | None) -> list[dict]:
    delta_fro, base_fro = math.sqrt(delta_sq), math.sqrt(base_sq)
    values = {
        "delta_fro": delta_fro,
        "base_fro": base_fro,
        "rel_delta": delta_fro / base_fro if base_fro > 0 else math.nan,
    }
    if along is not None:
        values["delta_along_refusal"] = along
        values["delta_along_refusal_rel"] = along / delta_fro if delta_fro > 0 else math.nan
    return [{"layer": layer, "module": module, "metric": k, "value": float(v)} for k, v in values.items()]


# ||W_base||_F^2 per (file, size, mtime, tensor): every adapter of a run shares its base, so analysing a run's
# checkpoints reads the targeted base tensors once, not once per checkpoint.
_BASE_SQ_CACHE: dict[tuple[str, int, int, str], float] = {}


def _base_sum_sq(reader: _Reader, name: str, buf: pm.Float64Buffer) -> float:
    path = reader.files[name]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, name)
    if key not in _BASE_SQ_CACHE:
        _BASE_SQ_CACHE[key] = sum(pm.sum_of_squares(c, buf) for _, c in reader.row_chunks(name))
    return _BASE_SQ_CACHE[key]


def _dense_delta(
    base: Iterator[tuple[int, Tensor]],
    ckpt: Iterator[tuple[int, Tensor]],
    r_hat: Tensor | None,
    out_axis: int,
) -> tuple[float, float, float | None]:
    """Stream row chunks of base and checkpoint through measures.StreamedDelta: (||dW||^2, ||W||^2, along)."""
    acc = pm.StreamedDelta(r_hat, out_axis)
    for (start, b), (_, c) in zip(base, ckpt, strict=True):
        acc.add(start, b, c)
    return acc.delta_sq, acc.base_sq, acc.along


def _sort(rows: list[dict]) -> list[dict]:
    order = {m: i for i, m in enumerate(METRICS)}
    return sorted(rows, key=lambda r: (r["layer"], r["module"], order.get(r["metric"], len(order))))


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch ops on one thread, restored on exit. Everything here is small (r x r Gram matrices) or bound by
    memory bandwidth (copy, subtract, dot over one tensor), so intra-op threads add only hand-offs, and on a loaded
    machine (several jobs on 2 cores) each hand-off waits for a descheduled thread. Measured there: LoRA factors for
    16 modules 1.6 s with 2 threads vs 0.013 s with 1; streamed deltas of a 19M-parameter model 2.8 s vs 0.09 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------ full weights


def full_deltas(
    base_dir: Path, ckpt_dir: Path, directions: dict[int, Tensor] | None = None, *, progress: bool = True
) -> list[dict]:
    """Per layer/module deltas of a full-weight checkpoint against its base, streamed (see module docstring).

    Raises UserError when the checkpoint does not match the base (missing tensor, other shape) or a file is
    unreadable. Both directories are only read.
    """
    base_dir, ckpt_dir = Path(base_dir), Path(ckpt_dir)
    base_files, ckpt_files = weight_files(base_dir), weight_files(ckpt_dir)
    tied = _tied_embeddings(ckpt_dir) or _tied_embeddings(base_dir)
    out_axis = 1 if _model_type(base_dir) in CONV1D_MODEL_TYPES else 0
    wanted = {k: loc for k in base_files if (loc := locate(k)) is not None}
    for k in ckpt_files:
        if k not in base_files and locate(k) is not None and not (tied and k.endswith("lm_head.weight")):
            raise UserError(
                f"checkpoint {ckpt_dir} does not match base {base_dir}: tensor {k} is not in the base; pass the right --base"
            )
    rows: list[dict] = []
    base, ckpt = _Reader(base_files), _Reader(ckpt_files)
    with _single_threaded():
        for key in _progress(sorted(wanted), f"weight deltas {ckpt_dir.name}", progress):
            layer, module = wanted[key]
            if key not in ckpt_files:
                if tied and key.endswith("lm_head.weight"):
                    continue  # tied to the embeddings, which are compared under their own name
                raise UserError(
                    f"checkpoint {ckpt_dir}: tensor {key} is missing (a damaged checkpoint, or one not "
                    f"fine-tuned from {base_dir}: save it again or pass the right --base)"
                )
            bshape, cshape = base.shape(key), ckpt.shape(key)
            if len(bshape) != 2:
                continue
            if bshape != cshape:
                raise UserError(
                    f"checkpoint {ckpt_dir} does not match base {base_dir}: tensor {key} has shape {list(cshape)} vs "
                    f"{list(bshape)}; pass the right --base"
                )
            _check_float(base, key)
            _check_float(ckpt, key)
            r_hat = _direction(directions, layer, module, bshape[out_axis])
            dsq, bsq, along = _dense_delta(base.row_chunks(key), ckpt.row_chunks(key), r_hat, out_axis)
            rows += _rows(layer, module, dsq, bsq, along)
    return _sort(rows)


# ------------------------------------------------------------------------------------------------ LoRA adapters


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first key matching a suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return patterns[key]
    return default


def _adapter_config(adapter_dir: Path) -> dict:
    from refusal_probe.models.source import ADAPTER_CONFIG, read_adapter_config

    cfg = read_adapter_config(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise UserError(
            f"{path}: peft_type {cfg.get('peft_type')!r} is unsupported; only LoRA/QLoRA adapters are"
        )
    for field, name in UNSUPPORTED_ADAPTER_FIELDS.items():
        if cfg.get(field):
            raise UserError(
                f"{path}: {name} adapters ({field}) are unsupported; only plain LoRA/QLoRA adapters are"
            )
    return cfg


def _parse_adapter_keys(keys: list[str], path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split adapter tensor names into LoRA factors {module path: {A|B|embedding_A|embedding_B: key}} and
    dense modules_to_save weights {base key: adapter key}."""
    lora: dict[str, dict[str, str]] = {}
    dense: dict[str, str] = {}
    for key in keys:
        if "lora_magnitude_vector" in key:
            raise UserError(
                f"{path}: DoRA adapters (lora_magnitude_vector) are unsupported; only plain LoRA is"
            )
        name = key[len(ADAPTER_PREFIX) :] if key.startswith(ADAPTER_PREFIX) else key
        if ".lora_" in name:
            module, rest = name.split(".lora_", 1)
            kind, *tail = rest.split(".")
            if tail and tail[-1] == "bias":
                continue  # lora_bias: a bias update, not a weight delta
            if kind not in ("A", "B", "embedding_A", "embedding_B"):
                raise UserError(f"{path}: tensor {key} is not a LoRA A/B factor; unsupported adapter layout")
            lora.setdefault(module, {})[kind] = key
        elif name.endswith(".weight"):
            dense[name] = key  # modules_to_save: a full trained copy of the module
    return lora, dense


def adapter_deltas(
    adapter_dir: Path, base_dir: Path, directions: dict[int, Tensor] | None = None, *, progress: bool = True
) -> list[dict]:
    """Per layer/module deltas of a LoRA/QLoRA adapter against its base, from the factors (never merged).

    ``scale = lora_alpha / r`` (``/ sqrt(r)`` with use_rslora), honouring rank_pattern and alpha_pattern.
    ``base_fro`` streams only the targeted base tensors. modules_to_save tensors are compared densely.
    Modules outside the transformer blocks that are not embeddings are reported as layer -1 with their full path.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    cfg = _adapter_config(adapter_dir)
    adapter_file = adapter_dir / "adapter_model.safetensors"
    if not adapter_file.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(
                f"{adapter_dir}: only adapter_model.bin; re-save the adapter with safe_serialization=True"
            )
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors")
    with _open(adapter_file) as handle:
        adapter_keys = list(handle.keys())
        lora, dense = _parse_adapter_keys(adapter_keys, adapter_file)
        # the factors are small (r x (in + out) each): read them through one handle, not one open per tensor
        try:
            factor_tensors = {k: handle.get_tensor(k) for f in lora.values() for k in f.values()}
        except Exception as exc:
            raise UserError(
                f"{adapter_file}: cannot read the LoRA factors ({exc}); the file is corrupt"
            ) from exc
    base_files = weight_files(base_dir)
    out_axis = 1 if _model_type(base_dir) in CONV1D_MODEL_TYPES else 0
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def mismatch(base_key: str, what: str) -> UserError:
        return UserError(
            f"adapter {adapter_dir} does not match base {base_dir}: tensor {base_key} {what}; pass the right --base"
        )

    rows: list[dict] = []
    buffer = pm.Float64Buffer()
    with _single_threaded():
        base = _Reader(base_files)
        adapter = _Reader(dict.fromkeys(adapter_keys, adapter_file))
        for module_path in _progress(sorted(lora), f"adapter deltas {adapter_dir.name}", progress):
            factors = lora[module_path]
            embedding = "embedding_A" in factors or "embedding_B" in factors
            ka, kb = ("embedding_A", "embedding_B") if embedding else ("A", "B")
            if ka not in factors or kb not in factors:
                raise UserError(f"{adapter_file}: module {module_path} has only one of lora_{ka}/lora_{kb}")
            A, B = factor_tensors[factors[ka]], factor_tensors[factors[kb]]
            base_key = module_path + ".weight"
            if base_key not in base_files:
                raise mismatch(base_key, "is not in the base")
            r = int(_pattern_value(rank_pattern, module_path, r_default))
            alpha = float(_pattern_value(alpha_pattern, module_path, alpha_default))
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
                raise UserError(
                    f"{adapter_file}: {module_path} has factors A {list(A.shape)}, B {list(B.shape)} but "
                    f"adapter_config.json says rank {r}"
                )
            d_out, d_in = B.shape[0], A.shape[1]
            bshape = base.shape(base_key)
            # nn.Linear stores [out, in]; Conv1D (fan_in_fan_out) and embeddings (delta = (B@A)^T) store [in, out]
            expected = (d_in, d_out) if (embedding or fan_in_fan_out) else (d_out, d_in)
            if bshape != expected:
                raise mismatch(base_key, f"has shape {list(bshape)} vs {list(expected)} from the adapter")
            _check_float(base, base_key)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            loc = locate(base_key) or (-1, module_path)
            r_hat = None if embedding else _direction(directions, loc[0], loc[1], d_out)
            base_sq = _base_sum_sq(base, base_key, buffer)
            delta_fro = pm.lora_delta_frobenius(A, B, scale)
            along = None if r_hat is None else pm.lora_delta_along(A, B, scale, r_hat)
            rows += _rows(loc[0], loc[1], delta_fro**2, base_sq, along)
        for base_key in sorted(dense):
            akey = dense[base_key]
            if base_key not in base_files:
                raise mismatch(base_key, "(modules_to_save) is not in the base")
            bshape, ashape = base.shape(base_key), adapter.shape(akey)
            if len(bshape) != 2:
                continue
            if bshape != ashape:
                raise mismatch(base_key, f"has shape {list(ashape)} in the adapter vs {list(bshape)}")
            _check_float(base, base_key)
            loc = locate(base_key) or (-1, base_key[: -len(".weight")])
            r_hat = _direction(directions, loc[0], loc[1], bshape[out_axis])
            dsq, bsq, along = _dense_delta(
                base.row_chunks(base_key), adapter.row_chunks(akey), r_hat, out_axis
            )
            rows += _rows(loc[0], loc[1], dsq, bsq, along)
    return _sort(rows)


def weight_deltas(
    ckpt_dir: Path, base_dir: Path, directions: dict[int, Tensor] | None = None, *, progress: bool = True
) -> list[dict]:
    """Deltas of any checkpoint folder: an adapter (adapter_config.json) from its factors, else full weights."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "adapter_config.json").is_file():
        return adapter_deltas(ckpt_dir, base_dir, directions, progress=progress)
    return full_deltas(base_dir, ckpt_dir, directions, progress=progress)
