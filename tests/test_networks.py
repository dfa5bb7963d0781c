"""Tests for ectune.networks: EDM state-dict compatibility, shapes, layer maths and shared dropout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import skip_without_reference
from ectune.errors import ConfigError
from ectune.networks import MLP, MNIST_CONFIG, NETWORKS, SongUNet, build_network, record_dropout, replay_dropout
from ectune.networks import songunet as songunet_module
from ectune.networks.dropout import SharedDropout
from ectune.networks.songunet import Conv2d, FourierEmbedding, PositionalEmbedding, UNetBlock

REFERENCE = Path(__file__).parents[2] / "shared" / "reference" / "edm_songunet_param_shapes.json"

# EDM's --arch=ddpmpp CIFAR-10 network (EDMPrecond stores it as `.model`).
CIFAR_DDPMPP = dict(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9, model_channels=128,
                    channel_mult=[2, 2, 2], dropout=0.13)
# A tiny 28x28 network (28 -> 14 -> 7) for fast dropout and shape tests.
TINY_MNIST = dict(img_resolution=28, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2, 2],
                  num_blocks=1, attn_resolutions=[7], dropout=0.3)


def _reference() -> dict:
    skip_without_reference(REFERENCE)
    return json.loads(REFERENCE.read_text())


def _randomize(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that near-zero-initialised layers (conv1, proj, output) matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return net


def _inputs(n: int, shape: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen), torch.randn(n, generator=gen)


@pytest.fixture(scope="module")
def cifar_nets() -> dict[str, SongUNet]:
    torch.manual_seed(0)
    return {
        "ddpmpp_cifar10_uncond": SongUNet(**CIFAR_DDPMPP).eval(),
        "ddpmpp_cifar10_cond": SongUNet(**CIFAR_DDPMPP, label_dim=10).eval(),
    }


# ---------------------------------------------------------------------------------------------
# EDM compatibility


@pytest.mark.parametrize("config", ["ddpmpp_cifar10_uncond", "ddpmpp_cifar10_cond"])
def test_state_dict_matches_edm_reference(cifar_nets, config):
    expected = [(key, list(shape)) for key, shape in _reference()[config]]
    net = cifar_nets[config]
    got = [("model." + key, list(value.shape)) for key, value in net.state_dict().items()]
    missing = sorted(set(dict(expected)) - set(dict(got)))
    extra = sorted(set(dict(got)) - set(dict(expected)))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert dict(got) == dict(expected)
    assert got == expected  # same order too
    # Resample filters are buffers in the state dict; they must hold the normalised 2x2 box filter.
    fir = net.state_dict()["enc.16x16_down.conv0.resample_filter"]
    assert torch.equal(fir, torch.full((1, 1, 2, 2), 0.25))


def test_edm_shaped_state_dict_loads_strictly():
    """A state dict built only from the reference shapes loads with strict=True and is used."""
    shapes = _reference()["ddpmpp_cifar10_cond"]
    gen = torch.Generator().manual_seed(3)
    state = {key.removeprefix("model."): torch.randn(shape, generator=gen) * 0.02 for key, shape in shapes}
    state = {k: (torch.full(v.shape, 0.25) if k.endswith("resample_filter") else v) for k, v in state.items()}
    net = SongUNet(**CIFAR_DDPMPP, label_dim=10)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.dec.get_submodule("32x32_aux_conv").weight, state["dec.32x32_aux_conv.weight"])


def test_cifar_forward_shapes_and_labels(cifar_nets):
    x, sigma = _inputs(2, (3, 32, 32))
    noise = sigma.abs().log() / 4
    with torch.no_grad():
        out = cifar_nets["ddpmpp_cifar10_uncond"](x[:1], noise[:1], augment_labels=torch.zeros(1, 9))
        assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
        cond = _randomize(cifar_nets["ddpmpp_cifar10_cond"], std=0.01)  # EDM's init nearly hides labels
        labels = torch.tensor([3, 7])
        by_index = cond(x, noise, labels)
        by_onehot = cond(x, noise, F.one_hot(labels, 10).float())
        other = cond(x, noise, torch.tensor([4, 7]))
    assert by_index.shape == (2, 3, 32, 32)
    torch.testing.assert_close(by_index, by_onehot, rtol=0, atol=0)
    # The label must change sample 0 only (samples do not interact).
    assert (other[0] - by_index[0]).abs().max() > 1e-3
    torch.testing.assert_close(other[1], by_index[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Small configurations and NCSN++ options


def test_mnist_config_forward_backward_and_size():
    torch.manual_seed(0)
    net = SongUNet(**MNIST_CONFIG)
    n_params = sum(p.numel() for p in net.parameters())
    assert 2_000_000 <= n_params <= 6_000_000
    assert f"{n_params:,}" in songunet_module.__doc__, "update the parameter count in the module docstring"
    assert (net.img_resolution, net.img_channels, net.label_dim) == (28, 1, 0)
    x, noise = _inputs(2, (1, 28, 28))
    out = net(x, noise)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.map_layer0.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", [[7], [14], [28, 7], []])
def test_mnist_attention_resolutions(attn):
    net = _randomize(SongUNet(**{**TINY_MNIST, "attn_resolutions": attn}))
    blocks_with_attention = {name for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}
    assert "dec.7x7_in0" in blocks_with_attention  # the bottleneck always attends
    for res in (28, 14):
        assert any(name.split(".")[1].startswith(f"{res}x{res}") for name in blocks_with_attention) == (res in attn)
    x, noise = _inputs(3, (1, 28, 28))
    with torch.no_grad():
        assert net(x, noise).shape == x.shape


@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
@pytest.mark.parametrize("decoder_type", ["standard", "skip"])
def test_ncsnpp_options(encoder_type, decoder_type):
    torch.manual_seed(0)
    net = SongUNet(img_resolution=16, in_channels=3, out_channels=2, label_dim=4, model_channels=16,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], embedding_type="fourier",
                   channel_mult_noise=2, encoder_type=encoder_type, decoder_type=decoder_type,
                   resample_filter=[1, 3, 3, 1], dropout=0.1)
    state = net.state_dict()
    assert state["map_noise.freqs"].shape == (16,)
    assert state["enc.8x8_down.conv0.resample_filter"].shape == (1, 1, 4, 4)
    assert ("enc.8x8_aux_residual.weight" in state) == (encoder_type == "residual")
    assert ("enc.8x8_aux_down.resample_filter" in state) == (encoder_type == "skip")
    assert ("dec.8x8_aux_up.resample_filter" in state) == (decoder_type == "skip")
    assert ("dec.4x4_aux_conv.weight" in state) == (decoder_type == "skip")
    _randomize(net)
    x, noise = _inputs(2, (3, 16, 16))
    out = net(x, noise, torch.tensor([0, 3]))
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()


def test_resolution_that_cannot_be_halved_is_rejected():
    with pytest.raises(ConfigError, match="img_resolution=28"):
        SongUNet(img_resolution=28, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2, 2, 2])
    with pytest.raises(ConfigError, match="encoder_type"):
        SongUNet(img_resolution=16, in_channels=1, out_channels=1, encoder_type="fancy")


# ---------------------------------------------------------------------------------------------
# Layer maths


def test_box_filter_resampling_is_average_pool_and_nearest_upsample():
    x = torch.randn(2, 3, 14, 14)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert down(x[:, :, :7, :7]).shape[-1] == 3  # odd sizes floor, which is why 7x7 is the last level


@pytest.mark.parametrize("fused", [False, True])
def test_fir_resampling_preserves_constants_and_shapes(fused):
    x = torch.ones(1, 2, 16, 16)
    down = Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    up = Conv2d(2, 2, kernel=0, up=True, resample_filter=[1, 3, 3, 1])
    torch.testing.assert_close(down(x)[..., 1:-1, 1:-1], torch.ones(1, 2, 6, 6))
    torch.testing.assert_close(up(x)[..., 2:-2, 2:-2], torch.ones(1, 2, 28, 28))
    # With weights, an averaging 3x3 kernel keeps constants too (away from the zero-padded border).
    for direction, size in (("down", 8), ("up", 32)):
        conv = Conv2d(2, 2, kernel=3, resample_filter=[1, 3, 3, 1], fused_resample=fused, **{direction: True})
        with torch.no_grad():
            conv.weight.copy_(torch.eye(2)[:, :, None, None].expand(2, 2, 3, 3) / 9)
            conv.bias.zero_()
        y = conv(x)
        assert y.shape == (1, 2, size, size)
        torch.testing.assert_close(y[..., 3:-3, 3:-3], torch.ones_like(y[..., 3:-3, 3:-3]))


def test_attention_matches_slow_reference():
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=2, attn_init_weight=1.0)
    x = torch.randn(3, 16, 5, 5)
    got = block._attend(x)
    # Reference: qkv channels are laid out as [head, channel, (q, k, v)].
    qkv = block.qkv(x).reshape(3 * 2, 8, 3, 25)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(8), dim=2)
    expected = torch.einsum("nqk,nck->ncq", weights, v).reshape(3, 16, 5, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_embeddings():
    emb = PositionalEmbedding(8, endpoint=True)
    out = emb(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(out[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # endpoint=True: frequencies 1, 10000^(-1/3), ..., exactly 1/10000.
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)])
    torch.testing.assert_close(out[1], torch.cat([(2 * freqs).cos(), (2 * freqs).sin()]))
    fourier = FourierEmbedding(6)
    y = fourier(torch.tensor([0.25]))
    torch.testing.assert_close(y[0, :3], (0.5 * math.pi * fourier.freqs).cos())
    with pytest.raises(ConfigError):
        PositionalEmbedding(7)


def test_songunet_conditioning_inputs():
    """The mapping network sees [sin, cos] of the noise label (EDM's order), one-hot labels scaled by
    sqrt(label_dim) and the augmentation labels."""
    net = SongUNet(**{**TINY_MNIST, "label_dim": 10, "augment_dim": 9})
    seen = {}
    for name in ("map_layer0", "map_label", "map_augment"):
        getattr(net, name).register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
    x, _ = _inputs(2, (1, 28, 28))
    augment = torch.randn(2, 9)
    with torch.no_grad():
        net(x, torch.zeros(2), torch.tensor([1, 9]), augment_labels=augment)
    half = net.map_noise.num_channels // 2
    assert torch.equal(seen["map_label"], F.one_hot(torch.tensor([1, 9]), 10).float() * math.sqrt(10))
    assert torch.equal(seen["map_augment"], augment)
    expected = torch.cat([torch.zeros(2, half), torch.ones(2, half)], dim=1)  # sin(0), cos(0)
    expected = expected + net.map_label(seen["map_label"]) + net.map_augment(augment)
    torch.testing.assert_close(seen["map_layer0"], expected)


def test_unet_block_formula():
    """DDPM++ block: y = (conv1(silu(norm1(conv0(silu(norm0(x))) + affine(emb)))) + skip(x)) / sqrt(2)."""
    torch.manual_seed(0)
    block = _randomize(UNetBlock(8, 16, emb_channels=12, down=True, skip_scale=math.sqrt(0.5),
                                 resample_proj=True, adaptive_scale=False, init_mode="xavier_uniform"))
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    h = block.conv0(F.silu(block.norm0(x)))
    h = F.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    expected = (block.conv1(h) + block.skip(x)) * math.sqrt(0.5)
    torch.testing.assert_close(block.eval()(x, emb), expected)
    assert expected.shape == (2, 16, 3, 3)


# ---------------------------------------------------------------------------------------------
# Shared dropout


def _dropout_case(net: torch.nn.Module, n: int, shape: tuple[int, ...], **kwargs):
    x, noise = _inputs(n, shape)
    net.train()
    with torch.no_grad():
        with record_dropout(torch.Generator().manual_seed(10)) as masks:
            recorded = net(x, noise, **kwargs)
        with replay_dropout(masks):
            replayed = net(x, noise, **kwargs)
        index = torch.tensor([3, 0])
        sub_kwargs = {k: v[index] for k, v in kwargs.items()}
        with replay_dropout(masks, index):
            subset = net(x[index], noise[index], **sub_kwargs)
        with replay_dropout(masks, index.flip(0)):
            wrong = net(x[index], noise[index], **sub_kwargs)
        with record_dropout(torch.Generator().manual_seed(11)):
            other_seed = net(x, noise, **kwargs)
        with record_dropout(torch.Generator().manual_seed(10)):
            same_seed = net(x, noise, **kwargs)
    return masks, recorded, replayed, subset, wrong, other_seed, same_seed, index


@pytest.mark.parametrize("network", ["songunet", "songunet_labels", "mlp"])
def test_dropout_record_and_replay(network):
    torch.manual_seed(0)
    if network == "songunet":
        net, shape, kwargs = SongUNet(**TINY_MNIST), (1, 28, 28), {}
        n_layers = sum(isinstance(m, UNetBlock) for m in net.modules())
    elif network == "songunet_labels":
        net = SongUNet(**{**TINY_MNIST, "label_dim": 10, "label_dropout": 0.5})
        shape, kwargs = (1, 28, 28), {"class_labels": torch.arange(4)}
        n_layers = sum(isinstance(m, UNetBlock) for m in net.modules()) + 1  # + label dropout
    else:
        net, shape, kwargs = MLP(dim=2, hidden_dim=32, num_blocks=3, dropout=0.3), (2,), {}
        n_layers = 3
    _randomize(net)
    masks, recorded, replayed, subset, wrong, other_seed, same_seed, index = _dropout_case(net, 4, shape, **kwargs)
    assert len(masks) == n_layers
    assert torch.equal(recorded, replayed)
    assert torch.equal(recorded, same_seed)  # masks come from the generator, not the global RNG
    assert (recorded - other_seed).abs().max() > 1e-3
    # Rows of an indexed replay are the full replay's rows (same masks, samples independent), up
    # to float rounding: oneDNN may pick another convolution algorithm for another batch size.
    torch.testing.assert_close(subset, replayed[index], rtol=1e-4, atol=1e-5)
    assert (wrong - replayed[index]).abs().max() > 1e-3  # ...and the index really selects the masks


@pytest.mark.parametrize("network", ["songunet", "mlp"])
def test_eval_mode_ignores_dropout(network):
    torch.manual_seed(0)
    net = SongUNet(**TINY_MNIST) if network == "songunet" else MLP(dim=2, hidden_dim=32, dropout=0.3)
    _randomize(net).eval()
    x, noise = _inputs(3, (1, 28, 28) if network == "songunet" else (2,))
    with torch.no_grad():
        plain = net(x, noise)
        with record_dropout(torch.Generator().manual_seed(0)) as masks:
            inside = net(x, noise)
        net.train()
        training = net(x, noise)
    assert len(masks) == 0
    assert torch.equal(plain, inside)
    assert (training - plain).abs().max() > 1e-3


def test_every_dropout_is_shared_dropout():
    for net in (SongUNet(**TINY_MNIST), MLP(dropout=0.1)):
        assert not any(isinstance(m, torch.nn.Dropout) for m in net.modules())
        assert any(isinstance(m, SharedDropout) and m.p > 0 for m in net.modules())


# ---------------------------------------------------------------------------------------------
# MLP


def test_mlp_forward():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden_dim=32, num_blocks=2, label_dim=3)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (0, 2, 3)
    x, noise = _inputs(5, (2,))
    assert torch.equal(net(x, noise), torch.zeros(5, 2))  # zero-initialised output layer
    _randomize(net)
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = net(x, noise, labels)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out, net(x, noise, F.one_hot(labels, 3).float()))
    assert not torch.allclose(out, net(x, noise, (labels + 1) % 3))
    out.square().sum().backward()
    assert net.inp.weight.grad.abs().sum() > 0
    flat = MLP(dim=16, hidden_dim=32, num_blocks=1)
    _randomize(flat)
    images, noise = _inputs(3, (1, 4, 4))
    assert flat(images, noise).shape == (3, 1, 4, 4)
    with pytest.raises(ValueError, match="dim=16"):
        flat(torch.randn(3, 5), noise)


# ---------------------------------------------------------------------------------------------
# Registry


def test_build_network():
    assert {"songunet", "mlp", "edm2unet"} <= set(NETWORKS)
    assert isinstance(build_network("mlp", dim=3, hidden_dim=16), MLP)
    net = build_network("songunet", **TINY_MNIST)
    assert isinstance(net, SongUNet)
    with pytest.raises(ConfigError) as info:
        build_network("unet3000")
    message = str(info.value)
    assert "\n" not in message and "songunet" in message and "mlp" in message and "unet3000" in message
    with pytest.raises(ConfigError, match="'channels'"):
        build_network("songunet", **TINY_MNIST, channels=3)
    with pytest.raises(ConfigError, match="'img_resolution'"):
        build_network("songunet", in_channels=1, out_channels=1)
    # label_dim / augment_dim None (as some recorded configs have them) mean 0, as they always did
    assert build_network("songunet", **TINY_MNIST, label_dim=None, augment_dim=None).label_dim == 0


@pytest.mark.parametrize("network, change, message", [
    ("songunet", {"dropout": 1.5}, "dropout probability must be in [0, 1)"),
    ("songunet", {"num_blocks": -1}, "num_blocks=-1 must be an integer >= 1"),
    ("songunet", {"model_channels": 16.0}, "model_channels=16.0 must be an integer >= 1"),
    ("songunet", {"channel_mult": [1, 2.5, 2]}, "channel_mult=[1, 2.5, 2] must be a list of integers >= 1"),
    ("songunet", {"attn_resolutions": None}, "attn_resolutions=None must be a list of integers >= 0"),
    ("songunet", {"channel_mult": "1,2"}, "channel_mult='1,2' must be a list of integers >= 1"),
    ("songunet", {"dropout": "0.1"}, "dropout probability must be in [0, 1), got '0.1'"),
    ("edm2unet", {"channel_mult": 2}, "channel_mult=2 must be a list of integers >= 1"),
    ("edm2unet", {"channels_per_head": 0}, "channels_per_head=0 must be an integer >= 1"),
    ("edm2unet", {"num_blocks": True}, "num_blocks=True"),
])
def test_bad_network_options_are_one_config_error(network, change, message):
    """Options the constructors cannot take (from --network.kwargs or a converted checkpoint's recorded
    kwargs) raise ConfigError naming the option, not a ValueError, TypeError or ZeroDivisionError."""
    base = TINY_MNIST if network == "songunet" else dict(img_resolution=16, img_channels=3, model_channels=16,
                                                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    with pytest.raises(ConfigError) as info:
        build_network(network, **{**base, **change})
    assert message in str(info.value) and "\n" not in str(info.value)
