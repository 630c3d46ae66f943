"""core.settings: one typed dataclass gives a command's flags, help, defaults, TOML coercion and unknown-key hints."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import Settings, cli_values, dash_values, opt, read_toml, to_flags


@dataclass
class Demo(Settings):
    NOUN = "demo setting"

    rate: float = opt(5e-5, "Learning rate.")
    steps: int | None = opt(None, "Step cap.")
    name: str = opt("x", "A name.")
    mode: str = opt("fast", "How to run.", ("fast", "full"))
    deep: bool = opt(False, "Go deep.")
    langs: list[str] = opt(["de", "fr"], "Languages, comma-separated.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    Demo.add_arguments(p)
    p.add_argument("--out", default="o")
    p.add_argument("--quiet", action="store_true")
    return p


def test_flags_take_help_and_default_from_the_field():
    actions = {a.dest: a for a in parser()._actions}
    assert actions["cfg_rate"].help == "Learning rate. [default: 5e-05]"
    assert actions["cfg_langs"].help == "Languages, comma-separated. [default: de,fr]"
    assert actions["cfg_mode"].choices == ("fast", "full")
    assert (
        "--deep" in actions["cfg_deep"].option_strings and "--no-deep" in actions["cfg_deep"].option_strings
    )


def test_only_given_flags_reach_the_settings_coerced_to_field_types():
    args = parser().parse_args(["--rate", "1e-4", "--langs", "it, pt", "--no-deep", "--steps", "none"])
    values = cli_values(args)
    assert values == {"rate": "1e-4", "langs": "it, pt", "deep": False, "steps": "none"}
    s = Demo.from_dict(values)
    assert (s.rate, s.langs, s.deep, s.steps, s.name) == (1e-4, ["it", "pt"], False, None, "x")


def test_toml_round_trip_and_coercion_from_toml_values(tmp_path):
    s = Demo.from_dict({"rate": 1, "steps": 3.0, "langs": ["nl"], "deep": True})
    assert (s.rate, s.steps, s.langs, s.deep) == (1.0, 3, ["nl"], True)
    (tmp_path / "s.toml").write_text(s.to_toml())
    assert Demo.from_dict(read_toml(tmp_path / "s.toml")) == s
    (tmp_path / "bad.toml").write_bytes(b"\x00\xff")
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rte": 1}, "demo: unknown demo setting 'rte'; did you mean 'rate'?"),
        ({"zzz": 1}, "known settings: rate, steps"),
        ({"steps": 2.5}, "steps=2.5 is not a valid int"),
        ({"deep": "maybe"}, "deep='maybe' is not a valid bool"),
        ({"name": None}, "name=None is not a valid str (may not be empty)"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        Demo.from_dict(values, where="demo")


def test_to_flags_inverts_add_arguments():
    values = {"rate": 1e-4, "deep": True, "langs": ["it"], "steps": None}
    args = parser().parse_args(to_flags(values))
    assert Demo.from_dict(cli_values(args)) == Demo(rate=1e-4, deep=True, langs=["it"], steps=None)


def test_dash_values_glue_values_that_start_with_a_dash():
    p = parser()
    assert dash_values(["--rate", "-1e-4", "--out", "-x/2"], p) == ["--rate=-1e-4", "--out=-x/2"]
    # an option after a value-taking flag stays an option (argparse then reports the missing value)
    assert dash_values(["--out", "--quiet"], p) == ["--out", "--quiet"]
    # abbreviations resolve as argparse resolves them; '-' (stdin) and values after '--' are left alone
    assert dash_values(["--ra", "-5", "--out", "-", "--", "--rate", "-1"], p) == [
        "--ra=-5",
        "--out",
        "-",
        "--",
        "--rate",
        "-1",
    ]
    assert p.parse_args(dash_values(["--rate", "-1e-4"], p)).cfg_rate == "-1e-4"


def test_dash_values_follow_subcommands():
    top = argparse.ArgumentParser(prog="top")
    sub = top.add_subparsers(dest="command")
    a = sub.add_parser("a")
    a.add_argument("--shard")
    b = sub.add_parser("b")
    b.add_argument("--shard", action="store_true")
    assert dash_values(["a", "--shard", "-1/2"], top) == ["a", "--shard=-1/2"]
    assert dash_values(["b", "--shard", "-1/2"], top) == ["b", "--shard", "-1/2"]  # a flag there: not a value
    assert top.parse_args(dash_values(["a", "--shard", "-1/2"], top)).shard == "-1/2"
