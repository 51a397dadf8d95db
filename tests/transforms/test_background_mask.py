"""dml_bias.transforms.BackgroundMask: exact behaviour in v2 pipelines, containers, pickling, workers, errors."""

from __future__ import annotations

import pickle

import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias.transforms import BackgroundMask


def make_sample(h: int = 48, w: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(1, 256, (3, h, w), dtype=torch.uint8, generator=g)  # no zeros: 0 means "masked"
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[:, h // 4 : 3 * h // 4, w // 3 : w - 2] = 255
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "label": 7, "name": "x"}


def geometric() -> list:
    return [v2.RandomResizedCrop(64, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(1.0)]


def run_with_seed(pipeline: v2.Compose, sample: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    return pipeline(sample)


# ------------------------------------------------------------------------------------------- exact behaviour
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_after_crop_and_flip_is_exact(seed: int) -> None:
    sample = make_sample()
    out = run_with_seed(v2.Compose([*geometric(), BackgroundMask("hard")]), sample, seed)
    ref = run_with_seed(v2.Compose(geometric()), sample, seed)  # same crop, same flip, no masking
    image, mask = out["image"], out["mask"]
    assert isinstance(image, tv_tensors.Image)
    assert image.shape == (3, 64, 64)
    assert image.dtype == torch.uint8
    assert torch.equal(mask, ref["mask"])  # the mask moved with the image and came back unchanged
    fg = (ref["mask"] > 127).expand(3, -1, -1)
    assert 0 < int(fg.sum()) < fg.numel()
    assert bool((image[~fg] == 0).all())
    assert torch.equal(image[fg], ref["image"][fg])
    assert bool((ref["image"][~fg] != 0).any())  # the check above is not vacuous


def test_soft_float_after_todtype_is_exactly_sigma_x() -> None:
    sample = make_sample()
    steps = [*geometric(), v2.ToDtype(torch.float32, scale=True)]
    out = run_with_seed(v2.Compose([*steps, BackgroundMask("soft", sigma=0.3)]), sample, 3)
    ref = run_with_seed(v2.Compose(steps), sample, 3)
    fg = (ref["mask"] > 127).expand(3, -1, -1)
    assert out["image"].dtype == torch.float32
    assert torch.equal(out["image"][~fg], ref["image"][~fg] * 0.3)
    assert torch.equal(out["image"][fg], ref["image"][fg])


def test_soft_uint8_rounds_half_to_even() -> None:
    sample = make_sample()
    out = run_with_seed(v2.Compose([*geometric(), BackgroundMask("soft", sigma=0.5)]), sample, 4)
    ref = run_with_seed(v2.Compose(geometric()), sample, 4)
    fg = (ref["mask"] > 127).expand(3, -1, -1)
    expected = torch.tensor([round(v * 0.5) for v in ref["image"][~fg].tolist()], dtype=torch.uint8)
    assert torch.equal(out["image"][~fg], expected)
    assert torch.equal(out["image"][fg], ref["image"][fg])


@pytest.mark.parametrize("float_image", [False, True])
def test_channel_mode_appends_mask_last(float_image: bool) -> None:
    sample = make_sample()
    steps = geometric() + ([v2.ToDtype(torch.float32, scale=True)] if float_image else [])
    out = run_with_seed(v2.Compose([*steps, BackgroundMask("channel")]), sample, 5)
    ref = run_with_seed(v2.Compose(steps), sample, 5)
    image = out["image"]
    assert isinstance(image, tv_tensors.Image)
    assert image.shape == (4, 64, 64)
    assert torch.equal(image[:3], ref["image"])
    scale = 1.0 if float_image else 255
    assert torch.equal(image[3:], (ref["mask"] > 127).to(image.dtype) * scale)


def test_after_normalize_zero_is_the_mean() -> None:
    sample = make_sample()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    pre = v2.Compose([v2.ToDtype(torch.float32, scale=True), BackgroundMask("hard"), v2.Normalize(mean, std)])
    post = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), BackgroundMask("hard")])
    a, b = pre(sample)["image"], post(sample)["image"]
    bg = sample["mask"][0] == 0
    assert torch.allclose(a[:, bg], (-torch.tensor(mean) / torch.tensor(std))[:, None])  # black, normalised
    assert bool((b[:, bg] == 0).all())  # the mean colour
    assert torch.allclose(a[:, ~bg], b[:, ~bg])


# ------------------------------------------------------------------------------------------- smoke
@pytest.mark.parametrize("mode", ["hard", "soft", "channel"])
@pytest.mark.parametrize("container", ["dict", "list", "tuple", "nested"])
@pytest.mark.parametrize("pickled", [False, True])
def test_smoke_containers(mode: str, container: str, pickled: bool) -> None:
    s = make_sample(16, 12)
    junk_tensor, boxes = (
        torch.tensor([1, 2, 3]),
        tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(16, 12)),
    )
    leaves = [s["image"], s["mask"], 7, "name", junk_tensor, boxes, None]
    if container == "dict":
        sample = dict(zip("abcdefg", leaves, strict=True))
    elif container == "list":
        sample = list(leaves)
    elif container == "tuple":
        sample = tuple(leaves)
    else:
        sample = {"x": [leaves[0], {"m": leaves[1]}], "y": (leaves[2], leaves[3]), "z": leaves[4:]}
    transform = BackgroundMask(mode)
    if pickled:
        transform = pickle.loads(pickle.dumps(transform))
    out = transform(sample)
    flat_in, _ = torch.utils._pytree.tree_flatten(sample)
    flat_out, _ = torch.utils._pytree.tree_flatten(out)
    assert type(out) is type(sample)
    assert len(flat_in) == len(flat_out)
    for a, b in zip(flat_in, flat_out, strict=True):
        if a is s["image"]:
            assert isinstance(b, tv_tensors.Image)
            assert b.shape[0] == (4 if mode == "channel" else 3)
        else:
            assert b is a  # mask, label, string, pure tensor, boxes, None: by identity


@pytest.mark.parametrize("mode", ["hard", "soft", "channel"])
def test_pil_and_pure_tensor_images(mode: str) -> None:
    s = make_sample(16, 12)
    fg = s["mask"][0] > 0
    pil = PIL.Image.fromarray(s["image"].permute(1, 2, 0).numpy())
    out = BackgroundMask(mode)({"image": pil, "mask": s["mask"]})["image"]
    expected = BackgroundMask(mode)({"image": s["image"], "mask": s["mask"]})["image"]
    if mode == "channel":
        assert isinstance(out, tv_tensors.Image)
        assert torch.equal(out, expected)
    else:
        assert isinstance(out, PIL.Image.Image)
        assert out.mode == "RGB"
        assert out.size == (12, 16)
        assert torch.equal(v2.functional.pil_to_tensor(out), expected.as_subclass(torch.Tensor))
    grey = PIL.Image.fromarray(s["image"][0].numpy())  # mode "L"
    if mode != "channel":
        assert BackgroundMask(mode)((grey, s["mask"]))[0].mode == "L"
    pure = s["image"].as_subclass(torch.Tensor)
    out = BackgroundMask(mode)((pure, s["mask"]))[0]
    assert type(out) is torch.Tensor
    assert torch.equal(out, expected.as_subclass(torch.Tensor))
    assert bool((out[:3, ~fg] == (0 if mode == "hard" else out[:3, ~fg])).all())


def test_video_and_second_pure_tensor() -> None:
    s = make_sample(8, 8)
    video = tv_tensors.Video(torch.randint(1, 256, (5, 3, 8, 8), dtype=torch.uint8))
    extra = torch.randint(1, 256, (3, 8, 8), dtype=torch.uint8)  # pure tensor next to a Video: passed through
    out = BackgroundMask("channel")({"v": video, "mask": s["mask"], "extra": extra})
    assert isinstance(out["v"], tv_tensors.Video)
    assert out["v"].shape == (5, 4, 8, 8)
    assert torch.equal(out["v"][:, 3], (s["mask"][0] > 0).expand(5, 8, 8).to(torch.uint8) * 255)
    assert out["extra"] is extra


def test_inputs_not_modified_and_extra_repr() -> None:
    s = make_sample(16, 12)
    image0, mask0 = s["image"].clone(), s["mask"].clone()
    for mode in ("hard", "soft", "channel"):
        BackgroundMask(mode, soft_alpha=True)(s)
    assert torch.equal(s["image"], image0)
    assert torch.equal(s["mask"], mask0)
    assert repr(BackgroundMask("soft", sigma=0.25)) == "BackgroundMask(mode='soft', sigma=0.25, threshold=0.5)"
    assert "background_ids=(0, 3)" in repr(BackgroundMask(background_ids=[0, 3]))


def test_class_id_mask_and_soft_alpha() -> None:
    s = make_sample(8, 8)
    ids = torch.zeros(1, 8, 8, dtype=torch.int64)
    ids[:, 2:5, 2:5] = 4
    ids[:, 6:, :] = 9
    out = BackgroundMask("hard", background_ids=[0, 9])({"image": s["image"], "mask": tv_tensors.Mask(ids)})["image"]
    fg = ids[0] == 4
    assert torch.equal(out[:, fg], s["image"][:, fg])
    assert bool((out[:, ~fg] == 0).all())
    soft = tv_tensors.Mask(torch.full((1, 8, 8), 51, dtype=torch.uint8))  # level 0.2 everywhere
    image = tv_tensors.Image(torch.ones(3, 8, 8, dtype=torch.float64))
    out = BackgroundMask("soft", sigma=0.5, soft_alpha=True)({"image": image, "mask": soft})["image"]
    level = torch.tensor(51, dtype=torch.float64) / 255
    assert torch.allclose(out, level + (1 - level) * 0.5, rtol=0, atol=1e-15)


@pytest.mark.cuda
def test_cuda_sample() -> None:
    s = make_sample(16, 12)
    gpu = {"image": s["image"].cuda(), "mask": s["mask"].cuda(), "label": 1}
    for mode in ("hard", "soft", "channel"):
        out = BackgroundMask(mode)(gpu)["image"]
        assert out.is_cuda
        assert torch.equal(out.cpu(), BackgroundMask(mode)(s)["image"])


class _Tiny(Dataset):
    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return self.transform(make_sample(16, 16, seed=i))


def test_inside_dataloader_with_workers() -> None:
    transform = v2.Compose(
        [v2.RandomHorizontalFlip(), BackgroundMask("channel"), v2.ToDtype(torch.float32, scale=True)]
    )
    loader = DataLoader(_Tiny(transform), batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (2, 4, 16, 16)
        assert batch["image"].dtype == torch.float32
        fg = batch["mask"] > 127
        assert torch.equal(batch["image"][:, 3:], fg.float())


# ------------------------------------------------------------------------------------------- bad input
def test_errors_name_shapes_and_values() -> None:
    s = make_sample(16, 12)
    with pytest.raises(ValueError, match=r"exactly one tv_tensors.Mask in the sample, found none"):
        BackgroundMask()({"image": s["image"], "label": 1})
    with pytest.raises(ValueError, match=r"found 2 \(\(1, 16, 12\), \(1, 8, 8\)\)"):
        BackgroundMask()({"image": s["image"], "m1": s["mask"], "m2": tv_tensors.Mask(torch.zeros(1, 8, 8))})
    small = tv_tensors.Mask(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mask shape \(1, 8, 8\).*image shape \(3, 16, 12\)"):
        BackgroundMask()({"image": s["image"], "mask": small})
    with pytest.raises(ValueError, match=r"single channel .*with 3 channels"):
        BackgroundMask()({"image": s["image"], "mask": tv_tensors.Mask(torch.zeros(3, 16, 12))})
    with pytest.raises(ValueError, match=r"sigma must be a number in \(0.0, 1.0\), got 1.5"):
        BackgroundMask("soft", sigma=1.5)
    with pytest.raises(ValueError, match=r"mode must be one of 'hard', 'soft', 'channel', got 'alpha'"):
        BackgroundMask("alpha")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0.0, 1.0\], got 2"):
        BackgroundMask(threshold=2)
