"""Background swapping: swap_background, make_variant, choose_donor, BackgroundSwap."""

from __future__ import annotations

import pickle

import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias.transforms import BackgroundSwap
from dml_bias.transforms.functional import choose_donor, make_variant, mask_background, swap_background

H, W = 32, 40


def scene(seed: int, box: tuple[int, int, int, int], object_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured background with values in [0, 100] and a 255-valued object in one channel."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 101, (3, H, W), dtype=torch.uint8, generator=g)
    mask = torch.zeros(1, H, W, dtype=torch.uint8)
    top, bottom, left, right = box
    mask[:, top:bottom, left:right] = 255
    image[:, top:bottom, left:right] = 0
    image[object_channel, top:bottom, left:right] = 255
    return image, mask


def reference_tile(donor: torch.Tensor, box, source, offset) -> torch.Tensor:
    """Loop reference of the documented tiling: box pixel (y, x) copies source ((y-top+oy) % sh, (x-left+ox) % sw)."""
    out = donor.clone()
    top, bottom, left, right = box
    s_top, s_bottom, s_left, s_right = source
    sh, sw = s_bottom - s_top, s_right - s_left
    for y in range(top, bottom):
        for x in range(left, right):
            out[:, y, x] = donor[:, s_top + (y - top + offset[0]) % sh, s_left + (x - left + offset[1]) % sw]
    return out


# ------------------------------------------------------------------------------------------- swap_background
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_tile_fill_leaves_no_donor_object(seed: int | None) -> None:
    image, mask = scene(0, (4, 12, 4, 14), object_channel=1)
    donor, donor_mask = scene(1, (14, 26, 18, 30), object_channel=0)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    originals = [t.clone() for t in (image, mask, donor, donor_mask)]
    out, info = swap_background(image, mask, donor, donor_mask, dilation=2, generator=g)
    for before, after in zip(originals, (image, mask, donor, donor_mask), strict=True):
        assert torch.equal(before, after)  # nothing modified in place
    assert info["fill"] == "tile"
    assert info["box"] == (12, 28, 16, 32)
    assert info["tile_source"] == (0, H, 0, 16)  # the largest of the four strips around the box: the left one
    if seed is None:
        assert info["tile_offset"] == (0, 0)
    fg = mask[0] > 127
    donor_fg = donor_mask[0] > 127
    background = out[:, ~fg]
    assert bool((background[0] <= 100).all())  # no donor-object pixel (channel 0 == 255) anywhere in the background
    assert bool((out[:, donor_fg & ~fg][0] <= 100).all())
    assert torch.equal(out[:, fg], image[:, fg])  # the object is kept exactly
    expected_bg = reference_tile(donor, info["box"], info["tile_source"], info["tile_offset"])
    assert torch.equal(out[:, ~fg], expected_bg[:, ~fg])


def test_black_and_inpaint_fills() -> None:
    image, mask = scene(0, (2, 6, 2, 6), object_channel=1)
    donor, donor_mask = scene(1, (14, 26, 18, 30), object_channel=0)
    out, info = swap_background(image, mask, donor, donor_mask, fill="black", dilation=1)
    top, bottom, left, right = info["box"]
    assert (info["fill"], info["box"]) == ("black", (13, 27, 17, 31))
    assert bool((out[:, top:bottom, left:right] == 0).all())
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    outside &= mask[0] == 0
    assert torch.equal(out[:, outside], donor[:, outside])

    out, info = swap_background(image, mask, donor, donor_mask, fill="inpaint", dilation=1)
    region = out[:, top:bottom, left:right]
    assert info["fill"] == "inpaint"
    assert bool((region <= 100).all())  # a mean of background values: no trace of the 255-valued object
    assert torch.equal(out[:, outside], donor[:, outside])
    flat = torch.full((3, H, W), 37, dtype=torch.uint8)
    flat[:, 14:26, 18:30] = 255
    out, _ = swap_background(image, mask, flat, donor_mask, fill="inpaint")
    assert bool((out[:, mask[0] == 0] == 37).all())  # in-painting a constant background is exact


def test_soft_alpha_compositing_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, dtype=torch.float64, generator=g)
    donor = torch.rand(3, H, W, dtype=torch.float64, generator=g)
    donor_mask = torch.zeros(1, H, W)
    donor_mask[:, 20:, 30:] = 1.0
    soft = torch.rand(1, H, W, dtype=torch.float64, generator=g)
    background, info = swap_background(image, torch.zeros(1, H, W), donor, donor_mask)
    out, info2 = swap_background(image, soft, donor, donor_mask)
    assert info == info2
    assert torch.equal(out, image * soft + background * (1 - soft))
    # uint8: computed in float32 and rounded half to even
    image8, donor8 = (image * 255).round().to(torch.uint8), (donor * 255).round().to(torch.uint8)
    mask8 = (soft * 255).round().to(torch.uint8)
    bg8, _ = swap_background(image8, torch.zeros(1, H, W, dtype=torch.uint8), donor8, donor_mask)
    out8, _ = swap_background(image8, mask8, donor8, donor_mask)
    m = mask8.float() / 255
    assert torch.equal(out8, torch.round(image8.float() * m + bg8.float() * (1 - m)).to(torch.uint8))


def test_edge_cases_and_provenance_keys() -> None:
    image, mask = scene(0, (2, 6, 2, 6), object_channel=1)
    donor, _ = scene(1, (14, 26, 18, 30), object_channel=0)
    out, info = swap_background(image, mask, donor, torch.zeros(1, H, W, dtype=torch.uint8))
    assert info["fill"] == "none"
    assert info["box"] is None
    full = torch.full((1, H, W), 255, dtype=torch.uint8)
    out, info = swap_background(image, mask, donor, full, fill="tile")
    assert (info["fill"], info["requested_fill"], info["box"]) == ("black", "tile", (0, H, 0, W))
    assert bool((out[:, mask[0] == 0] == 0).all())
    assert set(info) == {"fill", "requested_fill", "box", "tile_source", "tile_offset", "threshold", "dilation"}


def test_seeded_reproducibility() -> None:
    image, mask = scene(0, (2, 6, 2, 6), object_channel=1)
    donor, donor_mask = scene(1, (10, 20, 10, 20), object_channel=0)
    runs = [
        swap_background(image, mask, donor, donor_mask, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1]["tile_offset"] != runs[2][1]["tile_offset"]


def test_swap_errors() -> None:
    image, mask = scene(0, (2, 6, 2, 6), object_channel=1)
    with pytest.raises(
        ValueError, match=r"donor_image must have the shape and dtype of image, got donor_image shape \(3, 8, 8\)"
    ):
        swap_background(image, mask, torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"donor_mask shape \(1, 8, 8\).*donor_image shape \(3, 32, 40\)"):
        swap_background(image, mask, image, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"fill must be one of 'tile', 'black', 'inpaint', got 'blur'"):
        swap_background(image, mask, image, mask, fill="blur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dilation must be an integer in \[0, inf\), got -1"):
        swap_background(image, mask, image, mask, dilation=-1)
    with pytest.raises(ValueError, match=r"image must be a 3-D tensor of shape \(C, H, W\)"):
        swap_background(image[None], mask, image, mask)


# ------------------------------------------------------------------------------------------- make_variant
def test_variants() -> None:
    image, mask = scene(0, (4, 12, 4, 14), object_channel=1)
    donor = scene(1, (14, 26, 18, 30), object_channel=0)
    fg = mask[0] > 127
    image0 = image.clone()
    for name in ("only_bg_b", "only_bg_t", "no_fg", "only_fg"):
        make_variant(name, image, mask)
    assert torch.equal(image, image0)
    out, info = make_variant("original", image, mask)
    assert torch.equal(out, image)
    assert out.data_ptr() != image.data_ptr()
    out, _ = make_variant("only_fg", image, mask)
    assert torch.equal(out, mask_background(image, mask, "hard"))
    out, _ = make_variant("no_fg", image, mask)
    assert bool((out[:, fg] == 0).all())
    assert torch.equal(out[:, ~fg], image[:, ~fg])
    out, info = make_variant("only_bg_b", image, mask, dilation=1)
    assert (info["fill"], info["box"]) == ("black", (3, 13, 3, 15))
    assert bool((out[:, 3:13, 3:15] == 0).all())
    out, info = make_variant("only_bg_t", image, mask, dilation=1)
    assert info["fill"] == "tile"
    assert bool((out[1] <= 100).all())  # the object (channel 1 == 255) is gone, tiled over from the background
    for name in ("mixed_same", "mixed_rand", "mixed_next"):
        out, info = make_variant(name, image, mask, donor)
        assert info["variant"] == name
        assert torch.equal(out, swap_background(image, mask, *donor)[0])
        with pytest.raises(
            ValueError, match=rf"variant '{name}' needs donor=\(donor_image, donor_mask\), got NoneType"
        ):
            make_variant(name, image, mask)
    with pytest.raises(ValueError, match=r"name must be one of 'original'.*got 'only_bg'"):
        make_variant("only_bg", image, mask)


# ------------------------------------------------------------------------------------------- choose_donor
def test_choose_donor_rules() -> None:
    labels = torch.tensor([3, 3, 3, 5, 5, 9, 9, 9])  # non-contiguous class ids: the next class of 9 is 3
    g = torch.Generator().manual_seed(0)
    for index in range(len(labels)):
        c = int(labels[index])
        for _ in range(20):
            same = choose_donor("mixed_same", labels, index, generator=g)
            assert same != index
            assert int(labels[same]) == c
            assert int(labels[choose_donor("mixed_rand", labels, index, generator=g)]) != c
            assert int(labels[choose_donor("mixed_next", labels, index, generator=g)]) == {3: 5, 5: 9, 9: 3}[c]
            assert choose_donor("random", labels, index, generator=g) != index
    draws = {choose_donor("mixed_rand", labels, 0, generator=g) for _ in range(200)}
    assert draws == {3, 4, 5, 6, 7}  # uniform over all candidates: every one shows up
    a = [choose_donor("random", labels, 0, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
    assert len(set(a)) == 1
    assert choose_donor("mixed_next", [0, 1, 2], label=2) == 0
    with pytest.raises(ValueError, match=r"no donor satisfies rule 'mixed_same' for label 1 \(index 0\)"):
        choose_donor("mixed_same", [1, 2, 2], 0)
    with pytest.raises(ValueError, match=r"rule must be one of"):
        choose_donor("same", labels, 0)
    with pytest.raises(ValueError, match=r"index must be an integer in \[0, 7\], got 8"):
        choose_donor("random", labels, 8)


# ------------------------------------------------------------------------------------------- BackgroundSwap
def pool_sample(i: int, label: int, size: tuple[int, int] = (H, W)) -> dict:
    g = torch.Generator().manual_seed(i)
    h, w = size
    image = torch.randint(0, 101, (3, h, w), dtype=torch.uint8, generator=g)
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[:, h // 4 : h // 2, w // 4 : w // 2] = 255
    image[:, h // 4 : h // 2, w // 4 : w // 2] = 200 + i
    return {
        "image": tv_tensors.Image(image),
        "mask": tv_tensors.Mask(mask),
        "label": label,
        "index": i,
        "meta": {"k": 1},
    }


POOL = [pool_sample(i, label) for i, label in enumerate([0, 0, 1, 1, 2, 2])]


class Pool(Dataset):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])

    def __len__(self) -> int:
        return len(POOL)

    def __getitem__(self, i: int) -> dict:
        return POOL[i]


class Wrapped(Dataset):
    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return len(POOL)

    def __getitem__(self, i: int) -> dict:
        return self.transform(POOL[i])


@pytest.mark.parametrize("variant", ["mixed_same", "mixed_rand", "mixed_next", "random"])
def test_background_swap_rules_and_provenance(variant: str) -> None:
    swap = BackgroundSwap(Pool(), variant=variant, seed=7)
    for sample in POOL:
        out = swap(sample)
        meta = out["meta"]
        j = meta["donor_index"]
        assert meta["k"] == 1
        assert meta["variant"] == variant
        assert meta["seed"] == 7
        assert meta["fill"] == "tile"
        assert j != sample["index"]
        assert meta["donor_class"] == POOL[j]["label"]
        c = sample["label"]
        if variant == "mixed_same":
            assert meta["donor_class"] == c
        elif variant == "mixed_rand":
            assert meta["donor_class"] != c
        elif variant == "mixed_next":
            assert meta["donor_class"] == (c + 1) % 3
        expected, _ = swap_background(
            sample["image"].as_subclass(torch.Tensor),
            sample["mask"],
            POOL[j]["image"].as_subclass(torch.Tensor),
            POOL[j]["mask"],
            generator=torch.Generator().manual_seed(0),
        )
        fg = sample["mask"][0] > 0
        assert isinstance(out["image"], tv_tensors.Image)
        assert torch.equal(out["image"][:, fg], expected[:, fg])
        assert out["mask"] is sample["mask"]
        assert "donor_index" not in sample["meta"]  # the input's meta is not modified


def test_background_swap_seeding() -> None:
    swap = BackgroundSwap(POOL, seed=3)
    first = [swap(s)["meta"]["donor_index"] for s in POOL]
    again = [swap(s)["meta"]["donor_index"] for s in reversed(POOL)][::-1]
    assert first == again  # seeded per sample: independent of call order
    unseeded = BackgroundSwap(POOL)
    torch.manual_seed(11)
    a = [unseeded(s)["image"] for s in POOL]
    torch.manual_seed(11)
    b = [unseeded(s)["image"] for s in POOL]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert unseeded(POOL[0])["meta"]["seed"] == -1
    clone = pickle.loads(pickle.dumps(swap))
    assert [clone(s)["meta"]["donor_index"] for s in POOL] == first
    assert repr(swap).startswith("BackgroundSwap(donors=6, variant='mixed_rand', fill='tile', p=1.0, seed=3")


def test_background_swap_p_tuple_pil_resize_dtype() -> None:
    never = BackgroundSwap(POOL, p=0.0)
    out = never(POOL[0])
    assert out["image"] is POOL[0]["image"]
    assert out["meta"] == {"k": 1}
    s = POOL[2]
    image, mask = s["image"], s["mask"]
    out = BackgroundSwap(POOL, variant="mixed_next", seed=0)((image, mask, 1))
    assert isinstance(out, tuple)
    assert out[1] is mask
    assert out[2] == 1
    pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
    out_pil = BackgroundSwap(POOL, variant="mixed_next", seed=0)((pil, mask, 1))[0]
    assert isinstance(out_pil, PIL.Image.Image)
    assert torch.equal(v2.functional.pil_to_tensor(out_pil), out[0].as_subclass(torch.Tensor))
    # donors of another size and dtype are resized and converted; the object stays exact
    big = [pool_sample(i, label, (64, 80)) for i, label in enumerate([0, 1])]
    small = {**pool_sample(9, 0), "image": tv_tensors.Image(POOL[0]["image"].float() / 255)}
    out = BackgroundSwap(big, variant="mixed_rand", seed=0)(small)
    fg = small["mask"][0] > 0
    assert out["image"].dtype == torch.float32
    assert torch.equal(out["image"][:, fg], small["image"][:, fg])
    assert out["meta"]["donor_index"] == 1


def test_background_swap_in_dataloader_workers() -> None:
    loader = DataLoader(Wrapped(BackgroundSwap(Pool(), variant="mixed_same", seed=1)), batch_size=3, num_workers=2)
    batches = list(loader)
    donors = torch.cat([b["meta"]["donor_index"] for b in batches]).tolist()
    swap = BackgroundSwap(Pool(), variant="mixed_same", seed=1)
    assert donors == [swap(s)["meta"]["donor_index"] for s in POOL]


def test_background_swap_errors() -> None:
    with pytest.raises(ValueError, match=r"variant must be one of 'mixed_same', 'mixed_rand', 'mixed_next', 'random'"):
        BackgroundSwap(POOL, variant="only_fg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"p must be a number in \[0.0, 1.0\], got 2"):
        BackgroundSwap(POOL, p=2)
    with pytest.raises(ValueError, match=r"donors must be a non-empty sequence"):
        BackgroundSwap([])
    with pytest.raises(ValueError, match=r"donors\[0\] has no integer label"):
        BackgroundSwap([(POOL[0]["image"], POOL[0]["mask"])])
    unlabelled = {"image": POOL[0]["image"], "mask": POOL[0]["mask"]}
    with pytest.raises(ValueError, match=r"needs the sample's integer label"):
        BackgroundSwap(POOL)(unlabelled)
    assert BackgroundSwap(POOL, variant="random", seed=0)(unlabelled)["image"].shape == (3, H, W)
    with pytest.raises(ValueError, match=r"exactly one tv_tensors.Mask in the sample, found none"):
        BackgroundSwap(POOL)({"image": POOL[0]["image"], "label": 0})


@pytest.mark.cuda
def test_swap_background_cuda() -> None:
    image, mask = scene(0, (4, 12, 4, 14), object_channel=1)
    donor, donor_mask = scene(1, (14, 26, 18, 30), object_channel=0)
    for fill in ("tile", "black", "inpaint"):
        cpu, _ = swap_background(image, mask, donor, donor_mask, fill=fill)
        gpu, _ = swap_background(image.cuda(), mask.cuda(), donor.cuda(), donor_mask.cuda(), fill=fill)
        assert torch.equal(gpu.cpu(), cpu)
