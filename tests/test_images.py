"""Image flows: conv fields, squeeze, multiscale flow, logit transform, bits/dim, scripts."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import sample
import train
from helpers import prune
from cnf_prune.config import DataConfig, load_config
from cnf.conv import ConcatConv2d, ConvField
from cnf.data import make_data
from cnf.divergence import Exact
from cnf.fields import LayeredField
from cnf.errors import ConfigError, DataError
from cnf_prune.evaluate import evaluate
from cnf.base import standard_normal_log_prob
from cnf.images import ImageData, bits_per_dim, downsample, load_mnist, logit_inverse, logit_transform
from cnf_prune.build import build_model as build_flow
from cnf.multiscale import default_scales, scale_shapes, squeeze, unsqueeze
from pruning.masks import apply_masks, mask_buffer, prunable_weights, select_top
from pruning.scores import SCORERS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPHA = 1e-6


def image_config(*overrides: str):
    base = [
        "model.layer_type=concat", "model.nonlinearity=softplus", "model.hidden_dims=[6]",
        "model.num_blocks=1", "model.end_time=0.5", "model.train_end_time=false",
        "model.divergence=exact", "solver.rtol=1e-8", "solver.atol=1e-8", "solver.adjoint=false",
    ]
    return load_config(None, [*base, *overrides])


# --- squeeze and the multiscale layout ------------------------------------------


def test_squeeze_and_unsqueeze_are_exact_inverses():
    x = torch.randn(2, 3, 8, 6)
    s = squeeze(x)
    assert s.shape == (2, 12, 4, 3)
    assert torch.equal(unsqueeze(s), x)
    assert torch.equal(squeeze(unsqueeze(s)), s)
    # a permutation: every 2x2 patch lands in the channels of one position
    for i, j in ((0, 0), (3, 2), (1, 1)):
        patch = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten(1)
        assert torch.equal(patch.sort(1).values, s[:, :, i, j].sort(1).values)


def test_scale_shapes_follow_ffjord():
    assert default_scales((1, 28, 28)) == 3
    assert scale_shapes((1, 28, 28), 3) == [
        ((1, 28, 28), (4, 14, 14)), ((2, 14, 14), (8, 7, 7)), ((4, 7, 7), None),
    ]
    with pytest.raises(ConfigError, match="odd side"):
        scale_shapes((1, 28, 28), 4)


# --- conv layers and field -------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])  # one input channel takes the patch-product path on a CPU
@pytest.mark.parametrize("per_example", [False, True])
def test_concat_conv_and_its_gradients_equal_a_conv_over_a_time_channel(channels, per_example, float64):
    torch.manual_seed(0)
    layer = ConcatConv2d(channels, 4)
    x = torch.randn(2, channels, 5, 6, requires_grad=True)
    t = torch.tensor([0.7, -0.2]) if per_example else torch.tensor(0.7)
    y, _ = layer(t, x, None, layer.weight)
    tx = torch.cat([t.view(-1, 1, 1, 1).expand(2, 1, 5, 6), x], 1)
    expected = F.conv2d(tx, torch.cat([layer.time_weight, layer.weight], 1), layer.bias, padding=1)
    torch.testing.assert_close(y, expected)
    grad_out = torch.randn_like(y)
    inputs = (x, layer.weight, layer.time_weight, layer.bias)
    torch.testing.assert_close(torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out))


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("channels_out", [1, 2])  # one output channel takes the fold path on a CPU
def test_concat_conv_to_few_channels_and_its_gradients_equal_a_plain_conv(kernel_size, channels_out, float64):
    torch.manual_seed(1)
    layer = ConcatConv2d(3, channels_out, kernel_size)
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    v = torch.randn(2, 2, 3, 6, 5)
    t = torch.tensor(0.3)
    y, jv = layer(t, x, v, layer.weight)
    tx = torch.cat([t.expand(2, 1, 6, 5), x], 1)
    pad = kernel_size // 2
    expected = F.conv2d(tx, torch.cat([layer.time_weight, layer.weight], 1), layer.bias, padding=pad)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(jv, F.conv2d(v.flatten(0, 1), layer.weight, padding=pad).unflatten(0, (2, 2)))
    grad_out = torch.randn_like(y)
    inputs = (x, layer.weight, layer.time_weight, layer.bias)
    torch.testing.assert_close(torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out))


def test_conv_field_on_its_solve_inputs_equals_the_field_on_its_weights(float64):
    # The per-solve inputs (weights in the conv layout, each concat layer's time map)
    # change where terms are computed, not the field, its J v or any gradient.
    torch.manual_seed(2)
    field = ConvField((2, 5, 4), [4, 3])
    z, t = torch.randn(3, 2, 5, 4), torch.tensor(0.6, requires_grad=True)
    v = torch.randn(3, 1, 2, 5, 4)
    weights = field.masked_weights()
    inputs = field.solve_inputs(weights)
    assert {k for k in inputs if k.endswith("time_map")} == {f"layers.{i}.time_map" for i in range(3)}
    f0, jv0 = field(t, z, v, weights)
    f1, jv1 = field(t, z, v, inputs)
    torch.testing.assert_close((f1, jv1), (f0, jv0))
    params = (t, *field.parameters())
    g = (torch.randn_like(f0), torch.randn_like(jv0))
    expected = torch.autograd.grad((f0, jv0), params, g, retain_graph=True)  # the weights are shared
    torch.testing.assert_close(torch.autograd.grad((f1, jv1), params, g), expected)


@pytest.mark.parametrize("channels", [1, 2])  # one channel: the patch-product and fold convolutions
@pytest.mark.parametrize("tangents", [1, 3])
@pytest.mark.parametrize("per_example", [False, True])
def test_paired_conv_field_equals_the_layer_by_layer_field(channels, tangents, per_example, float64):
    # On a CPU a concat/softplus field runs z and its tangents as one batch with a
    # hand-written backward; values, J v, gradients and second derivatives must be
    # those of the layer-by-layer forward.
    torch.manual_seed(3)
    field = ConvField((channels, 5, 4), [4, 3])
    z = torch.randn(3, channels, 5, 4, requires_grad=True)
    t = (torch.tensor([0.2, 0.5, 0.9]) if per_example else torch.tensor(0.6)).requires_grad_()
    v = torch.randn(3, tangents, channels, 5, 4)
    inputs = field.solve_inputs(field.masked_weights())
    paired = field(t, z, v, inputs)
    layered = LayeredField.forward(field, t, z, v, inputs)
    torch.testing.assert_close(paired, layered)
    wrt = (z, t, *field.parameters())
    g = (torch.randn_like(paired[0]), torch.randn_like(paired[1]))
    first = torch.autograd.grad(paired, wrt, g, create_graph=True)
    expected = torch.autograd.grad(layered, wrt, g, create_graph=True)
    torch.testing.assert_close(first, expected)
    probe = [torch.randn_like(x) for x in expected]

    def second(grads):  # d/d(wrt) of sum_i <grads_i, probe_i>; a constant gradient adds nothing
        pairs = [(x, p) for x, p in zip(grads, probe) if x.requires_grad]
        out = torch.autograd.grad([x for x, _ in pairs], wrt, [p for _, p in pairs], retain_graph=True,
                                  allow_unused=True)
        return [torch.zeros_like(w) if d is None else d for d, w in zip(out, wrt)]

    torch.testing.assert_close(second(first), second(expected))


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
@pytest.mark.parametrize("nonlinearity", ["softplus", "tanh", "swish"])
@pytest.mark.parametrize("channels", [1, 2])
def test_conv_field_jacobian_and_divergence_match_autograd(layer_type, nonlinearity, channels, float64):
    torch.manual_seed(0)
    field = ConvField((channels, 3, 3), [4, 5], layer_type=layer_type, nonlinearity=nonlinearity)
    z, t = torch.randn(3, channels, 3, 3), torch.tensor(0.37)
    d = z[0].numel()
    est = Exact()
    v = est.tangents(z)
    f, jv = field(t, z, v)
    div, fro_sq = est.reduce(v, jv)
    torch.testing.assert_close(f, field(t, z)[0])
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda y: field(t, y[None])[0][0], z[i]).reshape(d, d)
        torch.testing.assert_close(jv[i].reshape(d, d).T, jac)  # row k of jv is J e_k
        torch.testing.assert_close(div[i], jac.trace())
        torch.testing.assert_close(fro_sq[i], jac.pow(2).sum())


# --- the multiscale flow ---------------------------------------------------------


def test_multiscale_logdet_equals_slogdet_of_the_autograd_jacobian(float64):
    torch.manual_seed(0)
    flow = build_flow(image_config("model.scales=2"), (1, 4, 4))
    assert [b.field.event_shape for b in flow.blocks] == [(1, 4, 4), (4, 2, 2), (2, 2, 2)]
    x = torch.randn(1, 1, 4, 4)
    trace = flow.trace(x)
    assert trace.out.shape == x.shape and len(trace.counters) == 3
    jac = torch.autograd.functional.jacobian(lambda y: flow.trace(y.view(1, 1, 4, 4)).out.flatten(), x.flatten())
    torch.testing.assert_close(trace.logabsdet[0], torch.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-6)


def test_multiscale_sample_then_log_prob_round_trip(float64):
    torch.manual_seed(1)
    flow = build_flow(image_config("model.scales=3"), (1, 8, 8))
    assert len(flow.blocks) == 5
    z = flow.base_noise(3)
    x, logdet_inverse = flow.inverse(z)
    z_back, logdet = flow(x)
    torch.testing.assert_close(z_back, z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logdet, -logdet_inverse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flow.log_prob(x), standard_normal_log_prob(z) - logdet_inverse, rtol=1e-6, atol=1e-6)


def test_multiscale_sampling_without_density_matches_the_full_inverse():
    torch.manual_seed(2)
    flow = build_flow(image_config("model.scales=2", "model.divergence=hutchinson",
                                   "solver.method=rk4", "solver.step_size=0.25"), (1, 4, 4)).eval()
    z = flow.base_noise(3)
    light = flow.trace(z, reverse=True, density=False)
    torch.testing.assert_close(light.out, flow.inverse(z)[0], rtol=0, atol=1e-6)
    assert light.logabsdet is None and len(light.counters) == 3 and light.nfe_forward == 3 * 8


# --- logit transform and bits per dimension --------------------------------------


def test_logit_logdet_equals_autograd(float64):
    y = torch.rand(3, 1, 2, 3)
    x, logdet = logit_transform(y, ALPHA)
    for i in range(len(y)):
        jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v, ALPHA)[0], y[i]).reshape(6, 6)
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(logit_inverse(x, ALPHA), y)


def zero_image_flow(event_shape):
    """A multiscale flow whose fields are identically zero: the identity map."""
    flow = build_flow(image_config("model.divergence=hutchinson"), event_shape)
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()
    return flow


def test_bits_per_dim_of_the_identity_flow_is_closed_form(float64):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (5, 1, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageData(pixels, pixels, pixels, seed=0, alpha=ALPHA)
    result = evaluate(zero_image_flow((1, 8, 8)), pixels, batch_size=3, preprocess=data.preprocess)
    # evaluate's dequantization noise: a generator seeded with 0, batch by batch
    g0 = torch.Generator().manual_seed(0)
    u = torch.cat([torch.rand((len(b), 1, 8, 8), generator=g0) for b in pixels.split(3)])
    s = ALPHA + (1 - 2 * ALPHA) * (pixels + u) / 256
    log_py = torch.distributions.Normal(0.0, 1.0).log_prob(torch.logit(s)) + math.log(1 - 2 * ALPHA) - torch.log(s * (1 - s))
    expected = ((-log_py.flatten(1).sum(1) + 64 * math.log(256)) / (64 * math.log(2))).mean()
    assert data.metrics(result.nll)["bits_per_dim"] == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("k", [0, 1, 37, 128, 200, 255])
def test_bits_per_dim_bound_the_discrete_code_length(k, float64):
    """For one pixel with a standard normal in logit space, the expected bits/dim
    over the dequantization noise bound -log2 P(k), P(k) the probability of the bin,
    and nearly reach it where the density is nearly flat across the bin (mid-grey;
    near 0 and 255 the logit's density changes by orders of magnitude in a bin)."""
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # midpoint rule over u
    x, logdet = logit_transform(((k + u) / 256).view(-1, 1), ALPHA)
    nll = -(torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1) + logdet)
    expected_bpd = bits_per_dim(nll, 1).mean()
    edges = torch.logit(ALPHA + (1 - 2 * ALPHA) * torch.tensor([k, k + 1], dtype=torch.float64) / 256)
    code_length = -torch.log2(torch.special.ndtr(edges[1]) - torch.special.ndtr(edges[0]))
    assert expected_bpd >= code_length - 1e-9
    if 32 <= k <= 224:
        assert expected_bpd - code_length < 1e-4


# --- pruning on conv weights -----------------------------------------------------


def test_masks_on_conv_weights_stay_zero_and_reload():
    torch.manual_seed(0)
    config = image_config("model.divergence=hutchinson", "solver.method=rk4", "solver.step_size=0.5")
    flow = build_flow(config, (1, 8, 8))
    weights = prunable_weights(flow)
    assert "blocks.0.field.layers.0.weight" in weights and weights["blocks.0.field.layers.0.weight"].dim() == 4
    scores = {n: torch.rand_like(p) for n, p in weights.items()}
    apply_masks(flow, select_top(scores, 0.6))
    total = sum(p.numel() for p in weights.values())
    kept = sum(int(mask_buffer(flow, n).sum()) for n in weights)
    assert kept == round(0.4 * total)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2, weight_decay=1e-4)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(2):
        optimizer.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        optimizer.step()
    for name, p in weights.items():
        assert (p[mask_buffer(flow, name) == 0] == 0).all(), name
    fresh = build_flow(config, (1, 8, 8))
    fresh.load_state_dict(flow.state_dict(), strict=True)
    log_probs = []
    for model in (fresh, flow):
        torch.manual_seed(2)  # the same Hutchinson probes
        log_probs.append(model.log_prob(x))
    torch.testing.assert_close(*log_probs)


# --- data --------------------------------------------------------------------------


def test_synthetic_images_and_preprocess():
    config = load_config(None, ["data.name=synthetic8", "data.val_size=100", "data.test_size=50", "data.subset=300"])
    data = make_data(config.data, seed=0)
    assert data.event_shape == (1, 8, 8) and data.kind == "image"
    assert (len(data.train), len(data.val), len(data.test)) == (300, 100, 50)
    assert data.train.dtype == torch.uint8
    x, logdet = data.preprocess(data.train_batch(32))
    y = logit_inverse(x, config.data.logit_alpha)
    assert x.shape == (32, 1, 8, 8) and logdet.shape == (32,)
    assert (y >= 0).all() and (y < 1).all()


def test_downsample_averages_blocks_and_stays_on_the_256_levels():
    images = torch.tensor([[[[0, 1, 10, 20], [2, 3, 30, 40], [255, 255, 7, 7], [255, 254, 7, 8]]]], dtype=torch.uint8)
    small = downsample(images, 2)
    # block means 1.5, 25, 254.75, 7.25, rounded half to even like torch.round
    assert small.dtype == torch.uint8 and small.tolist() == [[[[2, 25], [255, 7]]]]
    assert downsample(images, 1) is images
    with pytest.raises(DataError, match="does not divide the 4x4 images"):
        downsample(images, 3)


def test_downsampled_synthetic_images_train_on_the_smaller_shape():
    config = load_config(None, ["data.name=synthetic8", "data.val_size=10", "data.test_size=10", "data.downsample=2"])
    data = make_data(config.data, seed=0)
    assert data.event_shape == (1, 4, 4) and data.train.dtype == torch.uint8
    full = make_data(load_config(None, ["data.name=synthetic8", "data.val_size=10", "data.test_size=10"]).data, seed=0)
    assert torch.equal(data.test, downsample(full.test, 2))
    assert data.metrics(16 * math.log(256))["bits_per_dim"] == pytest.approx(16.0)  # D = 16 dimensions


def test_downsample_and_subset_of_non_images_are_config_errors():
    with pytest.raises(ConfigError, match="images only"):
        make_data(load_config(None, ["data.downsample=2"]).data, seed=0)
    with pytest.raises(ConfigError, match="data.subset applies to images only"):
        make_data(load_config(None, ["data.subset=100"]).data, seed=0)
    with pytest.raises(ConfigError, match="positive integer"):
        load_config(None, ["data.downsample=0"])


def test_missing_mnist_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw.*data\.download=true"):
        load_mnist(tmp_path / "nowhere", download=False)


needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST files in {SHARED_DATA}")


@pytest.fixture
def mnist_root(tmp_path):
    """A data root holding a copy of the real MNIST archives (as `make data` makes)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (SHARED_DATA / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(f, raw)
    return tmp_path


def config_overrides(mnist_root):
    return ["data.name=mnist", f"data.root={mnist_root}", "data.val_size=1000", "data.test_size=10000"]


@needs_mnist
def test_mnist_smoke_reads_the_real_files(mnist_root):
    config = load_config(None, config_overrides(mnist_root))
    data = make_data(config.data, seed=0)
    assert data.event_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (59000, 1000, 10000)
    assert data.train.dtype == torch.uint8 and int(data.train.max()) == 255 and int(data.train.min()) == 0
    # MNIST is mostly background: about 19% of training pixels are nonzero
    assert 0.15 < (data.train[:1000] > 0).float().mean() < 0.25
    for override, message in (("data.test_size=10001", "exceeds the 10000 test images"),
                              ("data.subset=59001", "exceeds the 59000 training images")):
        with pytest.raises(DataError, match=message):
            make_data(load_config(None, [*config_overrides(mnist_root), override]).data, seed=0)


@needs_mnist
def test_stale_extracted_mnist_is_replaced_and_corrupt_files_are_named(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    train, test = load_mnist(mnist_root, download=False)
    (raw / "train-images-idx3-ubyte").write_bytes(bytes(1000))  # a stale, truncated extraction
    again, _ = load_mnist(mnist_root, download=False)
    assert torch.equal(again, train)  # extracted afresh from the archive
    shutil.copy(raw / "t10k-labels-idx1-ubyte.gz", raw / "t10k-images-idx3-ubyte.gz")  # labels as images
    for download in (False, True):
        with pytest.raises(DataError, match=r"MNIST files in .* are corrupt or truncated .*delete"):
            load_mnist(mnist_root, download=download)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"")  # an empty archive
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_mnist(mnist_root, download=False)


def test_digit_score_counts_confident_images_and_their_classes():
    from bench.digit_score import score

    probs = torch.tensor([[0.95, 0.05] + [0.0] * 8,   # confident 0
                          [0.0, 0.92] + [0.08] + [0.0] * 7,  # confident 1
                          [0.5, 0.5] + [0.0] * 8,     # undecided
                          [0.91, 0.09] + [0.0] * 8])  # confident 0 again
    s = score(probs, threshold=0.9)
    assert s == {"confident": 0.75, "mean p": pytest.approx((0.95 + 0.92 + 0.5 + 0.91) / 4), "classes": 2.0}


def test_pixel_shares_count_level_zero_and_bright_pixels():
    from bench.digit_score import pixel_shares

    # level 0 is y < 1/256; "bright" is y > 1/2: each boundary value falls on the other side
    images = torch.tensor([0.0, 0.99 / 256, 1 / 256, 1 / 255, 0.3, 0.5, 0.51, 1.0]).view(2, 1, 2, 2)
    assert pixel_shares(images) == {"black": 2 / 8, "bright": 2 / 8}
    pixels = torch.tensor([0, 0, 0, 1, 127, 128, 200, 255], dtype=torch.uint8)
    assert pixel_shares(pixels.float() / 255) == {"black": 3 / 8, "bright": 3 / 8}  # the test images' scale


@needs_mnist
def test_digit_classifier_recognizes_digits_and_not_noise(mnist_root):
    """The sample-quality proxy of bench/digit_score.py: a classifier trained briefly on
    14x14 MNIST is accurate on test digits and confident on them, but not on noise."""
    from bench.digit_score import fit, mnist_with_labels, probabilities, score

    train_x, train_y, test_x, test_y = mnist_with_labels(DataConfig(name="mnist", root=str(mnist_root), downsample=2))
    assert train_x.shape == (60000, 1, 14, 14) and test_y.shape == (10000,)
    net = fit(train_x[:6000], train_y[:6000], epochs=3, seed=0)
    probs = probabilities(net, test_x[:1000].float() / 255)
    assert (probs.argmax(-1) == test_y[:1000]).float().mean() > 0.85
    digits = score(probs, 0.9)
    noise = score(probabilities(net, torch.rand(1000, 1, 14, 14, generator=torch.Generator().manual_seed(0))), 0.9)
    assert digits["confident"] > 0.5 and digits["classes"] == 10
    assert noise["confident"] < digits["confident"] - 0.3


@needs_mnist
def test_digit_score_script_reports_every_checkpoint_and_temperature(mnist_root, tmp_path, capsys):
    from bench import digit_score

    config = {**SMOKE, "data": {"name": "mnist", "root": str(mnist_root), "downsample": 2,
                                "val_size": 32, "test_size": 32}}
    config["train"] = {**SMOKE["train"], "iterations": 1}
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train.main([str(path), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "best.pt")
    argv = [ckpt, "--n", "8", "--temperature", "0.7", "1", "--train-size", "500", "--epochs", "1", "2"]
    assert digit_score.main(argv) == 0
    out = capsys.readouterr().out
    assert "classifier 2: 2 epochs on 500 14x14 training images, test accuracy" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(ckpt)]
    assert [(r[1], r[2]) for r in rows] == [("0.7", "1"), ("0.7", "2"), ("1", "1"), ("1", "2")]  # T, classifier
    assert {r[2]: r[-2:] for r in rows if r[1] == "1"}["1"] == {r[2]: r[-2:] for r in rows if r[1] == "1"}["2"]
    header = next(line for line in out.splitlines() if line.startswith("images"))
    assert header.split()[-2:] == ["black", "bright"]
    reference = next(line for line in out.splitlines() if line.startswith("test images")).split()
    test_images = digit_score.mnist_with_labels(DataConfig(name="mnist", root=str(mnist_root), downsample=2))[2]
    real = digit_score.pixel_shares(test_images[:8].float() / 255)
    assert [float(v) for v in reference[-2:]] == [round(real["black"], 3), round(real["bright"], 3)]

    assert digit_score.main(argv + ["--diagnose"]) == 2  # 8 codes cannot fit a 196-dimensional covariance
    assert "--n must exceed the 196 pixels" in capsys.readouterr().err
    argv[2] = "200"
    argv = argv[:-1]  # one classifier
    assert digit_score.main(argv + ["--diagnose"]) == 0
    out = capsys.readouterr().out
    assert "codes of 200 test images" in out
    assert any(line.startswith(f"{ckpt} reconstructed") for line in out.splitlines())
    assert any(line.startswith(f"{ckpt} Gaussian fit") for line in out.splitlines())

    smoke = tmp_path / "smoke.yaml"
    smoke.write_text(yaml.safe_dump(SMOKE))
    assert train.main([str(smoke), "--out", str(tmp_path / "bars")]) == 0
    capsys.readouterr()
    assert digit_score.main([str(tmp_path / "bars" / "best.pt")]) == 2  # not an MNIST model
    assert "is not an MNIST model" in capsys.readouterr().err


def test_gaussian_fit_draws_have_the_mean_and_covariance_of_the_codes():
    from bench.digit_score import gaussian_fit

    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [0.0, -0.5, 2.0, 0.0], [0.3, 0.0, 0.0, 0.1]])
    codes = (torch.randn(3000, 4, generator=gen, dtype=torch.float64) @ mix.T.double() + 3.0).view(3000, 1, 2, 2)
    draws = gaussian_fit(codes, 40000, seed=1)
    assert draws.shape == (40000, 1, 2, 2) and draws.dtype == codes.dtype
    flat, target = draws.flatten(1), codes.flatten(1)
    cov = torch.cov(target.T)
    se_mean = (cov.diagonal() / len(flat)).sqrt()
    assert ((flat.mean(0) - target.mean(0)).abs() <= 5 * se_mean).all()
    # the covariance of 40000 draws, entry by entry, within 5 standard errors of the fitted one
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / len(flat)).sqrt()
    assert ((torch.cov(flat.T) - cov).abs() <= 5 * se_cov).all()
    assert torch.equal(gaussian_fit(codes, 10, seed=1), gaussian_fit(codes, 10, seed=1))


def test_mixture_baseline_script_prints_a_row_per_mixture(mnist_root, tmp_path, capsys):
    from bench import mixture_baseline

    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "mnist", "root": str(mnist_root), "downsample": 2,
                                             "val_size": 59000, "test_size": 100}}))
    argv = [str(path), "--components", "1", "2", "--iterations", "2", "--n", "20", "--train-size", "500"]
    assert mixture_baseline.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1000 training and 100 test images of 1x14x14")
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(1.0 < float(row[1]) < 8.0 for row in rows)  # a fitted density: below the uniform 8 bits/dim
    assert mixture_baseline.main([*argv[:3], "0"]) == 2
    assert "--components" in capsys.readouterr().err


def test_encode_then_decode_gives_back_the_dequantized_images(tmp_path, capsys):
    """What ``--diagnose`` calls reconstructions: images -> codes -> images, through the
    flow's eval solver (dopri5 at 1e-7 here), returns the dequantized pixels."""
    from bench.digit_score import decode, encode
    from cnf_prune.build import load_model
    from cnf.images import dequantize

    config = {**SMOKE, "solver": {**SMOKE["solver"], "test_method": "dopri5", "test_rtol": 1e-7, "test_atol": 1e-7}}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train.main([str(path), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    model = load_model(tmp_path / "run" / "best.pt", map_location="cpu")[0].eval()
    pixels = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    codes = encode(model, pixels, alpha=1e-6, seed=3, batch_size=4)
    assert codes.shape == pixels.shape
    assert not torch.allclose(codes, logit_transform(dequantize(pixels, generator=torch.Generator().manual_seed(3)),
                                                     1e-6)[0], atol=1e-2)  # the flow moved them
    y = dequantize(pixels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(decode(model, codes, alpha=1e-6), y, atol=1e-4, rtol=0)


# --- scripts -----------------------------------------------------------------------

SMOKE = {
    "seed": 0,
    "data": {"name": "synthetic8", "val_size": 32, "test_size": 32},
    "model": {"hidden_dims": [8], "layer_type": "concat", "nonlinearity": "softplus", "num_blocks": 1,
              "end_time": 1.0, "divergence": "hutchinson", "noise": "rademacher"},
    "solver": {"method": "rk4", "step_size": 0.5, "adjoint": False},
    "train": {"iterations": 3, "batch_size": 16, "val_every": 2, "val_batch_size": 32,
              "checkpoint_every": 2, "log_every": 1},
}


@pytest.mark.slow
def test_compiling_a_multiscale_flow_compiles_every_block(tmp_path):
    """With ``train.compile``, each block's field is compiled for each of its shapes and
    grad modes (training with the adjoint, validation, test): more graphs than dynamo's
    default limit of 8 per function, so none may fall back to uncompiled code."""
    import torch._dynamo.utils

    config = {**SMOKE, "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "adjoint": True},
              "train": {**SMOKE["train"], "iterations": 2, "compile": True}}
    path = tmp_path / "compiled.yaml"
    path.write_text(yaml.safe_dump(config))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert train.main([str(path), "--out", str(tmp_path / "run")]) == 0
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] > 8 and frames["total"] == frames["ok"]
    assert not any("recompile limit" in reason for reason in torch._dynamo.utils.counters["unimplemented"])


def test_train_checkpoint_and_sample_on_synthetic_images(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(SMOKE))
    run = tmp_path / "run"
    assert train.main([str(path), "--out", str(run)]) == 0
    assert "bits_per_dim" in capsys.readouterr().out
    events = EventAccumulator(str(run)).Reload()
    for tag in ("train/bits_per_dim", "val/bits_per_dim", "val/nll", "nfe/forward", "nfe/backward",
                "jacobian/cumulative_norm", "test/bits_per_dim"):
        assert tag in events.Tags()["scalars"], tag
    assert "flow/samples" in events.Tags()["images"]
    bpd = events.Scalars("val/bits_per_dim")[-1].value
    nll = events.Scalars("val/nll")[-1].value
    assert bpd == pytest.approx((nll + 64 * math.log(256)) / (64 * math.log(2)), rel=1e-5)

    png = tmp_path / "samples.png"
    assert sample.main([str(run / "best.pt"), "--out", str(png), "--n", "9", "--temperature", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "s per image" in out and "NFE" in out
    from PIL import Image

    scale = 112 // 8  # each image enlarged to at least 112 px, padding scaled alike
    assert Image.open(png).size == (3 * 10 * scale + 2 * scale,) * 2  # 3x3 grid of 8x8, padding 2
    npy = tmp_path / "samples.npy"
    assert sample.main([str(run / "best.pt"), "--out", str(npy), "--n", "4"]) == 0
    import numpy as np

    pixels = np.load(npy)
    assert pixels.shape == (4, 1, 8, 8) and pixels.min() >= 0 and pixels.max() <= 1

    # the Figure-2 script draws validation images, samples and the R curve of the run
    import importlib.util

    spec = importlib.util.spec_from_file_location("figure2_mnist", Path(__file__).parents[1] / "bench" / "figure2_mnist.py")
    figure2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure2)
    fig = tmp_path / "figure2.png"
    assert figure2.main([str(run), str(run), "--labels", "a", "b", "--n", "4", "--out", str(fig)]) == 0
    assert Image.open(fig).size[0] > 0
    assert figure2.main([str(run), "--labels", "a", "b", "--out", str(fig)]) == 2  # one label per run
    assert figure2.main([str(run), str(run), "--labels", "a", "a", "--n", "4", "--out", str(fig)]) == 0  # seeds: a band
    assert figure2.main([str(run), "--max-step", "1", "--n", "4", "--out", str(fig)]) == 0
    assert figure2.main([str(run), "--max-step", "0", "--out", str(fig)]) == 2
    small = tmp_path / "small"  # the same data at another resolution cannot share a figure
    assert train.main([str(path), "--out", str(small), "--set", "data.downsample=2", "--set", "model.scales=1"]) == 0
    capsys.readouterr()
    assert figure2.main([str(run), str(small), "--n", "4", "--out", str(fig)]) == 2
    assert "same resolution" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_every_pruning_method_prunes_conv_weights(method):

    config = load_config(None, [
        "data.name=synthetic8", "data.val_size=16", "data.test_size=16", "model.layer_type=concat",
        "model.nonlinearity=softplus", "model.hidden_dims=[4]", "model.num_blocks=1", "model.end_time=0.5",
        "model.divergence=hutchinson", "model.noise=rademacher", "solver.method=rk4", "solver.step_size=0.5",
        "solver.adjoint=false", "train.batch_size=8", f"pruning.method={method}", "pruning.sparsity=0.7",
        "pruning.synflow_iterations=5",
    ])
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    flow = build_flow(config, data.event_shape)
    before = torch.get_rng_state()
    prune(flow, data, config)
    assert torch.equal(torch.get_rng_state(), before)  # the training stream is untouched
    weights = prunable_weights(flow)
    kept = sum(int(mask_buffer(flow, n).sum()) for n in weights)
    assert kept == round(0.3 * sum(p.numel() for p in weights.values()))
    for name, p in weights.items():
        assert (p[mask_buffer(flow, name) == 0] == 0).all(), name


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_mnist_configs_build_ffjords_multiscale_model():
    from cnf_prune.commands.compare import load_comparison

    ffjord = build_flow(load_config(CONFIGS / "mnist.yaml"), (1, 28, 28))
    assert len(ffjord.blocks) == 10  # 2 + 2 per squeezed scale, 2 on the last
    assert [b.field.event_shape for b in ffjord.blocks[::2]] == [(1, 28, 28), (4, 14, 14), (2, 14, 14), (8, 7, 7), (4, 7, 7)]
    assert [tuple(layer.weight.shape[:2]) for layer in ffjord.blocks[0].field.layers] == [(64, 1), (64, 64), (64, 64), (1, 64)]
    cpu_config = load_config(CONFIGS / "mnist_cpu.yaml")
    assert cpu_config.data.downsample == 2  # 14x14 MNIST: 2 scales, one block before and after the squeeze
    cpu = build_flow(cpu_config, (1, 14, 14))
    assert [b.field.event_shape for b in cpu.blocks] == [(1, 14, 14), (4, 7, 7), (2, 7, 7)]
    runs = load_comparison(CONFIGS / "compare_mnist.yaml").runs
    assert {r.label for r in runs} == {"random", "jacobian_spectrum"}


def test_squeeze_channel_order_is_pixel_unshuffles():
    """Channel ``4c + 2i + j`` of the squeezed tensor holds input channel ``c`` at the
    offsets ``(i, j)`` of each 2x2 patch (``pixel_unshuffle``'s order, input channel
    slowest). This fixes which half of the squeezed channels a scale factors out."""
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    s = squeeze(x)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(s[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    # and unsqueeze places them back the same way
    y = torch.randn(2, 12, 3, 2)
    u = unsqueeze(y)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(u[:, c, i::2, j::2], y[:, 4 * c + 2 * i + j])


@pytest.mark.parametrize(
    "shape, scales",
    # one scale per halving while both sides are at least 4; an odd side stops early
    [((1, 4, 4), 1), ((1, 8, 8), 2), ((1, 16, 16), 3), ((3, 32, 32), 4), ((1, 28, 28), 3),
     ((1, 8, 4), 1), ((1, 12, 12), 2), ((1, 2, 2), 1), ((1, 7, 7), 1)],
)
def test_default_scales_count_the_halvings_down_to_side_4(shape, scales):
    assert default_scales(shape) == scales
    scale_shapes(shape, scales)  # fits: no odd side is squeezed


def test_image_splits_are_the_documented_slices(monkeypatch):
    """Validation: the last ``val_size`` training images; test: the first ``test_size``
    test images (a prefix, so a smaller test set is part of a larger one)."""
    def fake_mnist(root, *, download):
        index = torch.arange(256, dtype=torch.uint8).view(-1, 1, 1, 1)
        train = index[:40].expand(40, 1, 28, 28).clone()
        test = index[100:130].expand(30, 1, 28, 28).clone()
        return train, test

    monkeypatch.setattr("cnf.images.load_mnist", fake_mnist)

    def splits(*overrides):
        data = make_data(load_config(None, ["data.name=mnist", *overrides]).data, seed=0)
        return [split[:, 0, 0, 0].tolist() for split in (data.train, data.val, data.test)]

    train_ids, val_ids, test_ids = splits("data.val_size=5", "data.test_size=7")
    assert train_ids == list(range(35)) and val_ids == list(range(35, 40))
    assert test_ids == list(range(100, 107))
    assert splits("data.val_size=5", "data.test_size=3", "data.subset=10")[::2] == [list(range(10)), list(range(100, 103))]


def test_bits_per_dim_of_colour_images_count_every_channel():
    """D = C·H·W: a uniform density on [0, 1)^D of 3×4×4 images has NLL 0 nats in
    [0, 1) coordinates and exactly 8 bits per dimension (256 equally likely levels)."""
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    data = ImageData(images[:2], images[2:4], images[4:], seed=0, alpha=1e-6)
    assert data.event_shape == (3, 4, 4)
    assert data.metrics(0.0)["bits_per_dim"] == pytest.approx(8.0)
    assert data.metrics(48 * math.log(2.0))["bits_per_dim"] == pytest.approx(9.0)  # one more bit each
