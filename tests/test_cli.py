"""The `ift` command's argument handling shared by every command group (ift/cli/__init__.py)."""

from __future__ import annotations

import pytest

from ift import train as train_module
from ift.arguments import parse_args as parse
from ift.cli import build_parser


def test_overrides_may_follow_flags():
    args = parse(build_parser(), ["eval", "runs/x", "--split", "test", "evaluation.max_new_tokens=8",
                                  "--limit", "5", "data.seed=3"])
    assert args.target == "runs/x" and args.split == "test" and args.limit == 5
    assert args.overrides == ["evaluation.max_new_tokens=8", "data.seed=3"]


def test_overrides_before_flags_still_work():
    args = parse(build_parser(), ["estimate", "recipes/tiny.yaml", "training.seed=1", "--gpu-memory", "24GB"])
    assert args.overrides == ["training.seed=1"]


@pytest.mark.parametrize("argv", [
    ["eval", "runs/x", "--split", "test", "--bogus"],       # an unknown flag
    ["eval", "runs/x", "--split", "test", "stray"],         # not key=value
    ["env", "training.seed=1"],                             # a command without overrides
])
def test_anything_else_left_over_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(build_parser(), argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_train_script_takes_overrides_after_resume_flag(monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "run", lambda args: seen.update(vars(args)) or 0)
    assert train_module.main(["r.yaml", "--resume=auto", "training.seed=2"]) == 0
    assert seen["recipe"] == "r.yaml" and seen["resume"] == "auto" and seen["overrides"] == ["training.seed=2"]
