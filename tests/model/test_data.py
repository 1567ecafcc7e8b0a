"""The synthetic task (deterministic, balanced, small targets, varying clutter) and ImageFolder splits."""

import numpy as np
import pytest
import torch

from model.data import (
    CHUNK,
    MAX_DISTRACTORS,
    DataConfigError,
    SyntheticShapes,
    _gather_params,
    folder_splits,
    patch_coverage,
    render_synthetic,
    synthetic_class_names,
    synthetic_splits,
)


def test_same_seed_same_images_whatever_the_batch():
    idx = [3, CHUNK - 1, CHUNK, 5 * CHUNK + 7]  # across chunk boundaries, out of order below
    a, la = render_synthetic(7, idx)
    b, lb = render_synthetic(7, idx[::-1])
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 64, 64)
    assert torch.equal(a, b.flip(0)) and torch.equal(la, lb.flip(0))
    single, _ = render_synthetic(7, [CHUNK])
    assert torch.equal(single[0], a[2])
    other, _ = render_synthetic(8, idx)
    assert not torch.equal(a, other)


def test_splits_are_disjoint_streams_and_balanced():
    train, val = synthetic_splits(48, 120, seed=3)
    assert not torch.equal(train.render([0])[0], val.render([0])[0])
    labels = torch.cat([y for _, y in val.batches(50)])
    assert torch.bincount(labels, minlength=12).tolist() == [10] * 12


def test_class_names_are_readable():
    names = synthetic_class_names()
    assert len(set(names)) == 12 and "red circle" in names and "blue triangle" in names


def test_batches_normalised_resumable_and_shuffled_by_seed():
    ds = SyntheticShapes(40, seed=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    full = list(ds.batches(16, shuffle=True, seed=9))
    assert [len(y) for _, y in full] == [16, 16, 8]
    x = full[0][0]
    assert x.dtype == torch.float32 and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    later = list(ds.batches(16, shuffle=True, seed=9, start=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[1:], later, strict=True))
    again = list(ds.batches(16, shuffle=True, seed=9))
    other = list(ds.batches(16, shuffle=True, seed=10))
    assert torch.equal(full[0][1], again[0][1]) and not torch.equal(full[0][1], other[0][1])
    plain = torch.cat([y for _, y in ds.batches(16)])
    assert sorted(torch.cat([y for _, y in full]).tolist()) == sorted(plain.tolist())  # a permutation


def test_target_is_small_and_clutter_varies():
    idx = np.arange(600)
    cov = patch_coverage(0, idx)
    assert float(cov.mean()) <= 0.10 and float(cov.max()) <= 0.16  # ~5 of 64 patches on average
    present = _gather_params(0, idx, 64)["l_present"][:, :-1].sum(axis=1)
    assert present.min() == 0 and present.max() == MAX_DISTRACTORS
    assert len(np.unique(present)) == MAX_DISTRACTORS + 1


def test_pil_image_round_trip():
    ds = SyntheticShapes(4, seed=2)
    img, name = ds.image(1)
    assert img.size == (64, 64) and name in ds.class_names
    assert torch.equal(torch.from_numpy(np.array(img)).permute(2, 0, 1), ds.render([1])[0][0])


def _write_tree(root, classes_train, classes_val, per_class=2):
    ds = SyntheticShapes(8, seed=4)
    for split, classes in (("train", classes_train), ("val", classes_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                ds.image(i)[0].save(root / split / c / f"{i}.png")


DATA_CFG = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic", "crop_pct": 1.0}


def test_folder_splits_read_images_with_timm_transforms(tmp_path):
    _write_tree(tmp_path, ["cat", "dog"], ["cat", "dog"])
    train, val = folder_splits(tmp_path, DATA_CFG, workers=0)
    assert train.class_names == val.class_names == ["cat", "dog"] and len(train) == 4
    x, y = next(val.batches(4))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]


def test_folder_class_mismatch_and_missing_split_are_clear(tmp_path):
    _write_tree(tmp_path, ["cat", "dog"], ["cat", "owl"])
    with pytest.raises(DataConfigError, match=r"only in train/: \['dog'\].*only in val/: \['owl'\]"):
        folder_splits(tmp_path, DATA_CFG, workers=0)
    with pytest.raises(DataConfigError, match="train/ and val/"):
        folder_splits(tmp_path / "nowhere", DATA_CFG, workers=0)
