"""``patchlife train``: turn a timm ViT into a life-regression model.

Stages (``docs/method.md``), each a number of optimiser steps with its own learning rate:

    0 dense  every backbone parameter, unpruned forward   (skipped by default with --pretrained)
    1 life   only the life module (W and its LayerNorm), soft keep masks at temperature tau
    2 tail   only what runs after block K (blocks K.., final norm, head), hard pruning

AdamW, linear warm-up then cosine decay per stage, gradient clipping, label smoothing, optional
distillation from the dense model, AMP on a GPU. Every ``--save-every`` steps (at least once in the
middle of a stage), at each stage end and on the first Ctrl-C (or SIGTERM) the full state goes to
``OUT/resume.pt`` (``resume.py``); ``--resume`` continues from it at the saved step with the same
data order, augmentation and generators, so an interrupted run ends with the weights of an
uninterrupted one, bit for bit on the CPU. The result is a checkpoint (``config.json`` +
``model.safetensors``), ``metrics.json`` and the page's example images (``examples.py``) in ``OUT``.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..lifevit import LifeViT
from ..options import train as add_arguments  # torch-free, for --help; re-exported for main()
from ..schedule import host_to_device
from .data import TASK_DESCRIPTION, DataSplit
from .examples import write_examples
from .resume import RESUME_FILE, TrainContext, continue_hint, original_argv  # noqa: F401  (re-exported)
from .setup import (
    ConfigError,
    build_data,
    build_model,
    check_args,
    data_spec,
    quick_eval,
    write_metrics,
)

STAGES = ("dense", "life", "tail")


# --- one stage ----------------------------------------------------------------------------------
@dataclass
class Stage:
    index: int
    name: str
    steps: int
    lr: float


@dataclass
class RunState:
    """Everything a resumed run needs besides the model weights."""

    stage: int = 0
    step: int = 0                  # steps done in the current stage
    total_steps: int = 0           # steps done in this process (for --stop-after)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0           # time in training steps, over all processes
    wall_seconds: float = 0.0      # whole-run wall time, over all processes


def trainable_parameters(model: LifeViT, stage: str) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what ``stage`` trains; returns those parameters."""
    bb = model.backbone
    if stage == "dense":
        modules: list[nn.Module] = [bb]
    elif stage == "life":
        modules = [model.life]  # W *and* the module's LayerNorm (the authors' code left it untrained)
    elif stage == "tail":
        modules = [*bb.blocks[model.schedule.first_block:], bb.norm, bb.fc_norm, bb.head_drop, bb.head]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    model.requires_grad_(False)
    for mod in modules:
        mod.requires_grad_(True)
    return [p for mod in modules for p in mod.parameters()]


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # no decay on norms, biases, position embeddings and the class token (1-D or token tensors)
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != 1]
    rest = [p for p in params if not (p.ndim >= 2 and p.shape[0] != 1)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))


def lr_at(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to zero."""
    w = max(1, round(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1),
                    reduction="batchmean", log_target=True)


class StageRunner:
    """The per-step forward and loss of a stage."""

    def __init__(self, model: LifeViT, stage: Stage, args: argparse.Namespace,
                 teacher: LifeViT | None) -> None:
        self.model, self.stage, self.args, self.teacher = model, stage, args, teacher
        self.rates = args.stage2_keep_rates or [model.schedule.keep_rate or args.keep_rate]

    def forward(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits [B, classes], mean life [] (detached, on the device) or None)``."""
        m = self.model
        if self.stage.name == "dense":
            return m.forward_dense(images), None
        if self.stage.name == "life":
            logits, lives = m.forward_soft(images, self.args.tau, self.args.stage1_norm == "per_image")
            return logits, lives.detach().mean()
        # tail: the inference path (per-image counts, so one static shape per step)
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
        rate = self.rates[int(torch.randint(len(self.rates), (1,), generator=g))]
        schedule = m.schedule_for(rate)
        state = m.head(images)
        lives = m.lives(state.scores.float(), schedule)
        return m.tail(state.tokens, schedule.patch_counts), lives.detach().mean()

    def loss(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing)
        alpha = self.args.distill if self.stage.name != "dense" else 0.0
        if alpha <= 0:
            return ce
        with torch.no_grad():
            teacher = (self.teacher or self.model).forward_dense(images)
        return (1 - alpha) * ce + alpha * _distill_loss(logits, teacher)


class _Meter:
    """Running loss, accuracy, mean life and images/s over the last ``size`` steps (for the progress bar).

    A step's numbers stay on the device; ``values()`` copies them to the host in one transfer, so the
    loop waits for the GPU only when the bar is redrawn, not (as ``.item()`` per number did) every step.
    """

    def __init__(self, size: int = 20) -> None:
        self.size = size
        self.steps: list[tuple[torch.Tensor, int, float]] = []  # ([loss, accuracy, life], images, seconds)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, life: torch.Tensor | None,
            seconds: float) -> None:
        acc = (logits.detach().argmax(dim=-1) == labels).float().mean()
        life = torch.full_like(acc, float("nan")) if life is None else life.detach().float()  # not new_tensor: a copy
        stats = torch.stack([loss.detach().float(), acc, life])
        self.steps = [*self.steps, (stats, len(labels), seconds)][-self.size:]

    def values(self) -> dict[str, float]:
        """``loss``, ``acc``, ``life`` (nan in the dense stage) and ``rate`` (images/s); one host sync."""
        if not self.steps:
            return {"loss": 0.0, "acc": 0.0, "life": float("nan"), "rate": 0.0}
        loss, acc, life = torch.stack([s[0] for s in self.steps]).cpu().unbind(dim=1)
        n = torch.tensor([s[1] for s in self.steps], dtype=torch.float32)
        return {"loss": float(loss.mean()), "acc": float((acc * n).sum() / n.sum()), "life": float(life.mean()),
                "rate": float(n.sum()) / max(1e-9, sum(s[2] for s in self.steps))}


def run_stage(model: LifeViT, stage: Stage, train: DataSplit, state: RunState, args: argparse.Namespace,
              ctx: TrainContext) -> bool:
    """Train one stage from ``state.step``; False when ``--stop-after`` interrupted it."""
    params = trainable_parameters(model, stage.name)
    opt = make_optimizer(params, stage.lr, args.weight_decay)
    if ctx.optimizer_state is not None:  # resumed in the middle of this stage
        opt.load_state_dict(ctx.optimizer_state)
    ctx.optimizer_state = None
    runner = StageRunner(model, stage, args, ctx.teacher if stage.name == "tail" else None)
    per_epoch = math.ceil(len(train) / args.batch_size)
    model.train()
    bar = tqdm(total=stage.steps, initial=state.step, desc=f"stage {stage.index} {stage.name}",
               unit="step", mininterval=2.0, dynamic_ncols=True, file=sys.stderr)
    meter = _Meter()
    save_every = min(args.save_every, max(1, math.ceil(stage.steps / 2)))  # a short stage still saves once
    t_last = next_show = time.perf_counter()
    while state.step < stage.steps:
        epoch, start = divmod(state.step, per_epoch)
        order_seed = args.seed * 1000 + stage.index * 100 + epoch
        for images, labels in train.batches(args.batch_size, shuffle=True, seed=order_seed, start=start):
            if state.step >= stage.steps:
                break
            # pinned, so the copy does not wait for the GPU to finish the previous step
            images, labels = host_to_device(images, ctx.device), host_to_device(labels, ctx.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(state.step, stage.steps, stage.lr, args.warmup)
            with ctx.autocast():
                logits, life = runner.forward(images, state.step)
                loss = runner.loss(images, logits, labels)
            opt.zero_grad(set_to_none=True)
            ctx.scaler.scale(loss).backward()
            if args.clip_grad > 0:
                ctx.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, args.clip_grad)
            ctx.scaler.step(opt)
            ctx.scaler.update()
            state.step += 1
            state.total_steps += 1
            now = time.perf_counter()
            state.seconds += now - t_last
            meter.add(loss, logits, labels, life, now - t_last)
            t_last = now
            done = state.step >= stage.steps
            if now >= next_show or done:  # reading the meter waits for the GPU: only as often as the bar redraws
                v = meter.values()
                bar.set_postfix(loss=f"{v['loss']:.3f}", acc=f"{v['acc']:.3f}",
                                life="-" if life is None else f"{v['life']:.2f}", img_s=f"{v['rate']:.0f}",
                                refresh=False)
                next_show = now + bar.mininterval
            bar.update(1)
            if ctx.stopping(state) and not done:
                ctx.save_resume(model, opt, state)
                bar.close()
                return False
            if not done and state.step % save_every == 0:
                ctx.save_resume(model, opt, state)
    bar.close()
    v = meter.values()
    state.history.append({"stage": stage.index, "name": stage.name, "steps": stage.steps, "lr": stage.lr,
                          "final_loss": v["loss"], "final_train_acc": v["acc"], "images_per_s": v["rate"]})
    return True


# --- the run --------------------------------------------------------------------------------------
def plan_stages(args: argparse.Namespace, train_len: int) -> list[Stage]:
    per_epoch = math.ceil(train_len / args.batch_size)
    # without lengths: one epoch of dense training from scratch, a quarter for lives, half for the tail
    defaults = {0: 0 if args.pretrained else per_epoch, 1: max(1, per_epoch // 4), 2: max(1, per_epoch // 2)}
    stages = []
    for s, name in enumerate(STAGES):
        steps, epochs = getattr(args, f"stage{s}_steps"), getattr(args, f"stage{s}_epochs")
        n = steps if steps is not None else (math.ceil(epochs * per_epoch) if epochs is not None else defaults[s])
        stages.append(Stage(s, name, int(n), getattr(args, f"stage{s}_lr")))
    return stages


# stage 0 from scratch shorter than this gives a model that has barely started learning
FEW_DENSE_STEPS = 100


def warn_short_dense(args: argparse.Namespace, stages: list[Stage], train_len: int) -> None:
    """Say so when the backbone is trained from scratch for only a handful of steps (or not at all)."""
    if args.pretrained or args.init_from is not None or stages[0].steps >= FEW_DENSE_STEPS:
        return
    steps, per_epoch = stages[0].steps, math.ceil(train_len / args.batch_size)
    what = "not at all" if steps == 0 else \
        f"for only {steps} step{'s' if steps != 1 else ''} ({steps / per_epoch:.3g} epochs)"
    print(f"patchlife train: warning: no --pretrained weights, and stage 0 trains the backbone from scratch "
          f"{what}: that is not a model yet. Give stage 0 at least {FEW_DENSE_STEPS} steps "
          f"(--stage0-epochs {math.ceil(FEW_DENSE_STEPS / per_epoch)} here, at {per_epoch} steps per epoch), "
          "or start from --pretrained weights; README.md, 'Serving a real model', has a recipe",
          file=sys.stderr, flush=True)


def train(args: argparse.Namespace) -> int:
    check_args(args)
    torch.manual_seed(args.seed)
    ctx = TrainContext(args)
    model = build_model(args)
    train_split, val_split = build_data(args, model)
    if args.init_from is not None and not args.resume:
        init_from_checkpoint(model, args.init_from)
    model.to(ctx.device)
    stages = plan_stages(args, len(train_split))
    state = ctx.load_resume(model, RunState) if args.resume else RunState()
    if not args.resume:
        warn_short_dense(args, stages, len(train_split))
    model.to(ctx.device)
    with ctx.interrupt:
        for stage in stages[state.stage:]:
            if stage.name == "tail" and args.distill > 0 and ctx.teacher is None:
                ctx.teacher = copy.deepcopy(model).eval().requires_grad_(False)  # dense model before the tail moves
            if state.step < stage.steps and not run_stage(model, stage, train_split, state, args, ctx):
                return _stopped(args, ctx, state)
            state.history.append(quick_eval(model, val_split, stage.name, ctx.device, args.batch_size))
            if stage.name == "dense" and args.save_dense is not None:
                meta = {**_metadata(args, train_split, val_split), "name": f"{args.name or Path(args.out).name}-dense"}
                save_checkpoint(model, args.save_dense, class_names=train_split.class_names, metadata=meta)
            state.stage, state.step = stage.index + 1, 0
            ctx.save_resume(model, None, state)  # a stage boundary: --resume starts the next stage (or finishes)
            if ctx.stopping(state) and (ctx.interrupt.requested or stage.index + 1 < len(stages)):
                return _stopped(args, ctx, state)
        return _finish(model, args, ctx, state, train_split, val_split)


def _stopped(args: argparse.Namespace, ctx: TrainContext, state: RunState) -> int:
    why = "interrupted" if ctx.interrupt.requested else f"--stop-after {args.stop_after}"
    print(f"patchlife train: stopped ({why}) at stage {state.stage}, step {state.step}; the state is saved in "
          f"{ctx.path}. To continue:\n  {continue_hint(args)}", file=sys.stderr, flush=True)
    return 130 if ctx.interrupt.requested else 0


def _finish(model: LifeViT, args: argparse.Namespace, ctx: TrainContext, state: RunState,
            train_split: DataSplit, val_split: DataSplit) -> int:
    t0 = time.perf_counter()
    model.eval().normalization = "per_image"
    if args.calibrate > 0:
        batches = []
        for images, _ in train_split.batches(args.batch_size, shuffle=True, seed=args.seed * 1000 + 999):
            batches.append(images.to(ctx.device))
            if sum(len(b) for b in batches) >= args.calibrate:
                break
        model.calibrate(batches)
        if getattr(args, "fit_budget", 0) > 0:  # the budget predictor (model/training/budget_fit.py)
            from .budget_fit import fit_budget
            fitted = fit_budget(model, train_split, args.fit_budget, args.batch_size, args.seed, ctx.device)
            state.history.append({"after": "budget predictor", **fitted})
        state.history.append(quick_eval(model, val_split, "calibrated", ctx.device, args.batch_size))
    state.seconds += time.perf_counter() - t0
    out = Path(args.out)
    meta = _metadata(args, train_split, val_split)
    save_checkpoint(model.cpu(), out, class_names=train_split.class_names, metadata=meta)
    ctx.tick(state)
    write_metrics(out, args, state, meta)
    ctx.path.unlink(missing_ok=True)
    try:  # the page's examples, from the held-out split, with the model's answers
        shown = f"{len(write_examples(out))} example images for the page"
    except (OSError, ValueError) as exc:  # the model is saved; only the page's example row is missing
        shown = f"no example images for the page: {exc}"
    print(f"saved {out} (train wall time {state.seconds:.0f} s; {shown})", file=sys.stderr)
    return 0


def _metadata(args: argparse.Namespace, train_split: DataSplit, val_split: DataSplit) -> dict[str, Any]:
    """Name, description, data and the exact command, recorded in the checkpoint's config."""
    data = data_spec(args, train_split, val_split)
    description = args.description or (
        TASK_DESCRIPTION if data["kind"] == "synthetic" else
        f"Classifies an image into one of the {len(train_split.class_names)} classes of the ImageFolder "
        f"tree at {data['root']}.")
    return {"name": args.name or Path(args.out).name, "description": description, "data": data,
            "command": shlex.join(["patchlife", "train", *original_argv(args)])}


def init_from_checkpoint(model: LifeViT, directory: Path) -> None:
    """Load every weight of a patchlife checkpoint (same architecture and classes) into ``model``."""
    from safetensors.torch import load_file

    from ..checkpoint import WEIGHTS_FILE

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"--init-from: no {WEIGHTS_FILE} in {directory}")
    state = load_file(str(path), device="cpu")
    model.life.take_sized_buffers(state)  # their sizes depend on whether it was calibrated
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"--init-from {directory}: not the same backbone/classes as this run ({exc})") from exc


def main(argv: list[str]) -> int:
    """``patchlife train ARGV`` from Python (records the exact command in the checkpoint)."""
    parser = argparse.ArgumentParser(prog="patchlife train")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    try:
        return train(args)
    except ConfigError as exc:
        print(f"patchlife train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the second Ctrl-C (or one before training started): no traceback
        saved = Path(args.out) / RESUME_FILE
        then = (f"the last saved state is in {saved}; to continue:\n  {continue_hint(args)}" if saved.is_file()
                else "nothing was saved")
        print(f"\npatchlife train: stopped at once; {then}", file=sys.stderr, flush=True)
        return 130
