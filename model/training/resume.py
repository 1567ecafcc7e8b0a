"""What makes a training run resumable: the run's context, its ``resume.pt``, and Ctrl-C.

A resumed run must end with the weights of an uninterrupted one, bit for bit (on the CPU). So the
resume file holds, besides the weights and the optimiser: the step counters, the global random
number generators (Python, NumPy, torch CPU and CUDA), the AMP loss scaler, the distillation teacher
and the original command line. The data order and the training augmentation need no state: both are
functions of the seed, the stage, the epoch and the position in it (``model/training/data.py``).

Ctrl-C: the first SIGINT (or SIGTERM) asks the loop to stop after the step it is in; the loop then
writes the resume file and :func:`continue_hint` says how to go on. A second one raises
``KeyboardInterrupt`` at once (``train.run`` turns it into a message, not a traceback).
"""

from __future__ import annotations

import argparse
import copy
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from ..device import resolve_device
from ..lifevit import LifeViT
from .setup import ConfigError

RESUME_FILE = "resume.pt"
# options that may differ between an interrupted run and its --resume
_NOT_COMPARED = ("resume", "stop_after", "argv", "original_argv", "save_every", "workers")


class Interrupt:
    """Context manager: while inside, SIGINT (Ctrl-C) or SIGTERM sets :attr:`requested` the first time
    instead of ending the process; the second time raises ``KeyboardInterrupt``.

    SIGTERM is what a scheduler or ``docker stop`` sends before it kills: a preempted run saves too.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\npatchlife train: {what}: finishing this step, then saving the state to resume from "
              "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(saved: dict[str, Any]) -> None:
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def original_argv(args: argparse.Namespace) -> list[str]:
    """The command line of this run (a --resume run: of the run it continues), without ``--resume``."""
    saved = getattr(args, "original_argv", None)
    if saved is not None:
        return list(saved)
    argv = getattr(args, "argv", None)
    argv = list(argv) if argv is not None else (sys.argv[2:] if sys.argv[1:2] == ["train"] else [])
    return [a for a in argv if a != "--resume"]


def continue_hint(args: argparse.Namespace) -> str:
    return shlex.join(["patchlife", "train", *original_argv(args), "--resume"])


class TrainContext:
    """Device, mixed precision, Ctrl-C and resume-file handling for one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        try:
            self.device = resolve_device(args.device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        amp = args.amp
        if amp == "auto":
            amp = "off" if self.device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if amp != "off" and self.device.type != "cuda":
            raise ConfigError(f"--amp {amp} needs a GPU; on the CPU use --amp off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.path = Path(args.out) / RESUME_FILE
        self.args = args
        self.optimizer_state: dict[str, Any] | None = None
        self.teacher: LifeViT | None = None
        self.interrupt = Interrupt()
        self.t_start, self.prior_wall = time.perf_counter(), 0.0

    def tick(self, state: Any) -> None:
        state.wall_seconds = self.prior_wall + time.perf_counter() - self.t_start

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def stopping(self, state: Any) -> bool:
        """Ctrl-C was pressed, or ``--stop-after`` steps are done."""
        return self.interrupt.requested or (
            self.args.stop_after is not None and state.total_steps >= self.args.stop_after)

    def save_resume(self, model: LifeViT, opt: torch.optim.Optimizer | None, state: Any) -> None:
        """Everything to continue later; ``opt`` None at a stage boundary (the next stage starts fresh)."""
        self.tick(state)
        body = {"model": model.state_dict(), "optimizer": None if opt is None else opt.state_dict(),
                "state": vars(state).copy(), "rng": _rng_state(), "scaler": self.scaler.state_dict(),
                "teacher": None if self.teacher is None else self.teacher.state_dict(),
                "argv": original_argv(self.args),
                "args": {k: v for k, v in vars(self.args).items() if k not in _NOT_COMPARED}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(body, tmp)
        tmp.replace(self.path)  # atomic: an interrupted save never corrupts the previous one

    def load_resume(self, model: LifeViT, state_type: type) -> Any:
        """Load weights, optimiser, generators and counters; returns the run state to go on from."""
        if not self.path.is_file():
            raise ConfigError(f"--resume: no {self.path}; start without --resume")
        body = torch.load(self.path, map_location="cpu", weights_only=False)
        saved = body["args"]
        now = {k: v for k, v in vars(self.args).items() if k not in _NOT_COMPARED}
        changed = sorted(k for k in now if k in saved and saved[k] != now[k])
        if changed:
            raise ConfigError(f"--resume with different options than the saved run: {', '.join(changed)}; "
                              "use the original command line plus --resume")
        model.load_state_dict(body["model"])
        self.optimizer_state = body["optimizer"]
        if body["teacher"] is not None:
            self.teacher = copy.deepcopy(model)
            self.teacher.load_state_dict(body["teacher"])
        if body.get("scaler"):
            self.scaler.load_state_dict(body["scaler"])
        if body.get("rng") is not None:
            _set_rng_state(body["rng"])
        if body.get("argv") is not None:
            self.args.original_argv = body["argv"]  # the metadata records the command that started the run
        st = state_type(**body["state"])
        st.total_steps = 0
        self.prior_wall = st.wall_seconds
        print(f"resuming from stage {st.stage}, step {st.step} ({self.path})", file=sys.stderr, flush=True)
        return st
