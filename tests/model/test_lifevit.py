"""LifeViT against timm (the reference no one here wrote) and against its own masked path."""

import pytest
import timm
import torch

from model import create_lifevit
from model.lifevit import HeadState

# Real timm architectures, shrunk (img_size/depth) where that keeps the test fast; the feature
# variants exercise LayerScale, q/k norms and register tokens (num_prefix_tokens > 1).
VARIANTS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_patch16_224", {"img_size": 112}),
    ("vit_small_patch16_224", {"img_size": 96}),
    ("vit_base_patch16_224", {"img_size": 64, "depth": 6}),
    ("vit_tiny_patch16_224", {"img_size": 64, "init_values": 1e-2, "qk_norm": True, "reg_tokens": 2}),
]


def _model(name, kwargs, keep_rate=0.7, seed=0):
    torch.manual_seed(seed)
    return create_lifevit(name, keep_rate, num_classes=7, **kwargs).eval()


def _images(model, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = model.backbone.patch_embed.img_size
    return torch.randn(n, 3, h, w, generator=g)


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_no_pruning_equals_timm(name, kwargs):
    model = _model(name, kwargs, keep_rate=1.0)
    x = _images(model)
    with torch.no_grad():
        ref = model.backbone(x)  # timm's own forward, same weights
        assert (model(x) - ref).abs().max() <= 1e-5
        zeros = torch.zeros(model.depth - model.schedule.first_block, 2, model.num_patches)
        assert (model.forward_weighted(x, zeros) - ref).abs().max() <= 1e-5  # unit weights: softmax


def test_zero_weight_equals_removing_the_key():
    model = _model("vit_tiny_patch16_224", {"img_size": 64, "qk_norm": True})
    attn = model.backbone.blocks[5].attn
    x = torch.randn(2, 17, model.backbone.embed_dim)
    drop = [3, 9, 16]
    bias = torch.zeros(2, 1, 1, 17)
    bias[..., drop] = float("-inf")
    keep = [i for i in range(17) if i not in drop]
    with torch.no_grad():
        masked = attn(x, attn_mask=bias)[:, keep]
        removed = attn(x[:, keep])
    assert (masked - removed).abs().max() <= 1e-5
    w = torch.rand(2, 17) + 0.1  # and a general weight is softmax(a + log w)
    with torch.no_grad():
        attn.fused_attn = False
        b = w.log()[:, None, None, :]
        q, k, _ = attn.qkv(x).reshape(2, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = (q * attn.scale) @ k.transpose(-2, -1)
        weighted = w[:, None, None, :] * a.exp() / (w[:, None, None, :] * a.exp()).sum(-1, keepdim=True)
        assert torch.allclose((a + b).softmax(-1), weighted, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", VARIANTS[3:], ids=[v[0] for v in VARIANTS[3:]])
def test_hard_pruning_equals_masked_path_with_01_masks(name, kwargs):
    model = _model(name, kwargs, keep_rate=0.5)
    x = _images(model, n=3)
    sched, k = model.schedule, model.schedule.first_block
    with torch.no_grad():
        scores = model.head(x).scores
        rank = scores.argsort(1, descending=True).argsort(1)  # rank of each patch by life
        log_w = torch.zeros(model.depth - k, *scores.shape)
        for j in range(model.depth - k):
            kept = rank < sched.patch_counts[sched.stage_of_block(k + j)]
            log_w[j][~kept] = float("-inf")
        assert (model(x) - model.forward_weighted(x, log_w)).abs().max() <= 1e-4


def test_tail_sees_the_schedule_counts_and_keeps_the_class_token():
    model = _model("vit_tiny_patch16_224", {"img_size": 64, "reg_tokens": 2})
    x = _images(model, n=2)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
             for i, b in enumerate(model.backbone.blocks)]
    with torch.no_grad():
        state = model.head(x)
        first = {i: v for i, v in seen.items()}
        model.tail(state.tokens, model.schedule.patch_counts)
    for h in hooks:
        h.remove()
    t, sched = model.num_prefix_tokens, model.schedule
    assert t == 3
    for i in range(model.depth):
        stage = sched.stage_of_block(i)
        expect = t + (model.num_patches if stage is None else sched.patch_counts[stage])
        assert seen[i].shape[1] == expect
    # The block-K input starts with exactly the prefix tokens leaving block K-1.
    assert torch.equal(seen[sched.first_block][:, :t], state.tokens[:, :t])
    assert model.budgets(state.scores).tolist() == [list(sched.patch_counts)] * 2
    # patches are sorted by descending life
    order = state.scores.argsort(1, descending=True)
    assert torch.equal(state.scores.gather(1, order), state.scores.sort(1, descending=True).values)
    del first


def test_calibrated_budgets_vary_with_content_and_average_to_the_schedule():
    model = _model("vit_micro_patch8_64", {})
    g = torch.Generator().manual_seed(0)
    # images with different amounts of structure: scale noise per image
    calib = torch.randn(64, 3, 64, 64, generator=g) * torch.linspace(0.05, 3, 64)[:, None, None, None]
    model.calibrate(calib)
    assert model.normalization == "calibrated"
    with torch.no_grad():
        scores = model.head(calib).scores
    budgets = model.budgets(scores)
    assert len({tuple(b) for b in budgets.tolist()}) > 5, "budgets should differ between images"
    mean = budgets.float().mean(0)
    target = torch.tensor(model.schedule.patch_counts, dtype=torch.float32)
    assert ((mean - target).abs() <= 1.0).all(), (mean, target)  # quantile calibration: exact on average
    lives = model.lives(scores)
    assert lives.min() >= model.schedule.first_block and lives.max() <= model.depth
    assert torch.equal(budgets, (lives[..., None] > torch.tensor(model.schedule.stage_starts)).sum(1))


def test_calibrated_forward_runs_each_image_at_its_own_budget():
    model = _model("vit_micro_patch8_64", {})
    x = torch.randn(6, 3, 64, 64) * torch.linspace(0.1, 2, 6)[:, None, None, None]
    model.calibrate(x)
    with torch.no_grad():
        batch = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert (batch - singles).abs().max() <= 1e-5


def test_per_request_keep_rate_changes_counts_not_order():
    model = _model("vit_micro_patch8_64", {})
    with torch.no_grad():
        scores = model.head(torch.randn(2, 3, 64, 64)).scores
    a, b = model.schedule_for(0.5), model.schedule_for(0.9)
    assert a.stage_starts == b.stage_starts and a.patch_counts < b.patch_counts
    order = scores.argsort(dim=1, descending=True)
    for sched in (a, b):  # lives are monotone in the score whatever the keep rate
        lives = model.lives(scores, sched).gather(1, order)
        assert (lives[:, 1:] <= lives[:, :-1]).all()
        assert model.budgets(scores, sched).tolist() == [list(sched.patch_counts)] * 2


def test_rejects_backbones_it_cannot_slim():
    bb = timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        create_lifevit(bb)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_lifevit("resnet_but_not_really")
    with pytest.raises(ValueError, match="at least 4 blocks"):
        create_lifevit("vit_tiny_patch16_224", img_size=32, depth=3)
    assert isinstance(HeadState(torch.zeros(1), torch.zeros(1)), HeadState)


def test_at_is_a_view_with_another_schedule_and_normalization():
    torch.manual_seed(0)
    model = create_lifevit("vit_nano_patch8_32", 0.7, num_classes=3).eval()
    model.calibrate(torch.randn(16, 3, 32, 32))
    view = model.at(model.schedule_for(0.5), "per_image")
    assert view.schedule.keep_rate == 0.5 and view.normalization == "per_image"
    assert model.schedule.keep_rate == 0.7 and model.normalization == "calibrated"  # the model is left alone
    assert view.backbone is model.backbone and view.life is model.life  # same modules and weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model.at(normalization="per_image")(x, model.schedule_for(0.5)))
