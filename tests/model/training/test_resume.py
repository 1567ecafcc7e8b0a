"""Ctrl-C and --resume: an interrupted and resumed run ends with the weights of an uninterrupted one.

Interruptions are real SIGINTs, raised from inside the training step (so the handler sees them where a
Ctrl-C would land), on an ImageFolder tree (JPEGs, training augmentation, DataLoader workers) and on
the synthetic task, inside a stage and on a stage's last step (the boundary).
"""

import json
import signal
from pathlib import Path

import pytest
import torch

from model import load_checkpoint
from model.training import train as train_module
from model.training.demo_tree import write_tree
from model.training.train import main

NANO = ["--backbone", "vit_nano_patch8_32", "--batch-size", "8", "--calibrate", "16", "--seed", "3",
        "--stage0-steps", "4", "--stage1-steps", "3", "--stage2-steps", "3", "--distill", "0.5",
        "--stage2-keep-rates", "0.5,0.9"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    # 18 training images: 3 steps an epoch, so the 10 steps cross epochs and resume mid-epoch
    return write_tree(tmp_path_factory.mktemp("tree"), train_per_class=6, val_per_class=2, seed=1)


def _source(kind: str, tree: Path) -> list[str]:
    return ["--data", str(tree), "--workers", "2"] if kind == "folder" else \
        ["--synthetic", "--train-size", "40", "--val-size", "12"]


@pytest.fixture(scope="module")
def uninterrupted(tree, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run of each data kind, once for all the interruptions compared with it."""
    out = {}
    for kind in ("folder", "synthetic"):
        out[kind] = tmp_path_factory.mktemp(kind) / "whole"
        assert main([*_source(kind, tree), *NANO, "--out", str(out[kind])]) == 0
    return out


def _interrupt_at(monkeypatch, steps: set[int], times: int = 1) -> None:
    """SIGINT ``times`` times during the forward pass of each training step numbered in ``steps`` (1-based)."""
    forward = train_module.StageRunner.forward
    calls = {"n": 0}

    def interrupted(self, images, step):
        calls["n"] += 1
        if calls["n"] in steps:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return forward(self, images, step)

    monkeypatch.setattr(train_module.StageRunner, "forward", interrupted)


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} of {len(sa)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("data,steps,where", [
    ("folder", 2, (0, 2)),      # inside stage 0, in the middle of the first epoch
    ("folder", 4, (1, 0)),      # stage 0's last step: stops at the boundary, before stage 1
    ("synthetic", 9, (2, 2)),   # inside the tail stage (its keep-rate draws, the distillation teacher)
])
def test_interrupted_and_resumed_equals_uninterrupted(data, steps, where, tree, uninterrupted, tmp_path,
                                                       monkeypatch, capsys):
    parts = [*_source(data, tree), *NANO, "--out", str(tmp_path / "parts")]
    with monkeypatch.context() as m:
        _interrupt_at(m, {steps})
        assert main(parts) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"stopped (interrupted) at stage {where[0]}, step {where[1]}" in err
    hint = err.split("To continue:\n", 1)[1].strip().splitlines()[0]
    assert hint.split() == ["patchlife", "train", *parts, "--resume"]
    saved = torch.load(tmp_path / "parts" / "resume.pt", weights_only=False)
    assert (saved["state"]["stage"], saved["state"]["step"]) == where
    assert not (tmp_path / "parts" / "config.json").exists()

    resume = [*parts, "--resume"]
    if data == "folder":  # the worker count may change on resume: augmentation does not depend on it
        resume[resume.index("--workers") + 1] = "0"
    assert main(resume) == 0
    assert f"resuming from stage {where[0]}, step {where[1]}" in capsys.readouterr().err
    _same_weights(uninterrupted[data], tmp_path / "parts")
    assert (tmp_path / "parts" / "examples" / "examples.json").is_file()  # the page's examples
    command = json.loads((tmp_path / "parts" / "metrics.json").read_text())["command"]
    assert command.split() == ["patchlife", "train", *parts]  # the original command, not the --resume one
    assert load_checkpoint(tmp_path / "parts")[1].metadata["command"] == command
    assert not (tmp_path / "parts" / "resume.pt").exists()


def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, monkeypatch, capsys):
    args = ["--synthetic", "--train-size", "40", "--val-size", "12", *NANO, "--out", str(tmp_path)]
    _interrupt_at(monkeypatch, {6}, times=2)  # inside stage 1: the boundary after stage 0 was saved
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped at once" in err and "--resume" in err
    saved = torch.load(tmp_path / "resume.pt", weights_only=False)
    assert (saved["state"]["stage"], saved["state"]["step"]) == (1, 0)  # the last save: the boundary
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0


def test_a_short_stage_saves_once_in_its_middle(tmp_path, monkeypatch):
    saves = []
    real = train_module.TrainContext.save_resume
    monkeypatch.setattr(train_module.TrainContext, "save_resume",
                        lambda self, model, opt, state: (saves.append((state.stage, state.step)),
                                                         real(self, model, opt, state)))
    args = ["--synthetic", "--train-size", "40", "--val-size", "12", *NANO, "--save-every", "200"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    # mid-stage at half of each stage (2 of 4, 2 of 3), and at every stage boundary
    assert saves == [(0, 2), (1, 0), (1, 2), (2, 0), (2, 2), (3, 0)]


def test_few_dense_steps_from_scratch_warn(tmp_path, capsys):
    args = ["--synthetic", "--train-size", "40", "--val-size", "12", *NANO, "--out", str(tmp_path)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "only 4 steps" in err and "--stage0-epochs 20" in err  # 5 steps an epoch
    init = ["--synthetic", "--train-size", "40", "--val-size", "12", *NANO, "--stage0-steps", "0",
            "--init-from", str(tmp_path), "--out", str(tmp_path / "again")]
    assert main(init) == 0
    assert "warning" not in capsys.readouterr().err  # dense weights given: nothing to warn about
