"""The page's examples of a model trained on an ImageFolder tree: written from its val/ split, a few
per class, with the model's answers, in the format ``GET /v1/examples`` reads."""

import json

import torch
from PIL import Image

from model import create_lifevit, save_checkpoint
from model.training.demo_tree import CLASSES, write_tree
from model.training.examples import EXAMPLES_DIR, EXAMPLES_INDEX, MAX_SIDE, per_class, write_examples
from service.frontend.routes.ui import read_examples


def test_a_folder_model_gets_a_few_held_out_examples_per_class_with_its_answers(tmp_path):
    tree = write_tree(tmp_path / "tree", train_per_class=1, val_per_class=5, seed=2)
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=len(CLASSES)).eval()
    meta = {"name": "shapes", "data": {"kind": "folder", "root": str(tree), "train_size": 3, "val_size": 15}}
    out = tmp_path / "model"
    save_checkpoint(model, out, class_names=list(CLASSES), metadata=meta)
    (out / "metrics.json").write_text("{}")

    index = write_examples(out)
    k = per_class(len(CLASSES))
    assert k == 3 and [e["label"] for e in index] == [c for c in sorted(CLASSES) for _ in range(k)]
    assert read_examples(out) == index  # what /v1/examples serves: every entry valid, every file there
    assert json.loads((out / EXAMPLES_DIR / EXAMPLES_INDEX).read_text()) == index
    answers = json.loads((out / "metrics.json").read_text())["examples"]
    for entry, answer in zip(index, answers, strict=True):
        source = answer["held_out_file"]
        assert source.startswith(f"val/{entry['label']}/") and (tree / source).is_file()
        assert entry["note"].startswith(f"held-out image {source}; the model answers {answer['top1']!r}")
        assert entry["note"].endswith("(right)" if answer["top1"] == entry["label"] else "(wrong)")
        assert answer["top1"] in CLASSES
        with Image.open(out / EXAMPLES_DIR / entry["file"]) as image:
            assert image.format == "JPEG" and max(image.size) <= MAX_SIDE  # thumbnails, not the photos
