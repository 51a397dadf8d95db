"""The test contract (``tests/contract.py``) for the mask transforms and their functionals, plus the
container / pickle smoke test of :class:`~dml_bias.transforms.BackgroundSwap` (the one ``BackgroundMask`` has in
``tests/transforms/test_background_mask.py``)."""

from __future__ import annotations

import pickle
from typing import Any

import contract as C
import pytest
import torch
from contract import Call, Entry, call, instance, tensor
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias import transforms as T
from dml_bias.transforms import functional as TF

F64 = torch.float64
DONOR_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def image(dtype: torch.dtype, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def mask(size: int = 8, shift: int = 0) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.uint8)
    m[:, 2 + shift : 5 + shift, 2:5] = 255
    return m


FG = mask()[0] > 0


def sample(dtype: torch.dtype, seed: int = 0, label: int = 0, index: int = 0) -> dict[str, Any]:
    return {
        "image": tv_tensors.Image(image(dtype, seed)),
        "mask": tv_tensors.Mask(mask(shift=seed % 3)),
        "label": label,
        "index": index,
        "meta": {},
    }


def pool(dtype: torch.dtype) -> list[dict[str, Any]]:
    return [sample(dtype, i, int(DONOR_LABELS[i]), i) for i in range(6)]


def hard_ref(img: torch.Tensor, m: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    """The image with every background pixel (mask <= 0.5 x 255) set to 0, one pixel at a time."""
    out = img.double().clone()
    for y in range(m.shape[-2]):
        for x in range(m.shape[-1]):
            if not float(m[..., y, x].flatten()[0]) / 255 > 0.5:
                out[:, y, x] = 0
    return out


def channel_ref(img: torch.Tensor, m: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    return torch.cat([img.double(), (m.double() / 255 > 0.5).double()])


def swap_expect(out: Any, dtype: torch.dtype) -> None:
    img, info = out
    tensor((3, 8, 8))(img, dtype)
    assert isinstance(info, dict)
    assert info["fill"] in TF.FILLS


def adapt_ref(conv: nn.Conv2d, in_channels: int, **_: Any) -> torch.Tensor:
    torch.manual_seed(0)
    rgb = nn.Conv2d(3, 2, 3).weight.detach().double()
    return torch.cat([rgb, torch.zeros(2, in_channels - 3, 3, 3, dtype=F64)], dim=1)


def make_conv(dtype: torch.dtype) -> Call:
    torch.manual_seed(0)
    return call(nn.Conv2d(3, 2, 3).double().to(dtype), 4)


SWAP_NOT_DIFF = "a data transform on images: no gradient flows through a background swap"
IMAGE_OP = "an image operation: the image is not differentiated (masks select pixels)"

ENTRIES: list[Entry] = [
    Entry(
        "dml_bias.transforms.functional:mask_background",
        lambda dtype: call(image(dtype), mask(), "hard"),
        tensor((3, 8, 8)),
        reference=hard_ref,
        grad=(0,),
        tag="hard",
    ),
    Entry(
        "dml_bias.transforms.functional:mask_background",
        lambda dtype: call(image(dtype), mask(), "channel"),
        tensor((4, 8, 8)),
        reference=channel_ref,
        grad=(0,),
        tag="channel",
    ),
    Entry(
        "dml_bias.transforms.functional:foreground_mask",
        lambda dtype: call(mask()),
        tensor((1, 8, 8), torch.bool),
        reference=lambda m, *_: torch.tensor([[[float(v) / 255 > 0.5 for v in row] for row in m[0]]]),
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": "masks are integer or boolean: the output is bool"},
    ),
    Entry(
        "dml_bias.transforms.functional:choose_donor",
        lambda dtype: call("mixed_next", DONOR_LABELS.clone(), 5, generator=torch.Generator().manual_seed(0)),
        lambda out, dtype: None if isinstance(out, int) else pytest.fail(f"expected an int, got {type(out)}"),
        out=lambda i: int(DONOR_LABELS[i]),
        reference=lambda rule, labels, index, **_: (int(labels[index]) + 1) % 3,  # the next class
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": C.CPU_ONLY},
    ),
    Entry(
        "dml_bias.transforms.functional:swap_background",
        lambda dtype: call(image(dtype), mask(), image(dtype, 1), mask(shift=2), fill="black", dilation=0),
        swap_expect,
        out=lambda o: o[0][:, FG],
        reference=lambda img, *_, **__: img.double()[:, FG],  # the object is kept exactly
        skip={"gradcheck": SWAP_NOT_DIFF},
    ),
    Entry(
        "dml_bias.transforms.functional:make_variant",
        lambda dtype: call("no_fg", image(dtype), mask()),
        lambda out, dtype: tensor((3, 8, 8))(out[0], dtype),
        out=lambda o: o[0][:, FG],
        reference=lambda name, img, m, **_: torch.zeros(3, int(FG.sum()), dtype=F64),  # the object removed
        skip={"gradcheck": IMAGE_OP},
    ),
    Entry(
        "dml_bias.transforms:BackgroundMask",
        lambda dtype: call(sample(dtype)),
        instance(dict, image=tensor((3, 8, 8), kind=tv_tensors.Image)),
        make=lambda dtype: T.BackgroundMask("hard"),
        out=lambda s: s["image"].as_subclass(torch.Tensor),
        reference=lambda s: hard_ref(s["image"], s["mask"]),
        twin=lambda t: lambda s: {**s, "image": TF.mask_background(s["image"], s["mask"], t.mode)},
        container=True,
        skip={"gradcheck": IMAGE_OP},
    ),
    Entry(
        "dml_bias.transforms:BackgroundSwap",
        lambda dtype: call(sample(dtype, 3, label=1, index=3)),
        instance(dict, image=tensor((3, 8, 8), kind=tv_tensors.Image), meta=instance(dict)),
        make=lambda dtype: T.BackgroundSwap(pool(dtype), variant="mixed_next", fill="black", seed=0, dilation=0),
        out=lambda s: (s["image"].as_subclass(torch.Tensor)[:, mask(shift=0)[0] > 0], s["meta"]["donor_class"]),
        reference=lambda s: (s["image"].double()[:, mask()[0] > 0], 2),  # the object kept; a class-2 donor
        container=True,
        skip={"gradcheck": SWAP_NOT_DIFF, "twin": "its functional form is swap_background (its own entry)"},
    ),
    Entry(
        "dml_bias.transforms:adapt_input_conv",
        make_conv,
        lambda out, dtype: tensor((2, 4, 3, 3))(out.weight, dtype),
        out=lambda conv: conv.weight.detach(),
        reference=adapt_ref,
        skip={
            "gradcheck": "changes a module's structure: nothing to differentiate",
            "unchanged": "documented: adapts the given conv (or model) in place and returns it, like timm's",
        },
    ),
]


@pytest.mark.parametrize(("entry", "check"), C.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    C.run(entry, check)


# ------------------------------------------------------------------------------- BackgroundSwap containers


@pytest.mark.parametrize("container", ["dict", "list", "tuple", "nested"])
@pytest.mark.parametrize("pickled", [False, True])
@pytest.mark.parametrize("composed", [False, True])
def test_background_swap_smoke_containers(container: str, pickled: bool, composed: bool) -> None:
    s = sample(torch.float32, 1, label=0)
    junk = torch.tensor([1, 2, 3])
    boxes = tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(8, 8))
    leaves = [s["image"], s["mask"], 7, "name", junk, boxes, None]
    if container == "dict":
        data: Any = dict(zip("abcdefg", leaves, strict=True))
    elif container == "list":
        data = list(leaves)
    elif container == "tuple":
        data = tuple(leaves)
    else:
        data = {"x": [leaves[0], {"m": leaves[1]}], "y": (leaves[2], leaves[3]), "z": leaves[4:]}
    transform: Any = T.BackgroundSwap(pool(torch.float32), variant="random", fill="black", seed=0, dilation=0)
    if composed:
        transform = v2.Compose([transform])
    if pickled:
        transform = pickle.loads(pickle.dumps(transform))
    out = transform(data)
    flat_in, _ = torch.utils._pytree.tree_flatten(data)
    flat_out, _ = torch.utils._pytree.tree_flatten(out)
    assert type(out) is type(data)
    assert len(flat_in) == len(flat_out)
    fg = s["mask"][0] > 0
    for a, b in zip(flat_in, flat_out, strict=True):
        if a is s["image"]:
            assert isinstance(b, tv_tensors.Image)
            assert b.shape == a.shape
            assert torch.equal(b[:, fg], a[:, fg])  # the object is kept
            assert not torch.equal(b, a)  # the background is not
        else:
            assert b is a  # mask, number, string, pure tensor, boxes, None: by identity
    # the same seed and call order give the same output after the round trip
    again: Any = T.BackgroundSwap(pool(torch.float32), variant="random", fill="black", seed=0, dilation=0)
    assert torch.equal(torch.utils._pytree.tree_flatten(again(data))[0][0], flat_out[0])
