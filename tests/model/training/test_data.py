"""The synthetic counting task (deterministic, balanced, labels = what is drawn, disjoint splits) and ImageFolder."""

import numpy as np
import pytest
import torch

from model.training.data import (
    CHUNK,
    MAX_COUNT,
    MAX_DISTRACTORS,
    TARGET_RGB,
    DataConfigError,
    SyntheticShapes,
    _background,
    _gather_params,
    _paint_layers,
    folder_splits,
    render_synthetic,
    scene_content,
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
    assert torch.bincount(labels, minlength=6).tolist() == [20] * 6


def test_held_out_split_shares_no_image_with_training():
    train, val = synthetic_splits(3000, 600, seed=0)
    seen = {bytes(x.numpy()) for x in train.render(np.arange(3000))[0]}
    assert not any(bytes(x.numpy()) in seen for x in val.render(np.arange(600))[0])
    # and the held-out split is fixed by the seed
    _, again = synthetic_splits(10, 600, seed=0)
    assert torch.equal(again.render([5, 599])[0], val.render([5, 599])[0])


def test_class_names_are_counts():
    names = synthetic_class_names()
    assert names == ["0 red circles", "1 red circle", "2 red circles", "3 red circles", "4 red circles",
                     "5 red circles"]


def _red_blobs(img: torch.Tensor) -> int:
    """Connected components of target-red pixels (4-connectivity) in one uint8 ``[3, H, W]`` image."""
    x = img.permute(1, 2, 0).numpy().astype(float) / 255
    red = np.linalg.norm(x - np.asarray(TARGET_RGB), axis=-1) < 0.16
    seen = np.zeros_like(red)
    blobs = 0
    for y0, x0 in zip(*np.nonzero(red), strict=True):
        if seen[y0, x0]:
            continue
        blobs, stack = blobs + 1, [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, xx = stack.pop()
            for ny, nx in ((y + 1, xx), (y - 1, xx), (y, xx + 1), (y, xx - 1)):
                if 0 <= ny < red.shape[0] and 0 <= nx < red.shape[1] and red[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs


def test_count_labels_match_what_is_drawn():
    idx = np.arange(240)
    content = scene_content(0, idx)
    p = _gather_params(0, idx, 64)
    assert np.array_equal(content["count"], p["label"])  # the label is the number of targets
    # the scene painted with its targets only: as many red blobs in the pixels as the label says
    targets_only = {**p, "l_present": p["l_present"] & p["l_target"]}
    pixels = (_paint_layers(targets_only, _background(p, 64)).clamp(0, 1) * 255).round().to(torch.uint8)
    assert [_red_blobs(im) for im in pixels] == p["label"].tolist()
    # ... and those blobs are in the real image, with distractors that are never filled red circles
    full, _ = render_synthetic(0, idx)
    is_target = (_paint_layers({**targets_only, "l_rgb": np.ones_like(p["l_rgb"])}, torch.zeros(240, 3, 64, 64))
                 [:, 0] > 0.99)[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(full[is_target], pixels[is_target])
    decoy = p["l_present"] & ~p["l_target"]
    red = (np.abs(p["l_rgb"] - TARGET_RGB) < 0.07).all(-1)
    assert not (decoy & red & (p["l_shape"] == 0) & ~p["l_hollow"]).any()
    assert (decoy & red).any() and (decoy & (p["l_shape"] == 0) & ~red).any()  # look-alikes of both kinds


def test_content_varies_and_objects_never_overlap():
    idx = np.arange(1200)
    c = scene_content(0, idx)
    assert set(c["count"].tolist()) == set(range(MAX_COUNT + 1))
    assert c["objects"].min() == 0 and c["objects"].max() == MAX_COUNT + MAX_DISTRACTORS
    assert 0 == c["target_patches"].min() < c["target_patches"].max() == 4 * MAX_COUNT
    p = _gather_params(0, idx, 64)
    centre, radius, present = p["l_center"], p["l_radius"], p["l_present"]
    gap = np.linalg.norm(centre[:, :, None] - centre[:, None, :], axis=-1) - radius[:, :, None] - radius[:, None, :]
    both = present[:, :, None] & present[:, None, :] & ~np.eye(present.shape[1], dtype=bool)
    assert (gap[both] > 0.5).all()  # one object per 16-px cell: circles never touch


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
