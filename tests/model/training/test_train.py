"""Short training runs on the nano config: what each stage trains, resume, and bad configurations."""

import argparse
import copy
import json
import tempfile

import pytest
import torch

from model import load_checkpoint
from model.training.data import synthetic_splits
from model.training.setup import build_model
from model.training.train import RunState, Stage, TrainContext, add_arguments, lr_at, main, run_stage

TINY = ["--synthetic", "--backbone", "vit_nano_patch8_32", "--train-size", "96", "--val-size", "24",
        "--batch-size", "16", "--calibrate", "32"]


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([*TINY, *extra])


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("stage", ["dense", "life", "tail"])
def test_each_stage_trains_exactly_its_parameters(stage, tmp_path):
    args = _args("--out", str(tmp_path), "--distill", "0.5")
    torch.manual_seed(0)
    model = build_model(args)
    train, _ = synthetic_splits(96, 24, 0, 32)
    ctx = TrainContext(args)
    ctx.teacher = copy.deepcopy(model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, Stage(["dense", "life", "tail"].index(stage), stage, 2, 1e-2), train, RunState(), args, ctx)
    changed = _changed(before, model)
    params = {k for k, _ in model.named_parameters()}
    k = model.schedule.first_block
    expected = {
        "dense": {p for p in params if p.startswith("backbone.")},
        "life": {"life.weight", "life.norm.weight", "life.norm.bias"},  # the LayerNorm trains too
        "tail": {p for p in params if p.startswith(("backbone.norm.", "backbone.head."))
                 or any(p.startswith(f"backbone.blocks.{i}.") for i in range(k, model.depth))},
    }[stage]
    assert changed == expected
    assert all(p.requires_grad == (n in expected) for n, p in model.named_parameters())


def test_lr_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


@pytest.mark.parametrize("stop,where", [(4, (1, 1)), (3, (1, 0))])  # mid-stage, at a stage boundary
def test_resume_continues_from_the_saved_step(stop, where, tmp_path):
    common = [*TINY, "--stage0-steps", "3", "--stage1-steps", "3", "--stage2-steps", "3", "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-after", str(stop)]) == 0
    saved = torch.load(tmp_path / "b" / "resume.pt", weights_only=False)
    assert (saved["state"]["stage"], saved["state"]["step"]) == where  # 3 dense steps (+ 1 life step)
    assert (saved["optimizer"] is None) == (where[1] == 0)
    assert not (tmp_path / "b" / "config.json").exists()
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert not (tmp_path / "b" / "resume.pt").exists()
    a, cfg = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cfg.normalization == "calibrated" and cfg.class_names[0] == "0 red circles"
    assert cfg.metadata["description"].startswith("Counts the filled red circles")
    assert cfg.metadata["data"] == {"kind": "synthetic", "seed": 1, "train_size": 96, "val_size": 24}
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["command"].startswith("patchlife train --synthetic --backbone vit_nano_patch8_32")
    assert [h["after"] for h in metrics["history"] if "after" in h] == ["dense", "life", "tail", "calibrated"]
    assert "fraction_of_dense" in metrics["history"][-1]["budget"]
    assert metrics["process_cpu_seconds"] > 0


def test_save_dense_then_init_from_continues_from_the_dense_weights(tmp_path):
    common = [*TINY, "--stage1-steps", "1", "--stage2-steps", "1", "--seed", "2"]
    assert main([*common, "--stage0-steps", "2", "--out", str(tmp_path / "a"),
                 "--save-dense", str(tmp_path / "dense")]) == 0
    dense, cfg = load_checkpoint(tmp_path / "dense")
    assert cfg.metadata["name"] == "a-dense" and not dense.life.is_calibrated
    # stages 1-2 from the saved dense weights: the head (blocks before K) stays exactly the dense one
    assert main([*common, "--stage0-steps", "0", "--stage1-norm", "per_image", "--out", str(tmp_path / "b"),
                 "--init-from", str(tmp_path / "dense")]) == 0
    b, _ = load_checkpoint(tmp_path / "b")
    k = b.schedule.first_block
    for name, value in dense.state_dict().items():
        if name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")) or any(
                name.startswith(f"backbone.blocks.{i}.") for i in range(k)):
            assert torch.equal(value, b.state_dict()[name]), name
    assert main([*common, "--backbone", "vit_micro_patch8_64", "--out", str(tmp_path / "c"),
                 "--init-from", str(tmp_path / "dense")]) == 2  # another architecture: refused


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    common = [*TINY, "--stage0-steps", "2", "--stage1-steps", "1", "--stage2-steps", "1"]
    assert main([*common, "--out", str(tmp_path), "--stop-after", "1"]) == 0
    assert main([*common, "--out", str(tmp_path), "--resume", "--stage2-lr", "0.1"]) == 2
    assert "stage2_lr" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--backbone", "vit_nope"], "unknown backbone"),
    (["--stage-starts", "2,9"], "stage starts must increase"),
    (["--patch-counts", "20,10,5"], "patch counts must be non-increasing"),
    (["--keep-rate", "1.5"], "--keep-rate must be in"),
    (["--stage1-steps", "2", "--stage1-epochs", "1"], "not both"),
    (["--resume"], "nothing to resume"),
    (["--amp", "bf16", "--device", "cpu"], "needs a GPU"),
    (["--crop-scale", "0"], "--crop-scale is a fraction"),
])
def test_bad_configuration_stops_with_a_message(extra, message, tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_data_folders_stop_with_a_message(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--backbone", "vit_nano_patch8_32"]) == 2
    assert "train" in capsys.readouterr().err
    for split, classes in (("train", ["a", "b"]), ("val", ["a", "c"])):
        for c in classes:
            (tmp_path / "tree" / split / c).mkdir(parents=True)
    assert main(["--data", str(tmp_path / "tree"), "--backbone", "vit_nano_patch8_32"]) == 2
    err = capsys.readouterr().err
    assert "only in train/: ['b']" in err and "only in val/: ['c']" in err


def test_batch_normalised_stage1_lets_lives_differ_between_images():
    torch.manual_seed(0)
    model = build_model(_args())
    x = torch.randn(4, 3, 32, 32) * torch.tensor([0.1, 1.0, 2.0, 4.0])[:, None, None, None]
    ideal = model.schedule.ideal_lives().mean()
    with torch.no_grad():
        _, per_image = model.forward_soft(x, 4.0)
        _, batch = model.forward_soft(x, 4.0, per_image=False)
    assert torch.allclose(per_image.mean(dim=1), ideal.expand(4), atol=1e-4)  # paper: same mean per image
    assert batch.mean() == pytest.approx(float(ideal), abs=1e-4) and batch.mean(dim=1).std() > 0.01


def test_mimetic_init_makes_attention_start_near_identity():
    torch.manual_seed(0)
    timm_init = build_model(_args("--init", "timm")).backbone.blocks[0].attn
    torch.manual_seed(0)
    attn = build_model(_args("--init", "mimetic")).backbone.blocks[0].attn
    d, dh = attn.qkv.in_features, attn.qkv.in_features // attn.num_heads
    w = attn.qkv.weight.detach()
    qk = w[:dh].T @ w[d:d + dh]  # head 0: x Wq^T Wk x^T
    vp = w[2 * d:].T @ attn.proj.weight.detach().T
    assert qk.diag().mean() > 3 * qk.fill_diagonal_(0).abs().mean()  # rank d/heads of a Z + b I
    assert vp.diag().mean() < -0.2
    assert not torch.equal(w, timm_init.qkv.weight)


def test_default_recipe_parses_and_matches_the_shipped_model(capsys):
    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.training.default_model import RECIPE

    args = _args(*RECIPE)  # no typo in the recipe
    assert args.backbone == "vit_micro_patch8_64" and args.data is None
    metrics = DEFAULT_CHECKPOINT / "metrics.json"
    if metrics.is_file():  # the shipped checkpoint was tuned by exactly FINETUNE ...
        body = json.loads(metrics.read_text())
        if "base" in body:
            from model.training.default_model import finetune_command
            tune = finetune_command(DEFAULT_CHECKPOINT, DEFAULT_CHECKPOINT)
            assert body["command"].split(" --out ")[0] == "patchlife train " + " ".join(tune[:tune.index("--out")])
            body = body["base"]  # ... from a base made by exactly this command ...
        command = body["command"].split(" --out ")[0]
        if "dense_from" in body:  # ... in two steps: stage 0 by an earlier run, recorded with the model
            stage0 = RECIPE.index("--stage0-steps") + 1
            assert command == "patchlife train " + " ".join([*RECIPE[:stage0], "0", *RECIPE[stage0 + 1:]])
            dense = _args(*body["dense_from"]["command"].split()[2:])
            for key in ("backbone", "seed", "train_size", "batch_size", "stage0_steps", "stage0_lr", "init",
                        "warmup", "weight_decay", "clip_grad", "label_smoothing"):
                assert getattr(dense, key) == getattr(args, key), key
        else:
            assert command == "patchlife train " + " ".join(RECIPE)


def test_ensure_default_leaves_an_existing_model_alone(tmp_path, capsys):
    from model.training import default_model

    assert main([*TINY, "--stage0-steps", "1", "--stage1-steps", "1", "--stage2-steps", "1",
                 "--out", str(tmp_path)]) == 0
    before = (tmp_path / "model.safetensors").stat().st_mtime_ns
    assert default_model.run(argparse.Namespace(out=tmp_path, force=False, variant="default")) == 0
    assert "exists" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == before


def test_ensure_default_force_trains_evaluates_and_compares_with_the_paper(tmp_path, monkeypatch, capsys):
    """The whole ``ensure-default --force`` path on a tiny recipe: train, evaluate into metrics.json, the
    paper-recipe comparison from the same dense weights, the page's examples (a broken import here once
    made every retrain fail before its first step, while the 'model exists' path still passed)."""
    from model.training import default_model

    tiny = [*TINY, "--stage0-steps", "2", "--stage1-steps", "1", "--stage2-steps", "1", "--seed", "0",
            "--keep-rate", "0.5", "--stage-starts", "1,2,3", "--name", "tiny-default"]
    monkeypatch.setattr(default_model, "RECIPE", tiny)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = argparse.Namespace(out=tmp_path / "m", force=True, variant="default", no_paper=False, dense_from=None)
    assert default_model.run(args) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("patchlife-")]  # its working folder is gone
    body = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert body["name"] == "tiny-default" and body["eval"]["images"] == 24
    assert {row["keep_rate"] for row in body["eval"]["rows"] if row.get("keep_rate")} >= {0.3, 0.5}
    assert "--stage1-norm per_image" in body["paper_recipe"]["command"]
    assert (tmp_path / "m" / "examples" / "examples.json").is_file()
    load_checkpoint(tmp_path / "m")


def test_ensure_default_keeps_its_working_folder_when_a_step_stops(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a training step: train prints a resume command into ensure-default's working folder,
    so that folder must outlive the run (it used to be a TemporaryDirectory, gone by the time the
    command was read); a finished run leaves nothing behind."""
    from model.training import default_model, train

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[str] = []

    def stopped(argv: list[str]) -> int:
        seen.append(argv[argv.index("--out") + 1])
        return 130  # what train.main returns when interrupted

    monkeypatch.setattr(train, "main", stopped)
    args = argparse.Namespace(out=tmp_path / "m", force=True, variant="heavy", no_paper=True, dense_from=None)
    assert default_model.run(args) == 130
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("patchlife-")]
    assert len(kept) == 1 and "kept " + str(kept[0]) in capsys.readouterr().err
    assert seen == [str(tmp_path / "m")]                   # the heavy variant trains straight into --out
