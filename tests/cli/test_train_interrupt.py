"""``patchlife train`` and Ctrl-C, as a terminal sends it: SIGINT to the whole process group (the
trainer and its DataLoader workers). The first keeps the progress and says how to continue; a second
stops at once. Neither prints a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ops_support import REPO

from model.training.demo_tree import write_tree


def _start(tree: Path, out: Path) -> tuple[subprocess.Popen[str], list[str]]:
    argv = ["--data", str(tree), "--workers", "2", "--backbone", "vit_nano_patch8_32", "--batch-size", "4",
            "--stage0-steps", "100000", "--out", str(out)]  # far longer than the test waits
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "cli", "train", *argv], cwd=REPO, stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    return p, argv


def _read(p: subprocess.Popen[str], into: list[str]) -> threading.Thread:
    def pump() -> None:
        assert p.stderr is not None
        while chunk := p.stderr.read(1):
            into.append(chunk)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _wait_for_training(p: subprocess.Popen[str], err: list[str], deadline: float = 300) -> None:
    """Until the progress bar shows a few steps done (tqdm redraws every 2 s)."""
    t0 = time.monotonic()
    while "".join(err).count("stage 0 dense") < 2:
        if p.poll() is not None or time.monotonic() - t0 > deadline:
            p.kill()
            pytest.fail(f"training did not start: {''.join(err)[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree"), train_per_class=4, val_per_class=1)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_and_says_how_to_continue(presses: int, tree: Path, tmp_path: Path) -> None:
    p, argv = _start(tree, tmp_path / "run")
    err: list[str] = []
    reader = _read(p, err)
    _wait_for_training(p, err)
    for _ in range(presses):
        os.killpg(p.pid, signal.SIGINT)
    rc = p.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(err)
    assert rc == 130, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    hint = ["patchlife", "train", *argv, "--resume"]
    if presses == 1 or "stopped at once" not in text:  # a second press may land after the save: same result
        assert "finishing this step" in text and "To continue:" in text
        assert text.split("To continue:\n", 1)[1].split("\n")[0].split() == hint
        saved = torch.load(tmp_path / "run" / "resume.pt", weights_only=False)
        assert saved["state"]["stage"] == 0 and saved["state"]["step"] >= 1 and saved["argv"] == argv
    else:  # stopped inside a step: nothing new saved, and it says so
        assert "stopped at once" in text
        assert ("To continue:" in text) == (tmp_path / "run" / "resume.pt").is_file()
