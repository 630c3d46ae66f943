from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from refusal_probe.analysis.tables import (
    TIDY_COLUMNS,
    checkpoint_table,
    refusal_layer_by_run,
    write_table,
)
from refusal_probe.core.errors import UserError


def _key(run, step, frac, method="full", lr=5e-5, name=None):
    name = name or ("base" if step == 0 else f"checkpoint-{step}")
    return {"run": run, "checkpoint": name, "method": method, "lr": lr, "step": step, "fraction": frac}


def _drift():
    rows = []
    # run "a": base + step 10; layers 0..2; cos falls with layer at step 10
    for step, frac, cos, gap in ((0, 0.0, (1.0, 1.0, 1.0), 3.0), (10, 1.0, (0.9, 0.6, 0.3), 2.0)):
        for layer, c in enumerate(cos):
            rows.append(
                {**_key("a", step, frac), "layer": layer, "module": "", "metric": "cos_to_base", "value": c}
            )
            g = gap if layer == 1 else -99.0
            rows.append(
                {**_key("a", step, frac), "layer": layer, "module": "", "metric": "proj_gap", "value": g}
            )
    return pd.DataFrame(rows)


def _deltas():
    rows = []
    for layer, module, fro, along in (
        (0, "self_attn.o_proj", 3.0, 1.0),
        (1, "mlp.down_proj", 4.0, 2.0),
        (1, "self_attn.q_proj", 12.0, None),
        (-1, "embed_tokens", 100.0, None),  # not a transformer block: left out of the totals
    ):
        k = {**_key("a", 10, 1.0), "layer": layer, "module": module}
        rows.append({**k, "metric": "delta_fro", "value": fro})
        if along is not None:
            rows.append({**k, "metric": "delta_along_refusal", "value": along})
    return pd.DataFrame(rows)


def _behaviour():
    return pd.DataFrame(
        [
            {**_key("a", 0, 0.0), "metric": "refusal_rate", "value": 0.8, "signature": "kw"},
            {**_key("a", 10, 1.0), "metric": "refusal_rate", "value": 0.5, "signature": "kw"},
            {**_key("a", 10, 1.0), "metric": "chrf", "value": 51.5, "signature": "chrF2"},
        ]
    )


def test_checkpoint_table_hand_values():
    t = checkpoint_table(_drift(), _deltas(), _behaviour(), refusal_layer=1)
    assert list(t.columns[:6]) == ["run", "checkpoint", "method", "lr", "step", "fraction"]
    assert t["step"].tolist() == [0, 10]
    base, ckpt = t.iloc[0], t.iloc[1]
    assert ckpt["cos_to_base_at_rl"] == pytest.approx(0.6)
    assert ckpt["proj_gap_at_rl"] == pytest.approx(2.0)
    assert base["proj_gap_at_rl"] == pytest.approx(3.0)
    assert ckpt["mean_cos_to_base"] == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert ckpt["delta_fro_total"] == pytest.approx(13.0)  # sqrt(3^2 + 4^2 + 12^2); embed row excluded
    assert ckpt["delta_along_refusal_total"] == pytest.approx(math.sqrt(5.0))
    assert base["delta_fro_total"] == 0.0  # the base against itself
    assert base["refusal_rate"] == 0.8 and ckpt["refusal_rate"] == 0.5
    assert ckpt["chrf"] == 51.5 and np.isnan(base["chrf"])
    assert ckpt["refusal_layer"] == 1


def test_checkpoint_table_per_run_layers_and_missing_inputs():
    drift = _drift()
    other = drift.assign(run="b", method="lora")
    both = pd.concat([drift, other], ignore_index=True)
    t = checkpoint_table(both, None, None, refusal_layer={"a": 0, "b": 2})
    last = t[t["step"] == 10].set_index("run")
    assert last.loc["a", "cos_to_base_at_rl"] == pytest.approx(0.9)
    assert last.loc["b", "cos_to_base_at_rl"] == pytest.approx(0.3)
    assert last.loc["b", "method"] == "lora"
    assert "delta_fro_total" not in t.columns and "refusal_rate" not in t.columns


def test_checkpoint_table_unknown_method_and_no_layer():
    drift = _drift().assign(method=None, lr=np.nan, fraction=np.nan)
    t = checkpoint_table(drift, None, pd.DataFrame(), refusal_layer=None)
    assert t["method"].isna().all() and t["cos_to_base_at_rl"].isna().all()
    assert t["mean_cos_to_base"].notna().all()


def test_checkpoint_table_joins_rows_without_a_step_by_name():
    """Two stepless checkpoints of one run (a root adapter, a plain save_pretrained folder) stay two rows, each
    with its own behaviour: the join is by (run, checkpoint name), not (run, step)."""
    rows, beh = [], []
    for name, cos, rate in (("base", 1.0, 0.9), ("final", 0.5, 0.2), ("my-adapter", 0.7, 0.4)):
        step = 0 if name == "base" else None
        k = _key("a", step, None, name=name)
        rows.append({**k, "layer": 1, "module": "", "metric": "cos_to_base", "value": cos})
        beh.append({**k, "metric": "refusal_rate", "value": rate})
    t = checkpoint_table(pd.DataFrame(rows), None, pd.DataFrame(beh), refusal_layer=1).set_index("checkpoint")
    assert sorted(t.index) == ["base", "final", "my-adapter"]
    assert t.loc["final", "refusal_rate"] == 0.2 and t.loc["my-adapter", "refusal_rate"] == 0.4
    assert t.loc["final", "cos_to_base_at_rl"] == 0.5 and t.loc["my-adapter", "cos_to_base_at_rl"] == 0.7


def test_checkpoint_table_without_names_falls_back_to_steps():
    drift = _drift().drop(columns="checkpoint")
    t = checkpoint_table(drift, None, _behaviour().drop(columns="checkpoint"), refusal_layer=1)
    assert t["refusal_rate"].tolist() == [0.8, 0.5]


def test_checkpoint_table_errors():
    with pytest.raises(UserError, match="refusal layer 7"):
        checkpoint_table(_drift(), None, None, refusal_layer=7)
    with pytest.raises(UserError, match="all empty"):
        checkpoint_table(None, pd.DataFrame(), None, refusal_layer=0)
    bad = pd.concat([_behaviour(), _behaviour().iloc[[1]].assign(value=0.1)])
    with pytest.raises(UserError, match="conflicting"):
        checkpoint_table(_drift(), None, bad, refusal_layer=1)
    with pytest.raises(UserError, match="lacks column"):
        checkpoint_table(_drift().drop(columns="layer"), None, None, refusal_layer=1)


def test_write_table_order_and_round_trip(tmp_path):
    df = pd.DataFrame(
        {
            "extra": ["x", "y", "z", "w"],
            "value": [1.5, 2.5, 3.5, 4.5],
            "metric": ["m", "m", "m", "m"],
            "module": ["", "", "", ""],
            "layer": [1, 0, 0, 0],
            "fraction": [0.5, 0.5, 0.0, 0.5],
            "step": [10, 10, 0, 10],
            "lr": [5e-5] * 4,
            "method": ["lora", "lora", "lora", None],
            "run": ["b", "b", "b", "a"],
            "checkpoint": ["checkpoint-10", "checkpoint-10", "base", "checkpoint-10"],
        }
    )
    paths = write_table(df, tmp_path / "out", "drift")
    assert [p.name for p in paths] == ["drift.csv", "drift.parquet"]
    header = paths[0].read_text().splitlines()[0].split(",")
    assert header == [*TIDY_COLUMNS, "extra"]
    back = pd.read_parquet(paths[1])
    assert back["extra"].tolist() == ["w", "z", "y", "x"]  # run, then step, then layer
    assert back["step"].tolist() == [10, 0, 10, 10]
    csv = pd.read_csv(paths[0])
    assert csv["value"].tolist() == back["value"].tolist()
    assert ",10,0.5,0," in paths[0].read_text()  # integral steps and layers stay integers in the CSV
    assert not list((tmp_path / "out").glob(".*.tmp"))
    # same input, same bytes
    again = write_table(df.sample(frac=1.0, random_state=1), tmp_path / "again", "drift")
    assert again[0].read_bytes() == paths[0].read_bytes()


def test_write_table_rejects_bad_name(tmp_path):
    with pytest.raises(UserError, match="table name"):
        write_table(pd.DataFrame({"run": []}), tmp_path, "../escape")


def test_refusal_layer_from_summary():
    summary = {
        "bases": {"qwen": {"refusal_layer": 16}, "smol": {"refusal_layer": 9}},
        "runs": {"a": {"base": "qwen"}, "b": "smol", "c": {"refusal_layer": 3}},
    }
    assert refusal_layer_by_run(summary, ["a", "b", "c", "d"]) == {"a": 16, "b": 9, "c": 3, "d": None}
    assert refusal_layer_by_run({"bases": [{"spec": "qwen", "refusal_layer": 12}]}, ["x"]) == {"x": 12}
    assert refusal_layer_by_run({"refusal_layer": 4}, ["x"]) == {"x": 4}
    assert refusal_layer_by_run(None, ["x"]) == {"x": None}
