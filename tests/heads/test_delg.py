"""DELG heads and model on tiny torchvision ResNets: hand-computed losses, stop-gradient, receptive-field centres
measured with input gradients, multi-scale extraction against manual per-scale computations, weights loading."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_close
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from dml_bias.heads import (
    DELG,
    DELGGlobalHead,
    DELGLocalHead,
    DELGOutput,
    LocalFeatures,
    ReceptiveField,
    gem,
)
from dml_bias.losses import AdditiveAngularMarginLoss
from dml_bias.losses.functional import arcface_loss


def tiny(num_classes: int | None = 4, **kw: Any) -> DELG:
    return DELG(torchvision.models.resnet18(weights=None), num_classes, global_dim=16, local_dim=8, **kw)


@pytest.fixture(scope="module")
def model() -> DELG:
    torch.manual_seed(0)
    net = tiny()
    net.eval()
    return net


def images(n: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------- global head


def test_global_head_is_gem_whitening_and_l2_normalisation() -> None:
    head = DELGGlobalHead(in_channels=6, dim=5)
    x = torch.rand(3, 6, 4, 2)
    g = head(x)
    assert g.shape == (3, 5)
    assert_close(g.norm(dim=1), torch.ones(3))
    whitened = gem(x, p=3.0) @ head.whiten.weight.T + head.whiten.bias
    assert_close(g, whitened / whitened.norm(dim=1, keepdim=True))
    assert head.whiten.bias is not None
    assert head.pool.p == 3.0
    assert repr(head).startswith("DELGGlobalHead(\n  in_channels=6, dim=5\n")


def test_global_head_trains_with_arcface() -> None:
    torch.manual_seed(1)
    num_classes, channels = 4, 8
    labels = torch.arange(16) % num_classes
    # class k lifts channel k: separable after pooling
    x = torch.rand(16, channels, 3, 3) + 2.0 * F.one_hot(labels, channels).float()[:, :, None, None]
    head = DELGGlobalHead(channels, 8)
    loss_fn = AdditiveAngularMarginLoss(num_classes, 8, margin=0.1, scale=math.sqrt(8))
    optimizer = torch.optim.SGD([*head.parameters(), *loss_fn.parameters()], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = loss_fn(head(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------------------- local head


def hand_local_head(head: DELGLocalHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 einsum reimplementation (BatchNorm in eval mode, with its running statistics)."""
    x = x.double()

    def conv(w: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        assert w.bias is not None
        return torch.einsum("oc,nchw->nohw", w.weight.double()[:, :, 0, 0], t) + w.bias.double()[None, :, None, None]

    codes = conv(head.encoder, x)
    rec = conv(head.decoder[0], codes).clamp_min(0)
    bn = head.attention[1]
    assert isinstance(bn, nn.BatchNorm2d)
    hidden = conv(head.attention[0], rec)
    hidden = (hidden - bn.running_mean.double()[None, :, None, None]) / torch.sqrt(
        bn.running_var.double()[None, :, None, None] + bn.eps
    ) * bn.weight.double()[None, :, None, None] + bn.bias.double()[None, :, None, None]
    scores = conv(head.attention[3], hidden.clamp_min(0))[:, 0]
    attention = torch.log1p(torch.exp(scores))
    return attention, codes, rec


def test_local_head_forward_matches_a_hand_computation() -> None:
    head = DELGLocalHead(in_channels=6, dim=3, hidden_channels=5).eval()
    with torch.no_grad():
        head.attention[1].running_mean.uniform_(-0.5, 0.5)  # type: ignore[operator]
        head.attention[1].running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
    x = torch.rand(2, 6, 3, 4)
    out = head(x)
    attention, codes, rec = hand_local_head(head, x)
    assert out.attention.shape == (2, 3, 4)
    assert_close(out.descriptors, codes.float())
    assert_close(out.reconstruction, rec.float())
    assert_close(out.attention, attention.float())
    # the attention is computed from the reconstruction, not from the input
    assert not torch.allclose(head.attention(x).squeeze(1), out.attention)


def test_local_losses_match_a_hand_computation() -> None:
    head = DELGLocalHead(in_channels=6, dim=3, hidden_channels=5, num_classes=4)
    x, labels = torch.rand(3, 6, 2, 5), torch.tensor([0, 3, 1])
    out = head(x)
    losses = head.losses(x, labels, out)
    # reconstruction: mean over all N*C*H*W elements
    rec, target = out.reconstruction.double(), x.double()
    expected_rec = sum(
        float((rec.detach()[n, c, h, w] - target[n, c, h, w]) ** 2)
        for n, c, h, w in itertools.product(*map(range, x.shape))
    )
    assert_close(losses.reconstruction, torch.tensor(expected_rec / x.numel()))
    # attention: CE of att_fc on the mean over locations of A * x / ||x||_channels
    assert head.att_fc is not None
    total = 0.0
    for n in range(3):
        pooled = torch.zeros(6, dtype=torch.float64)
        for h in range(2):
            for w in range(5):
                v = target[n, :, h, w]
                pooled += float(out.attention.detach()[n, h, w]) * v / v.norm()
        pooled /= 10
        logits = (head.att_fc.weight.double() @ pooled + head.att_fc.bias.double()).detach()
        total += float(torch.logsumexp(logits, 0) - logits[labels[n]])
    assert_close(losses.attention, torch.tensor(total / 3), rtol=1e-5, atol=1e-6)
    # without the precomputed output the head runs itself (train-mode BN: the same batch gives the same result)
    again = head.losses(x, labels)
    assert_close(again.reconstruction, losses.reconstruction)
    assert_close(again.attention, losses.attention)


def test_local_head_detaches_its_input() -> None:
    head = DELGLocalHead(in_channels=6, dim=3, hidden_channels=5, num_classes=2)
    x = torch.rand(2, 6, 3, 3, requires_grad=True)
    rec, att = head.losses(x, torch.tensor([0, 1]))
    (rec + att).backward()
    assert x.grad is None
    assert head.encoder.weight.grad is not None
    assert bool(head.encoder.weight.grad.abs().sum() > 0)


def test_stop_gradient_in_delg() -> None:
    torch.manual_seed(0)
    net = tiny()
    x, labels = images(4), torch.tensor([0, 1, 2, 3])
    out = net(x, labels)
    assert out.reconstruction_loss is not None
    assert out.attention_loss is not None
    assert out.global_loss is not None
    (out.reconstruction_loss + out.attention_loss).backward(retain_graph=True)
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is None for p in net.global_head.parameters())
    local_grads = {name: p.grad for name, p in net.local_head.named_parameters()}
    assert all(g is not None and bool(g.abs().sum() > 0) for g in local_grads.values()), local_grads.keys()
    net.zero_grad(set_to_none=True)
    out.global_loss.backward()
    assert all(p.grad is None for p in net.local_head.parameters())
    assert net.backbone.conv1.weight.grad is not None
    assert bool(net.backbone.conv1.weight.grad.abs().sum() > 0)
    assert net.backbone.layer3[0].conv1.weight.grad is not None
    assert net.arcface is not None
    assert net.arcface.weight.grad is not None


# --------------------------------------------------------------------------------------------------- DELG forward


def test_forward_shapes_and_total_loss() -> None:
    torch.manual_seed(0)
    net = tiny(num_classes=5)
    x, labels = images(3, 96, 64), torch.tensor([0, 4, 2])
    out = net(x, labels)
    assert isinstance(out, DELGOutput)
    assert out.global_descriptor.shape == (3, 16)
    assert_close(out.global_descriptor.norm(dim=1), torch.ones(3))
    assert out.local_descriptors.shape == (3, 8, 3, 2)  # 96 x 64 at stride 32
    assert out.attention.shape == (3, 3, 2)
    assert out.locations.shape == (6, 2)
    assert out.locations.tolist() == [[0, 0], [32, 0], [0, 32], [32, 32], [0, 64], [32, 64]]
    for loss in (out.loss, out.global_loss, out.reconstruction_loss, out.attention_loss):
        assert loss is not None
        assert loss.shape == ()
        assert bool(torch.isfinite(loss))
    assert out.global_loss is not None
    assert out.reconstruction_loss is not None
    assert out.attention_loss is not None
    assert_close(out.loss, out.global_loss + 10.0 * out.reconstruction_loss + 1.0 * out.attention_loss)
    # the global loss is ArcFace with DELG's margin 0.1 and scale sqrt(global_dim)
    assert net.arcface is not None
    expected = arcface_loss(out.global_descriptor, labels, net.arcface.weight, margin=0.1, scale=4.0)
    assert_close(out.global_loss, expected)
    assert net.local_head.att_fc is not None
    assert net.local_head.att_fc.out_features == 5
    assert "arcface" in dict(net.named_children())


def test_custom_loss_weights_and_arcface_parameters() -> None:
    net = tiny(num_classes=3, reconstruction_weight=2.0, attention_weight=0.5, arcface_margin=0.2, arcface_scale=7.0)
    assert net.arcface is not None
    assert (net.arcface.margin, net.arcface.scale) == (0.2, 7.0)
    out = net(images(2), torch.tensor([0, 2]))
    assert out.global_loss is not None
    assert out.reconstruction_loss is not None
    assert out.attention_loss is not None
    assert_close(out.loss, out.global_loss + 2.0 * out.reconstruction_loss + 0.5 * out.attention_loss)


def test_forward_without_labels_has_no_losses(model: DELG) -> None:
    out = model(images(1))
    assert out.loss is None
    assert out.global_loss is None
    assert out.reconstruction_loss is None
    assert out.attention_loss is None
    net = tiny(num_classes=None)
    assert net.arcface is None
    assert net.local_head.att_fc is None
    with pytest.raises(ValueError, match="num_classes"):
        net(images(2), torch.tensor([0, 1]))


def test_forward_under_cpu_autocast() -> None:
    net = tiny(num_classes=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images(2), torch.tensor([0, 2]))
    for loss in (out.loss, out.global_loss, out.reconstruction_loss, out.attention_loss):
        assert loss is not None
        assert loss.dtype == torch.float32
        assert bool(torch.isfinite(loss))


@pytest.mark.cuda
def test_cuda_forward_and_extraction_under_autocast() -> None:
    net = tiny(num_classes=3).cuda()
    x = images(2).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        out = net(x, torch.tensor([0, 2], device="cuda"))
    assert out.loss is not None
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    feats = net.extract_local(x, scales=(0.5, 1.0))
    cpu = net.cpu().extract_local(x.cpu(), scales=(0.5, 1.0))
    assert_close(feats.scores.cpu(), cpu.scores, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------- keypoints


def linearise(net: DELG) -> None:
    """ReLU -> identity and max-pool -> average pool of the same geometry: the gradient support of a location is
    then exactly its receptive field (clipped at the border)."""
    for module in list(net.backbone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding)  # type: ignore[arg-type]
                setattr(module, name, pool)


def gradient_support(net: DELG, size: int, cells: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """For each cell (i, j): (x0, x1, y0, y1), the bounding box of the pixels with d conv4[i, j] / d pixel != 0."""
    x = torch.randn(len(cells), 3, size, size).requires_grad_(True)
    conv4, _ = net.feature_maps(x)
    rows = torch.tensor([i for i, _ in cells])
    cols = torch.tensor([j for _, j in cells])
    conv4[torch.arange(len(cells)), :, rows, cols].sum().backward()
    assert x.grad is not None
    boxes = []
    for k in range(len(cells)):
        mask = x.grad[k].abs().sum(0) != 0
        ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        boxes.append((int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())))
    return boxes


@pytest.mark.parametrize(
    ("block", "layers", "size", "rf"),
    [
        # BasicBlock, 1 block per stage: 7 -> 11 (max-pool) -> 27 -> 35, 51 -> 67, 99 (3x3 convs at jumps 4, 8, 16)
        (BasicBlock, [1, 1, 1, 1], 128, 99),
        # Bottleneck (stride in the 3x3, as in ResNet-50): 7 -> 11 -> 19 -> 27 -> 43
        (Bottleneck, [1, 1, 1, 1], 96, 43),
        # resnet18: 7 -> 11 -> 43 -> 51, 99 -> 115, 211
        (BasicBlock, [2, 2, 2, 2], 256, 211),
    ],
)
def test_keypoints_are_receptive_field_centres_measured_by_input_gradients(
    block: type[nn.Module], layers: list[int], size: int, rf: int
) -> None:
    torch.manual_seed(0)
    net = DELG(ResNet(block, layers), global_dim=4, local_dim=4)  # type: ignore[arg-type]
    assert net.receptive_field == ReceptiveField(size=rf, stride=32, offset=0.0)
    net.eval()
    linearise(net)
    cells_per_side = (size - 1) // 32 + 1
    cells = [(0, 0), (1, 2), (cells_per_side // 2, cells_per_side // 2), (cells_per_side - 1, 1)]
    locations = net.feature_locations(cells_per_side, cells_per_side)
    radius = (rf - 1) // 2
    interior = 0
    for (i, j), (x0, x1, y0, y1) in zip(cells, gradient_support(net, size, cells), strict=True):
        cx, cy = locations[i * cells_per_side + j].tolist()
        assert (x0, x1) == (max(0, cx - radius), min(size - 1, cx + radius)), (i, j)
        assert (y0, y1) == (max(0, cy - radius), min(size - 1, cy + radius)), (i, j)
        if x0 > 0 and x1 < size - 1:  # unclipped: the support is centred on the location
            assert (x0 + x1) / 2 == cx
            interior += 1
    assert interior >= 1


def test_keypoint_boxes_contain_the_gradient_support_of_the_real_network() -> None:
    torch.manual_seed(0)
    net = DELG(torchvision.models.resnet18(weights=None), global_dim=4, local_dim=4).eval()
    radius = (net.receptive_field.size - 1) // 2
    cells = [(0, 0), (3, 4), (7, 7)]
    locations = net.feature_locations(8, 8)
    for (i, j), (x0, x1, y0, y1) in zip(cells, gradient_support(net, 256, cells), strict=True):
        cx, cy = locations[i * 8 + j].tolist()
        assert cx - radius <= x0 <= x1 <= cx + radius
        assert cy - radius <= y0 <= y1 <= cy + radius


def test_resnet50_builds_with_delg_strides() -> None:
    net = DELG("resnet50", num_classes=10)
    first = net.backbone.layer4[0]
    assert first.conv1.stride == (1, 1)
    assert first.conv2.stride == (1, 1)
    assert first.downsample is not None
    assert first.downsample[0].stride == (1, 1)
    assert net.backbone.layer3[0].conv2.stride == (2, 2)  # the rest is untouched
    # torchvision ResNet-50 conv4: 7 -> 11 -> 35 (layer1) -> 43, 91 (layer2) -> 107, 267 (layer3)
    assert net.receptive_field == ReceptiveField(size=267, stride=32, offset=0.0)
    assert (net.local_head.in_channels, net.global_head.in_channels) == (1024, 2048)
    assert net.arcface is not None
    assert net.arcface.scale == pytest.approx(45.2548, abs=1e-4)
    assert net.arcface.margin == 0.1
    assert net.arcface.weight.shape == (10, 2048)
    # torchvision's weights still load (strides are not parameters)
    state = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    net.backbone.load_state_dict(state, strict=True)
    with torch.no_grad():
        conv4, conv5 = net.eval().feature_maps(torch.randn(1, 3, 64, 64))
    assert conv4.shape == (1, 1024, 2, 2)
    assert conv5.shape == (1, 2048, 2, 2)


def test_the_backbone_argument_is_copied_not_modified() -> None:
    resnet = torchvision.models.resnet18(weights=None)
    net = DELG(resnet)
    assert resnet.layer4[0].conv1.stride == (2, 2)
    assert isinstance(resnet.fc, nn.Linear)
    assert net.backbone is not resnet
    assert isinstance(net.backbone.fc, nn.Identity)
    assert torch.equal(net.backbone.conv1.weight, resnet.conv1.weight)


# --------------------------------------------------------------------------------------------------- extraction


def manual_scale(net: DELG, x: torch.Tensor, scale: float, antialias: bool = False) -> torch.Tensor:
    size = (round(x.shape[2] * scale), round(x.shape[3] * scale))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def test_extract_global_equals_manual_per_scale_sum(model: DELG) -> None:
    x = images(2, 64, 80)
    for scales, antialias in (((0.5, 1.0, 1.5), False), ((1 / math.sqrt(2), 1.0, math.sqrt(2)), True)):
        with torch.no_grad():
            total = sum(model.global_head(model.feature_maps(manual_scale(model, x, s, antialias))[1]) for s in scales)
        expected = total / total.norm(dim=1, keepdim=True)  # type: ignore[union-attr]
        assert_close(model.extract_global(x, scales, antialias=antialias), expected)
    # the defaults are DELG's three scales, without antialiasing
    with torch.no_grad():
        default = sum(model.global_head(model.feature_maps(manual_scale(model, x, s))[1]) for s in (0.7071, 1, 1.4142))
    assert_close(model.extract_global(x), default / default.norm(dim=1, keepdim=True))  # type: ignore[union-attr]
    single = model.extract_global(x, scales=(1.0,))
    assert_close(single, model(x).global_descriptor)


def test_extraction_restores_every_module_mode_and_tracks_no_gradient() -> None:
    net = tiny()
    net.train()
    net.local_head.attention[1].eval()  # a user's frozen BatchNorm stays frozen
    bn = net.backbone.bn1
    before = bn.running_mean.clone()  # type: ignore[union-attr]
    x = images(2)
    g = net.extract_global(x)
    feats = net.extract_local(x, scales=(1.0,))
    assert not g.requires_grad
    assert not feats.descriptors.requires_grad
    assert net.training
    assert net.backbone.training
    assert net.global_head.training
    assert not net.local_head.attention[1].training
    assert torch.equal(bn.running_mean, before)  # type: ignore[arg-type]  # ran in eval mode
    net.eval()
    net.extract_global(x)
    assert not net.training


def manual_local(net: DELG, x: torch.Tensor, scales: tuple[float, ...]) -> list[dict[str, torch.Tensor]]:
    """All candidates of every image, unsorted: a per-image, per-scale loop."""
    result = []
    for n in range(x.shape[0]):
        rows: dict[str, list[torch.Tensor]] = {"locations": [], "descriptors": [], "scores": [], "scales": []}
        for s in scales:
            resized = manual_scale(net, x[n : n + 1], s)
            with torch.no_grad():
                out = net.local_head(net.feature_maps(resized)[0])
            h, w = out.attention.shape[1:]
            for i in range(h):
                for j in range(w):
                    xs, ys = 32.0 * j, 32.0 * i
                    loc = torch.tensor(
                        [
                            (xs + 0.5) * x.shape[3] / resized.shape[3] - 0.5,
                            (ys + 0.5) * x.shape[2] / resized.shape[2] - 0.5,
                        ]
                    )
                    d = out.descriptors[0, :, i, j]
                    rows["locations"].append(loc)
                    rows["descriptors"].append(d / d.norm())
                    rows["scores"].append(out.attention[0, i, j])
                    rows["scales"].append(torch.tensor(s))
        result.append({k: torch.stack(v) for k, v in rows.items()})
    return result


def check_against_manual(
    feats: LocalFeatures, manual: list[dict[str, torch.Tensor]], threshold: float, max_features: int
) -> None:
    n_images = len(manual)
    expected_lengths = [min(int((m["scores"] >= threshold).sum()), max_features) for m in manual]
    assert feats.lengths.dtype == torch.int64
    assert feats.lengths.tolist() == expected_lengths
    count = max(expected_lengths)
    assert feats.locations.shape == (n_images, count, 2)
    assert feats.descriptors.shape == (n_images, count, manual[0]["descriptors"].shape[1])
    assert feats.scores.shape == feats.scales.shape == (n_images, count)
    for n, m in enumerate(manual):
        order = torch.argsort(m["scores"], descending=True, stable=True)[: expected_lengths[n]]
        k = expected_lengths[n]
        assert_close(feats.scores[n, :k], m["scores"][order])
        assert bool((feats.scores[n, :k] >= threshold).all())
        assert_close(feats.locations[n, :k], m["locations"][order])
        assert_close(feats.descriptors[n, :k], m["descriptors"][order], rtol=1e-5, atol=1e-5)
        assert_close(feats.scales[n, :k], m["scales"][order].float())
        # padding rows are zeros
        for field in (feats.locations, feats.descriptors, feats.scores, feats.scales):
            assert bool((field[n, k:] == 0).all())


def test_extract_local_equals_a_manual_per_image_per_scale_selection(model: DELG) -> None:
    x = images(2, 64, 96, seed=3)
    scales = (0.5, 0.75, 1.0, 2.0)
    manual = manual_local(model, x, scales)
    everything = model.extract_local(x, scales)  # threshold 0 keeps every location
    total = manual[0]["scores"].numel()  # 1x2 + 2x3 + 2x3 + 4x6 = 38 locations
    assert total == 38
    check_against_manual(everything, manual, 0.0, 1000)
    assert_close(everything.descriptors.norm(dim=2), torch.ones(2, total))
    # a threshold between the images' scores gives different lengths (padding), max_features caps them
    all_scores = torch.cat([m["scores"] for m in manual])
    threshold = float(all_scores.median())
    thresholded = model.extract_local(x, scales, score_threshold=threshold)
    check_against_manual(thresholded, manual, threshold, 1000)
    capped = model.extract_local(x, scales, score_threshold=threshold, max_features=5)
    check_against_manual(capped, manual, threshold, 5)
    nothing = model.extract_local(x, scales, score_threshold=float(all_scores.max()) + 1.0)
    assert nothing.lengths.tolist() == [0, 0]
    assert nothing.descriptors.shape == (2, 0, 8)


def test_extract_local_location_scaling(model: DELG) -> None:
    x = images(1)
    # scale 2: a 128 x 128 image, a 4 x 4 map at x_s in {0, 32, 64, 96}; x = (x_s + 0.5) / 2 - 0.5
    feats = model.extract_local(x, scales=(2.0,))
    got = sorted({round(v, 4) for v in feats.locations[0, :, 0].tolist()})
    assert got == [-0.25, 15.75, 31.75, 47.75]
    # scale 0.5: a 32 x 32 image, one location at 0 -> (0 + 0.5) * 2 - 0.5 = 0.5
    feats = model.extract_local(x, scales=(0.5,))
    assert feats.locations.tolist() == [[[0.5, 0.5]]]
    # scale 1: the map's own locations
    feats = model.extract_local(x, scales=(1.0,))
    assert sorted(map(tuple, feats.locations[0].tolist())) == [(0, 0), (0, 32), (32, 0), (32, 32)]
    assert feats.scales.tolist() == [[1.0] * 4]


def test_extract_local_is_batched_like_single_images(model: DELG) -> None:
    x = images(3, seed=5)
    batch = model.extract_local(x, scales=(0.7071, 1.4142), max_features=6)
    for n in range(3):
        single = model.extract_local(x[n : n + 1], scales=(0.7071, 1.4142), max_features=6)
        k = int(single.lengths[0])
        assert int(batch.lengths[n]) == k == 6
        assert_close(batch.scores[n, :k], single.scores[0, :k], rtol=1e-5, atol=1e-6)
        assert_close(batch.locations[n, :k], single.locations[0, :k])


# --------------------------------------------------------------------------------------------------- weights


def test_weights_path_loads_a_torchvision_state_dict(tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)  # with fc.*: ignored
    net = DELG(torchvision.models.resnet18(weights=None), weights=path)
    for name, value in net.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    again = DELG(torchvision.models.resnet18(weights=None), weights=str(path))
    assert torch.equal(again.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_bad_weights_raise_naming_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    resnet = torchvision.models.resnet18(weights=None)
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        DELG(resnet, weights=missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt.*could not be read"):
        DELG(resnet, weights=garbage)
    wrong = tmp_path / "resnet34.pt"
    state = resnet.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, wrong)
    with pytest.raises(ValueError, match=r"resnet34\.pt.*does not match the backbone"):
        DELG(resnet, weights=wrong)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(TypeError, match=r"list\.pt.*must hold a state dict"):
        DELG(resnet, weights=listed)
    with pytest.raises(TypeError, match="weights must be a path"):
        DELG(resnet, weights=3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- validation


def test_constructor_validation() -> None:
    resnet = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="backbone must be one of 'resnet50', 'resnet101'"):
        DELG("resnet18")
    with pytest.raises(TypeError, match="backbone must be"):
        DELG(nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]
    dilated = torchvision.models.resnet18(weights=None, replace_stride_with_dilation=[False, False, False])
    assert DELG(dilated).receptive_field.stride == 32
    dilated_layer4 = ResNet(Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[False, False, True])
    with pytest.raises(ValueError, match="layer4"):
        DELG(dilated_layer4)
    for kwargs, error, message in (
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
        ({"global_dim": 0}, ValueError, "global_dim"),
        ({"local_dim": -1}, ValueError, "local_dim"),
        ({"arcface_margin": -0.1}, ValueError, "arcface_margin"),
        ({"arcface_scale": 0.0}, ValueError, "arcface_scale"),
        ({"reconstruction_weight": -1.0}, ValueError, "reconstruction_weight"),
        ({"attention_weight": math.nan}, ValueError, "attention_weight"),
    ):
        with pytest.raises(error, match=message):
            DELG(resnet, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        DELGGlobalHead(in_channels=0)
    with pytest.raises(ValueError, match="hidden_channels"):
        DELGLocalHead(hidden_channels=0)


def test_call_validation(model: DELG) -> None:
    x = images(2)
    with pytest.raises(TypeError, match=r"images must be a torch\.Tensor"):
        model(x.numpy())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"images must be a 4-D tensor of shape \(N, C, H, W\)"):
        model(x[0])
    with pytest.raises(ValueError, match="images must have size C=3"):
        model(x[:, :1])
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        model(x.to(torch.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        model(x[:0])
    with pytest.raises(ValueError, match=r"labels must be a 1-D integer tensor of length 2 \(images.shape\[0\]\)"):
        model(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        model(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="scales must be a non-empty sequence"):
        model.extract_global(x, scales=())
    with pytest.raises(TypeError, match="scales must be a non-empty sequence"):
        model.extract_global(x, scales=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scales\[1\] must be a number in \(0.0, inf\)"):
        model.extract_local(x, scales=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"scales\[0\]"):
        model.extract_local(x, scales=(-0.5,))
    with pytest.raises(ValueError, match="max_features"):
        model.extract_local(x, max_features=0)
    with pytest.raises(TypeError, match="score_threshold"):
        model.extract_local(x, score_threshold="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features must have size C=256"):
        model.local_head(torch.rand(1, 10, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        DELGLocalHead(in_channels=4, dim=2).losses(torch.rand(1, 4, 2, 2), torch.tensor([0]))
    head = DELGLocalHead(in_channels=4, dim=2, num_classes=2)
    with pytest.raises(ValueError, match="attention must have size H=2"):
        head.attention_logits(torch.rand(1, 4, 2, 2), torch.rand(1, 3, 2))


def test_repr_shows_the_configuration(model: DELG) -> None:
    text = repr(model)
    assert "backbone='ResNet', num_classes=4, global_dim=16, local_dim=8" in text
    assert "reconstruction_weight=10.0, attention_weight=1.0" in text
    assert "DELGLocalHead(\n    in_channels=256, dim=8, hidden_channels=512, num_classes=4\n" in text
