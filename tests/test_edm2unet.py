"""Tests for ectune.networks.edm2unet: EDM2 state-dict compatibility, magnitude preservation,
weight normalisation in training and evaluation, shapes and shared dropout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import skip_without_reference
from ectune.errors import ConfigError
from ectune.networks import NETWORKS, build_network, record_dropout, replay_dropout
from ectune.networks.edm2unet import Block, EDM2UNet, MPConv, MPFourier, UNet, mp_cat, mp_silu, mp_sum, normalize
from ectune.precond import Denoiser

REFERENCE = Path(__file__).parents[2] / "shared" / "reference" / "edm2_unet_param_shapes.json"

TINY = dict(img_resolution=16, img_channels=3, label_dim=5, model_channels=16, channel_mult=[1, 2, 3],
            num_blocks=1, attn_resolutions=[8, 4], channels_per_head=8)


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every saved tensor, so zero-initialised gains (out_gain, emb_gain) matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen))
    return net


def _magnitude(x: torch.Tensor) -> float:
    return float(x.detach().square().mean().sqrt())


# ----------------------------------------------------------------------------------------------
# Compatibility with published EDM2 checkpoints


def test_img64_s_keys_and_shapes_equal_edm2():
    skip_without_reference(REFERENCE)
    reference = json.loads(REFERENCE.read_text())["edm2_img64_s"]
    with torch.device("meta"):  # 280M parameters: shapes only
        net = build_network("edm2unet", img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                            channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == reference
    buffers = sum(b.numel() for b in net.buffers() if b.ndim == 1)  # the Fourier freqs and phases
    assert sum(p.numel() for p in net.parameters()) + buffers == sum(math.prod(s) for _, s in reference)


def test_registered_and_defaults_are_edm2_img64_s():
    assert NETWORKS["edm2unet"] is EDM2UNet
    with torch.device("meta"):
        default = EDM2UNet(img_resolution=64, img_channels=3, label_dim=1000)
        explicit = EDM2UNet(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                            channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in (default, explicit)]
    assert shapes[0] == shapes[1]


def test_no_logvar_head_and_unconditional_drop_their_keys():
    net = EDM2UNet(**{**TINY, "label_dim": 0}, logvar_channels=0)
    keys = set(net.state_dict())
    assert not any(k.startswith("logvar_") for k in keys) and "unet.emb_label.weight" not in keys
    with pytest.raises(ConfigError, match="uncertainty head"):
        net.logvar(torch.zeros(2))
    assert EDM2UNet(**TINY, logvar_channels=4).logvar(torch.randn(3)).shape == (3,)


def test_resampling_filter_is_not_saved():
    net = EDM2UNet(**TINY, resample_filter=[1, 3, 3, 1])
    assert "unet.enc.8x8_down.resample_filter" in dict(net.named_buffers())
    assert not any("resample_filter" in k for k in net.state_dict())


# ----------------------------------------------------------------------------------------------
# Magnitude-preserving operations (EDM2 section 3)


def test_normalize_gives_unit_magnitude_rows_and_pixels():
    x = torch.randn(6, 7, 5, 5) * (1 + torch.rand(6, 1, 1, 1) * 10)  # rms >= 1: eps = 1e-4 is negligible
    rows = normalize(x)
    torch.testing.assert_close(rows.square().mean(dim=(1, 2, 3)), torch.ones(6), rtol=1e-3, atol=0)
    pixels = normalize(x, dim=1)
    torch.testing.assert_close(pixels.square().mean(dim=1), torch.ones(6, 5, 5), rtol=1e-3, atol=0)
    # Idempotent up to eps, and scale invariant.
    torch.testing.assert_close(normalize(rows), rows, rtol=1e-3, atol=0)
    torch.testing.assert_close(normalize(x * 100), normalize(x), rtol=2e-4, atol=1e-6)


def test_mp_sum_and_mp_cat_preserve_unit_magnitude():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 200_000, generator=gen)
    for t in (0.0, 0.3, 0.5, 0.8, 1.0):
        assert _magnitude(mp_sum(a, b, t)) == pytest.approx(1.0, abs=0.01)
    torch.testing.assert_close(mp_sum(a, b, 0.0), a)
    # mp_cat: unit magnitude whatever the channel split, and the requested per-tensor balance.
    x = torch.randn(64, 3, 40, 40, generator=gen)
    y = torch.randn(64, 17, 40, 40, generator=gen)
    for t in (0.3, 0.5, 0.7):
        out = mp_cat(x, y, t=t)
        assert out.shape == (64, 20, 40, 40)
        assert _magnitude(out) == pytest.approx(1.0, abs=0.01)
        share_x = out[:, :3].square().sum() / out.square().sum()
        assert float(share_x) == pytest.approx((1 - t) ** 2 / ((1 - t) ** 2 + t ** 2), abs=0.01)


def test_mp_silu_of_standard_normal_has_unit_magnitude():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(1))
    assert _magnitude(mp_silu(x)) == pytest.approx(1.0, abs=0.01)


def test_mp_fourier_features_have_unit_magnitude():
    emb = MPFourier(4096)
    out = emb(torch.randn(64))
    assert out.shape == (64, 4096)
    assert _magnitude(out) == pytest.approx(1.0, abs=0.02)


def test_mpconv_effective_weight_rows_have_norm_gain():
    layer = MPConv(32, 8, kernel=[])
    with torch.no_grad():
        layer.weight.mul_(torch.rand(8, 1) * 10)  # rows of very different norms
    for gain in (1.0, 0.25):
        eff = layer(torch.eye(32), gain=gain).T  # [out, in]: the weight actually applied
        torch.testing.assert_close(eff.norm(dim=1), torch.full((8,), gain), rtol=1e-3, atol=0)
    conv = MPConv(4, 6, kernel=[3, 3])
    x = torch.randn(256, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert _magnitude(conv(x)[:, :, 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.1)


def test_attention_matches_the_written_out_formula():
    """Block._attend (fused attention) against softmax(q^T k / sqrt(c)) v written out per head, with the
    qkv channels laid out [head, channel, (q, k, v)] and q, k, v pixel-normalised per head."""
    block = _randomize(Block(16, 16, emb_channels=4, attention=True, channels_per_head=8), seed=5)
    x = torch.randn(2, 16, 3, 5)
    qkv = block.attn_qkv(x).reshape(2, 2, 8, 3, 15)  # [N, heads, channels, (q, k, v), positions]
    q, k, v = (normalize(qkv[:, :, :, i], dim=2) for i in range(3))
    weights = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(8), dim=-1)
    expected = torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(2, 16, 3, 5)
    torch.testing.assert_close(block._attend(x), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Weight normalisation: forced in training passes with gradients, never otherwise


def test_forced_weight_normalisation_only_in_training_passes_with_gradients():
    net = _randomize(EDM2UNet(**TINY), seed=1)
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    weight = net.unet.enc["16x16_block0"].conv_res0.weight
    before = weight.detach().clone()
    assert not torch.allclose(normalize(before), before, rtol=1e-2)  # random rows are not unit-magnitude

    net.eval()
    reference = net(x, noise)
    assert torch.equal(weight, before)
    net.train()
    with torch.no_grad():
        out_nograd = net(x, noise)
    assert torch.equal(weight, before)  # no-grad passes (the ECT target pass) leave weights alone
    out_train = net(x, noise)
    torch.testing.assert_close(weight.detach(), normalize(before), rtol=0, atol=1e-6)  # projected in place
    # The projection changes nothing the pass computes beyond eps = 1e-4 in the norms: the output uses
    # normalised weights anyway.
    scale = float(reference.detach().abs().max())
    torch.testing.assert_close(out_train, reference, rtol=0, atol=2e-3 * scale)
    torch.testing.assert_close(out_nograd, reference, rtol=0, atol=1e-6 * scale)
    conv = net.unet.enc["16x16_block0"].conv_res0
    conv.force_wn = False
    with torch.no_grad():
        conv.weight.mul_(3)
    net(x, noise)
    torch.testing.assert_close(conv.weight.detach(), 3 * normalize(before), rtol=1e-5, atol=1e-6)


def test_weight_scale_does_not_change_the_function():
    """Weight normalisation: scaling any stored weight changes outputs only through eps = 1e-4."""
    layer = MPConv(5, 4, kernel=[3, 3])
    x = torch.randn(2, 5, 6, 6)
    out = layer(x)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([7.0, 0.5, 30.0, 2.0])[:, None, None, None])
    torch.testing.assert_close(layer(x), out, rtol=2e-4, atol=1e-6)

    net = _randomize(EDM2UNet(**TINY), seed=2).eval()
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(5)[[1, 4]]
    out = net(x, noise, labels)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".weight"):
                p.mul_(7.0)
    torch.testing.assert_close(net(x, noise, labels), out, rtol=0, atol=5e-3 * float(out.detach().abs().max()))


def test_student_then_no_grad_target_then_backward():
    """ECT's pattern: student pass with gradients, target pass (training mode, no grad) with the same
    dropout masks, then backward: the target pass must not invalidate the student's graph."""
    net = _randomize(EDM2UNet(**TINY, dropout=0.3), seed=3).train()
    x, noise = torch.randn(4, 3, 16, 16), torch.randn(4)
    gen = torch.Generator().manual_seed(0)
    with record_dropout(gen) as masks:
        student = net(x, noise)
    assert len(masks) > 0
    with torch.no_grad(), replay_dropout(masks):
        target = net(x, noise)
    torch.testing.assert_close(student.detach(), target, rtol=1e-5, atol=1e-5)  # same masks, same weights
    (student - target).square().sum().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("logvar_"))


def test_dropout_res_limits_dropout_to_low_resolutions():
    net = EDM2UNet(**TINY, dropout=0.4, dropout_res=8)
    probs = {name: block.drop.p for name, block in [*net.unet.enc.items(), *net.unet.dec.items()]
             if hasattr(block, "drop")}
    assert probs["16x16_block0"] == 0.0 and probs["16x16_block1"] == 0.0
    assert probs["8x8_down"] == 0.4 and probs["4x4_in0"] == 0.4 and probs["8x8_up"] == 0.4
    assert {p for n, p in probs.items() if not n.startswith("16x16")} == {0.4}


def test_tuning_an_edm2_teacher_with_the_imagenet_preset_drops_out_at_16x16_and_below(tmp_path):
    """ECT ImageNet 64 uses dropout 0.4 only at resolutions <= 16 (DESIGN.md). A converted EDM2 teacher
    records no dropout_res; the preset's network kwargs lay it over the teacher's options (a review
    found dropout at every resolution, and --network.kwargs ignored when tuning)."""
    import dataclasses

    from ectune import config as C
    from ectune.checkpoint import ModelInfo, save_model
    from ectune.data import ArrayDataset
    from ectune.errors import CheckpointError
    from ectune.training import network_info

    kw = {**TINY, "img_resolution": 32}  # levels 32, 16, 8
    save_model(tmp_path / "teacher", EDM2UNet(**kw), ModelInfo("edm2unet", kw, 0.5, "edm", 0.002, "edm", (3, 32, 32),
                                                               5, 1.526, {}))
    cfg = dataclasses.replace(C.preset("imagenet64-s", "ect"), teacher=str(tmp_path / "teacher"))
    data = ArrayDataset("imagenet64", torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 5)
    net, info, _ = network_info(cfg, data)
    probs = {name: block.drop.p for name, block in [*net.unet.enc.items(), *net.unet.dec.items()]
             if hasattr(block, "drop")}
    assert info.kwargs["dropout_res"] == 16 and info.kwargs["dropout"] == 0.4
    assert {p for n, p in probs.items() if n.startswith("32x32")} == {0.0}
    assert {p for n, p in probs.items() if not n.startswith("32x32")} == {0.4}
    wider = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, kwargs={"model_channels": 32}))
    with pytest.raises(CheckpointError, match="--network.kwargs model_channels laid over .*: drop those that change"):
        network_info(wider, data)


def test_the_imagenet_presets_edm2_options_are_not_forced_on_a_teacher_of_another_architecture(tmp_path):
    """imagenet64-s sets EDM2's dropout_res. A SongUNet teacher tuned with that preset failed with
    "network 'songunet' has no option 'dropout_res'", an option the user never passed; the preset's own
    option now stays with EDM2 teachers, while one the user sets is still passed on (and refused by name)."""
    import dataclasses

    from ectune import config as C
    from ectune.checkpoint import ModelInfo, save_model
    from ectune.data import ArrayDataset
    from ectune.networks import SongUNet
    from ectune.training import network_info

    kw = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, model_channels=8, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[])
    save_model(tmp_path / "teacher", SongUNet(**kw), ModelInfo("songunet", kw, 0.5, "edm", 0.002, "edm", (3, 16, 16),
                                                               5, 1.526, {}))
    cfg = dataclasses.replace(C.preset("imagenet64-s", "ect"), teacher=str(tmp_path / "teacher"))
    data = ArrayDataset("imagenet64", torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 5)
    net, info, _ = network_info(cfg, data)
    assert isinstance(net, SongUNet) and "dropout_res" not in info.kwargs and info.kwargs["dropout"] == 0.4
    # a value other than the preset's, or one set under a preset that has none, is the user's own
    for preset, value in (("imagenet64-s", 8), ("mnist", 16)):
        network = dataclasses.replace(cfg.network, kwargs={"dropout_res": value})
        mine = dataclasses.replace(cfg, preset=preset, network=network)
        with pytest.raises(ConfigError, match="network 'songunet' has no option 'dropout_res'"):
            network_info(mine, data)


# ----------------------------------------------------------------------------------------------
# Shapes and interface


def test_forward_shapes_labels_and_denoiser():
    net = _randomize(EDM2UNet(**TINY), seed=4).eval()
    x = torch.randn(3, 3, 16, 16)
    onehot = torch.eye(5)[[0, 2, 4]]
    out = net(x, torch.randn(3), onehot)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(net(x, torch.full((3,), 0.2), torch.tensor([0, 2, 4])),
                               net(x, torch.tensor(0.2), onehot))  # integer labels, scalar noise label
    assert not torch.allclose(net(x, torch.zeros(3), onehot), net(x, torch.zeros(3), None))
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 3, 5)
    denoiser = Denoiser(net, sigma_data=0.5, scalings="edm")
    with torch.no_grad():
        d = denoiser(x, torch.full((3,), 2.0), onehot)
    assert d.shape == x.shape
    unet = UNet(**{**TINY, "label_dim": 0})
    assert unet(x, torch.zeros(3)).shape == x.shape


def test_bad_configurations_raise_config_errors():
    with pytest.raises(ConfigError, match="halved"):
        build_network("edm2unet", img_resolution=18, img_channels=3, channel_mult=[1, 2, 2])
    with pytest.raises(ConfigError, match="attention heads"):  # 50 channels, 50 // 16 = 3 heads: not a split
        EDM2UNet(img_resolution=8, img_channels=3, model_channels=25, channel_mult=[1, 2], attn_resolutions=[4],
                 channels_per_head=16)
    with pytest.raises(ConfigError, match="resample_filter"):
        EDM2UNet(**TINY, resample_filter=[1, 2, 1])
    with pytest.raises(ConfigError, match="no option"):
        build_network("edm2unet", img_resolution=16, img_channels=3, block_kwargs={})
