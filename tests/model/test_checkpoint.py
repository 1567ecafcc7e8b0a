import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from model import PretrainedUnavailable, create_backbone, create_lifevit, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = create_lifevit("vit_micro_patch8_64", 0.8, num_classes=4).eval()
    x = torch.randn(5, 3, 64, 64) * torch.linspace(0.2, 2, 5)[:, None, None, None]
    model.calibrate(x)
    names = ["cat", "dog", "red circle", "blue square"]
    save_checkpoint(model, tmp_path, class_names=names, metadata={"name": "t"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["backbone"] == "vit_micro_patch8_64" and cfg["class_names"] == names
    assert cfg["normalization"] == "calibrated" and cfg["schedule"]["patch_counts"] == list(model.schedule.patch_counts)
    assert cfg["preprocess"]["input_size"] == [3, 64, 64]
    loaded, lcfg = load_checkpoint(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.budgets(model.head(x).scores), loaded.budgets(loaded.head(x).scores))
    assert lcfg.class_names == names


def test_load_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a patchlife checkpoint"):
        load_checkpoint(tmp_path)


def test_pretrained_from_local_file_and_clear_error_without_hub(tmp_path, monkeypatch):
    kw = dict(img_size=32, depth=4, num_classes=3)
    src = timm.create_model("vit_tiny_patch16_224", **kw)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    got = create_backbone("vit_tiny_patch16_224", pretrained=tmp_path / "w.safetensors", **kw)
    for k, v in src.state_dict().items():
        if not k.startswith("head."):  # timm re-initialises a classifier whose size differs from 1000
            assert torch.equal(v, got.state_dict()[k]), k
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", pretrained=tmp_path / "missing.pth", **kw)
    # No network in tests: the hub path must fail clearly. huggingface_hub reads HF_HUB_OFFLINE at
    # import, so set its constant too.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedUnavailable, match="local file"):
        create_backbone("deit_tiny_patch16_224", pretrained=True)


def test_weights_are_as_readable_as_the_json_beside_them(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(create_lifevit("vit_nano_patch8_32", 0.7, num_classes=2), tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}  # safetensors alone would give 0600


def test_hub_without_network_fails_in_seconds_but_still_reads_the_cache(monkeypatch):
    """Offline, one failed connection decides: the hub client then runs in offline mode (cached weights
    load, nothing else is tried) instead of retrying for about 50 s."""
    import socket

    import huggingface_hub.constants as hf_constants

    from model import backbones

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refused(address, timeout=None):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    offline_during_load = []

    def create_model(name, pretrained=False, **kw):
        offline_during_load.append(hf_constants.HF_HUB_OFFLINE)
        raise OSError("not in the cache")  # what the hub client says offline for weights it has not got

    monkeypatch.setattr(backbones.timm, "create_model", create_model)
    with pytest.raises(PretrainedUnavailable, match="cannot connect to huggingface.co.*not in the local cache"):
        create_backbone("deit_tiny_patch16_224", pretrained=True)
    assert offline_during_load == [True] and hf_constants.HF_HUB_OFFLINE is False  # put back after the call
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy the direct probe says nothing
    assert backbones.hub_unreachable() is None
