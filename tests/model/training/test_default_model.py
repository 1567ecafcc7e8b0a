"""``patchlife ensure-default``: its recipes, and the example images shipped with the default model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_lifevit, load_checkpoint, save_checkpoint
from model.checkpoint import DEFAULT_CHECKPOINT
from model.training.data import scene_content, synthetic_class_names
from model.training.default_model import (
    EXAMPLES_DIR,
    EXAMPLES_INDEX,
    pick_examples,
    recipe,
    train_command,
    write_examples,
)


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_variants_are_the_recipe_with_a_few_flags_changed(tmp_path):
    base, paper, heavy = recipe("default"), recipe("paper"), recipe("heavy")
    assert _flag(base, "--stage1-norm") == "batch" and _flag(base, "--stage2-keep-rates") == "0.5,0.7,0.9"
    assert _flag(paper, "--stage1-norm") == "per_image" and "--stage2-keep-rates" not in paper
    assert _flag(heavy, "--backbone") == "vit_wide_patch8_64"
    same = ("--seed", "--train-size", "--val-size", "--stage0-steps", "--stage1-steps", "--stage2-steps", "--tau")
    assert all(_flag(v, f) == _flag(base, f) for v in (paper, heavy) for f in same)
    argv = train_command(tmp_path / "p", "paper", dense_from=tmp_path / "d")
    assert _flag(argv, "--stage0-steps") == "0" and _flag(argv, "--init-from") == str(tmp_path / "d")
    assert _flag(argv, "--out") == str(tmp_path / "p")


def test_shipped_examples_index_is_well_formed_and_answered():
    folder = DEFAULT_CHECKPOINT / EXAMPLES_DIR
    index = json.loads((folder / EXAMPLES_INDEX).read_text())
    model, cfg = load_checkpoint(DEFAULT_CHECKPOINT)
    assert 4 <= len(index) <= 6 and {"simple.png", "busy.png"} <= {e["file"] for e in index}
    for entry in index:
        assert set(entry) == {"file", "label", "note"} and entry["label"] in cfg.class_names and entry["note"]
        image = Image.open(folder / entry["file"])
        assert image.format == "PNG" and image.size == (64, 64)
    # metrics.json records the model's answer on each example; it is still the model's answer now
    recorded = {e["file"]: e for e in json.loads((DEFAULT_CHECKPOINT / "metrics.json").read_text())["examples"]}
    assert set(recorded) == {e["file"] for e in index}
    mean, std = torch.tensor(cfg.preprocess["mean"]), torch.tensor(cfg.preprocess["std"])
    correct = 0
    for entry in index:
        x = torch.from_numpy(np.array(Image.open(folder / entry["file"]).convert("RGB"))).permute(2, 0, 1)
        x = (x.float() / 255 - mean[:, None, None]) / std[:, None, None]
        with torch.inference_mode():
            top1 = cfg.class_names[int(model(x[None]).argmax())]
        assert recorded[entry["file"]]["top1"] == top1 and recorded[entry["file"]]["label"] == entry["label"]
        correct += top1 == entry["label"]
    assert correct >= len(index) - 1  # sensible: at most one miss


def test_write_examples_renders_held_out_items_that_fit_their_notes(tmp_path):
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=6).eval()
    meta = {"name": "tiny", "data": {"kind": "synthetic", "seed": 0, "train_size": 1, "val_size": 600}}
    save_checkpoint(model, tmp_path, class_names=synthetic_class_names(), metadata=meta)
    (tmp_path / "metrics.json").write_text("{}")
    index = write_examples(tmp_path)
    written = json.loads((tmp_path / EXAMPLES_DIR / EXAMPLES_INDEX).read_text())
    assert written == index and all((tmp_path / EXAMPLES_DIR / e["file"]).is_file() for e in index)
    picked = pick_examples(0, 600, 32)
    content = scene_content(1, [item for _, item, _ in picked], 32)  # held-out stream of seed 0
    assert [e["label"] for e in index] == [synthetic_class_names()[c] for c in content["count"]]
    by = dict(zip([name for name, _, _ in picked], content["objects"], strict=True))
    assert by["simple.png"] == 1 and by["busy.png"] >= 10 and by["empty.png"] == 0
    answers = json.loads((tmp_path / "metrics.json").read_text())["examples"]
    assert [a["file"] for a in answers] == [e["file"] for e in index]
    assert all(a["top1"] in synthetic_class_names() for a in answers)


@pytest.mark.parametrize("variant", ["paper", "heavy"])  # default: tests/model/training/test_train.py
def test_existing_model_is_not_retrained(variant, tmp_path, capsys):
    import argparse

    from model.training.default_model import add_arguments, run

    torch.manual_seed(0)
    save_checkpoint(create_lifevit("vit_nano_patch8_32", 0.7, num_classes=6), tmp_path,
                    class_names=synthetic_class_names())
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--variant", variant, "--out", str(tmp_path)])) == 0
    assert f"the {variant} model exists at {tmp_path}" in capsys.readouterr().out
