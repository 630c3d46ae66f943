"""`refusal-probe analyze`: walk a checkpoint tree, measure every checkpoint's internals against its base, and write
tables, plots and a report.

Every input (the tree, prompt files, the behaviour table, the output folder) is checked before any model loads.
Work is cached per checkpoint under ``<out>/cache/``, keyed by a fingerprint of the checkpoint's files, its base's
reference and the settings, so a re-run recomputes only what changed, an interrupted run resumes, and ``--shard i/n``
lets several machines fill the cache for one final plain run to assemble. Checkpoints are only ever read.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from refusal_probe.analysis.assemble import assemble, ref_key
from refusal_probe.analysis.base_reference import BaseReference, base_reference
from refusal_probe.analysis.behaviour import align_behaviour, load_behaviour
from refusal_probe.analysis.cache import entry_path, read_entry, write_entry
from refusal_probe.analysis.measure import checkpoint_rows
from refusal_probe.analysis.per_prompt import current, find_eval_prompts
from refusal_probe.analysis.per_prompt import note as prompts_note
from refusal_probe.analysis.settings import AnalyzeSettings
from refusal_probe.core.errors import UserError
from refusal_probe.core.io import output_lock, prepare_output
from refusal_probe.core.shard import parse_shard, take_shard
from refusal_probe.models.tree import default_output, discover
from refusal_probe.probe.prompts import PromptSets, prompt_sets


def analysis_prompts(settings: AnalyzeSettings) -> PromptSets:
    """The prompt sets of these settings (the same draw `directions` makes with --n-train = --n-prompts)."""
    return prompt_sets(
        settings.n_prompts, settings.n_val, settings.seed, settings.harmful, settings.harmless, "--n-prompts"
    )


def analyze(
    spec: str,
    out: str | Path | None = None,
    base: str | None = None,
    settings: AnalyzeSettings | None = None,
    shard: str | None = None,
    behaviour: str | Path | None = None,
) -> Path:
    """Analyse the tree ``spec`` (the user's raw string: "./x" stays local-looking) into ``out``."""
    settings = (settings or AnalyzeSettings()).check()
    spec = str(spec)
    shard_ij = parse_shard(shard)
    tree = discover(spec, base)
    for line in tree.messages():
        print(line, file=sys.stderr)
    # every input file is read before any model loads
    sets = analysis_prompts(settings)
    beh, beh_path = load_behaviour(spec, behaviour)
    beh, notes = align_behaviour(beh, tree)
    found = find_eval_prompts(tree, beh_path) if settings.prompt_internals else {}
    if settings.prompt_internals and (said := prompts_note(found, tree, beh_path)):
        notes.append(said)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    out = Path(out) if out else default_output(spec, "analysis")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; pass --out DIR")
    tree.check_output(out)
    prepare_output(out)
    if shard_ij:  # the tasks of an array job fill one cache side by side, each entry written whole
        return _run(spec, out, tree, settings, sets, shard, shard_ij, beh, beh_path, notes, found)
    with output_lock(out, "analyze"):
        return _run(spec, out, tree, settings, sets, shard, shard_ij, beh, beh_path, notes, found)


def _run(spec, out: Path, tree, settings, sets, shard, shard_ij, beh, beh_path, notes, found) -> Path:
    from tqdm.auto import tqdm

    cache = out / "cache"
    started = time.time()
    refs: dict[tuple[str | None, str], BaseReference] = {}
    for c in tree:
        if c.kind == "base" and ref_key(c) not in refs:
            refs[ref_key(c)] = base_reference(
                c.base or str(c.path), c.path, settings, sets, cache, quant=c.quant, prompts=found.get(c.key)
            )
            if c.key not in found:  # no eval prompts now: rows cached from an earlier eval are not current
                refs[ref_key(c)].prompts = None

    todo = take_shard([c for c in tree if c.kind != "base"], shard_ij)
    entries: dict[str, dict] = {}
    computed = 0
    bar = tqdm(todo, desc="checkpoints", unit="ckpt", disable=not settings.progress)
    for c in bar:
        bar.set_postfix_str(c.key)
        path = entry_path(cache, c, refs[ref_key(c)].key, settings)
        entry = read_entry(path)
        prompts = found.get(c.key)
        if entry is None or not current(entry.get("prompts"), prompts):  # a re-run eval: its prompts changed
            entry = write_entry(path, c, checkpoint_rows(c, refs[ref_key(c)], settings, sets, prompts))
            computed += 1
        if prompts is None:
            entry.pop("prompts", None)
        entries[c.key] = entry
    if shard_ij:
        print(
            f"shard {shard}: {computed} checkpoint(s) computed, {len(todo) - computed} cached; "
            "then run this same command without --shard to assemble the tables"
        )
        return out
    print(
        f"{computed} checkpoint(s) computed, {len(todo) - computed} taken from the cache ({cache})",
        file=sys.stderr,
    )
    written = assemble(
        spec, out, tree, refs, entries, settings, sets, beh, beh_path, notes, time.time() - started
    )
    if warning := tree.skipped_warning():
        print(warning, file=sys.stderr)
    return written
