import json

import torch

from cli.main import main
from model import create_lifevit
from model.baselines import oracle_forward, random_forward, topk_forward


def test_baselines_equal_dense_at_full_counts_and_keep_the_counts():
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.5, num_classes=3).eval()
    x = torch.randn(3, 3, 32, 32)
    full = (model.num_patches,) * len(model.schedule.stage_starts)
    with torch.no_grad():
        ref = model.backbone(x)
        for fn in (oracle_forward, topk_forward):
            assert (fn(model, x, full) - ref).abs().max() <= 1e-5
        assert (random_forward(model, x, full, torch.Generator().manual_seed(0)) - ref).abs().max() <= 1e-5
        seen = []
        h = model.backbone.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        topk_forward(model, x, model.schedule.patch_counts)
        h.remove()
    assert seen == [1 + model.schedule.patch_counts[-1]]


def test_topk_keeps_the_patches_the_class_token_attends_to_most():
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.5, num_classes=3).eval()
    blk = model.backbone.blocks[model.schedule.first_block - 1]
    kept = []
    nxt = model.backbone.blocks[model.schedule.first_block]
    h = nxt.register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        topk_forward(model, x, (1, 1, 1) if len(model.schedule.stage_starts) == 3 else (1,) * 2)
        # recompute the class-token attention of the block before the first stage by hand
        t = model.first_blocks(x)  # output of blocks 0..K-1; we need the input of block K-1
        inp = model.embed(x)
        for b in model.backbone.blocks[: model.schedule.first_block - 1]:
            inp = b(inp)
        a = blk.attn
        q, k, _ = a.qkv(blk.norm1(inp)).reshape(1, inp.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        att = ((a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-2, -1)).softmax(-1).mean(1)[0, 0, 1:]
    h.remove()
    best = int(att.argmax())
    assert torch.allclose(kept[0][0, 1], t[0, 1 + best], atol=1e-6)


def test_bench_cli_prints_one_json_object(capsys):
    rc = main(["bench", "--backbone", "vit_nano_patch8_32", "--batch-size", "2", "--rounds", "1",
               "--warmup", "0", "--json", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in out["variants"]] == ["dense", "life", "oracle", "topk"]
    for v in out["variants"]:
        assert v["images_per_s"] > 0 and v["gflops"] > 0
    g = {v["name"]: v["gflops"] for v in out["variants"]}
    assert g["oracle"] < g["life"] < g["dense"]


def test_served_bench_times_the_engine_beside_dense(capsys, tmp_path):
    from model import save_checkpoint
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=3).eval()
    model.calibrate(torch.randn(32, 3, 32, 32))  # budgets vary per image: several tail calls
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert main(["bench", "--served", "--checkpoint", str(ckpt), "--batch-size", "8", "--rounds", "2",
                 "--warmup", "1", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in out["variants"]]
    assert names == ["dense", "served"] and out["dtype"] == "float32" and out["graphs"]["enabled"] is False
    served = out["variants"][1]
    assert served["ms_per_batch"] > 0 and 0 < served["gflops"] <= out["variants"][0]["gflops"]
    assert out["buckets"] >= 2 and out["buckets_per_batch"] >= 1


def test_served_bench_calibrates_a_random_model_so_batches_hold_several_buckets(capsys):
    assert main(["bench", "--served", "--calibrated", "--backbone", "vit_nano_patch8_32", "--batch-size", "32",
                 "--rounds", "1", "--warmup", "0", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["normalization"] == "calibrated" and out["buckets_per_batch"] >= 2
    served, dense = out["variants"][1], out["variants"][0]
    assert served["ms_per_batch"] > 0 and 0 < served["gflops"] < dense["gflops"]
    assert main(["bench", "--calibrated", "--backbone", "vit_nano_patch8_32"]) == 2  # --served only
