"""A sweep of bad inputs across the whole public API, as a demanding user would try them.

Every public function and class of ``tests/api_inventory.txt`` has cases in :data:`CASES` (``"module:name"`` ->
bad calls); each bad call must raise the documented exception with a message that names the argument. A public
name without cases fails :func:`test_every_public_name_has_bad_input_cases` unless :data:`EXEMPT` gives the
reason (constants, result types, exception types). Then: nothing a user passes in is changed by a call (the
parameters' dtype and device included), and every loss gives a finite value and gradient at the float16 /
bfloat16 extremes.

The data-set cases use the real loaders on tiny folders in the real on-disk formats (``datasets/_builders.py``),
missing or damaged on purpose.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision import tv_tensors

sys.path.insert(0, str(Path(__file__).parent / "datasets"))
import _builders as build

import dml_bias
from dml_bias import datasets as DS
from dml_bias import distributed as dist
from dml_bias import heads as H
from dml_bias import losses as L
from dml_bias import metrics as M
from dml_bias import retrieval as R
from dml_bias import similarity as S
from dml_bias import transforms as T
from dml_bias.datasets import (
    CUB200,
    AnnotationError,
    Cars196,
    CorruptImageError,
    InShop,
    MPerClassBatchSampler,
    PolyvoreOutfits,
    RevisitedOxfordParis,
    StanfordOnlineProducts,
    SyntheticBackgrounds,
)
from dml_bias.losses import functional as LF
from dml_bias.miners import BatchHardMiner, MultiSimilarityMiner
from dml_bias.transforms import functional as TF

INVENTORY = Path(__file__).with_name("api_inventory.txt")
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Bad:
    """One bad call: ``call()`` must raise ``error`` with a message matching ``match`` (which names the argument)."""

    what: str
    call: Callable[[], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    match: str
    known: str | None = None  # a defect found by the sweep and reported, not fixed here: a strict xfail


def api(path: str) -> Any:
    """The public object at ``"module:name"``, resolved at call time (skips a name this tree does not have)."""
    module, name = path.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{path} is not in this tree")


# ---------------------------------------------------------------------------------------------- shared inputs


def emb(n: int = 6, d: int = 4, **kw: Any) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(n * 31 + d), **kw)


LAB = torch.tensor([0, 0, 1, 1, 2, 2])


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[1] = value
    return x


def image(c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(c * h + w))


def mask(h: int = 8, w: int = 8) -> torch.Tensor:
    m = torch.zeros(1, h, w, dtype=torch.uint8)
    m[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return m


_TMP: list[Path] = []


def fresh_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="dml_bad_input_"))
    _TMP.append(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _cleanup() -> Iterator[None]:
    yield
    for path in _TMP:
        shutil.rmtree(path, ignore_errors=True)


class CliExit(Exception):
    """A ``SystemExit`` of the command line, with its status and stderr, as one exception to match."""


def cli(*argv: str) -> None:
    from dml_bias.bias.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code  # type: ignore[assignment]
    raise CliExit(f"exit {code}: {err.getvalue().strip()}")


def head() -> H.ConditionalSimilarity:
    return H.ConditionalSimilarity(4, 2).eval()


def pan_output(n: int = 4) -> H.ConditionalSimilarityOutput:
    return H.ConditionalSimilarity(8, 6)(torch.randn(n, 8), torch.randn(n, 8))


def nan_logits(out: H.ConditionalSimilarityOutput) -> H.ConditionalSimilarityOutput:
    return out._replace(condition_logits=with_value(out.condition_logits.detach(), NAN))


def nan_weight_head() -> H.ConditionalSimilarity:
    module = head()
    with torch.no_grad():
        module.relevance_layer.weight[0, 0] = NAN
    return module


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


def local_features(n: int = 12, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, 2, generator=g) * 100, nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)


# ---------------------------------------------------------------------------------------------- data folders


def cub_missing_file() -> Any:
    root = fresh_dir()
    build.build_cub(root)
    (root / "CUB_200_2011" / "image_class_labels.txt").unlink()
    return CUB200(root)


def cub_corrupt_line() -> Any:
    root = fresh_dir()
    build.build_cub(root)
    path = root / "CUB_200_2011" / "train_test_split.txt"
    path.write_text(path.read_text().replace(" 1\n", " yes\n", 1))
    return CUB200(root, protocol="classification")


def cub_corrupt_image() -> Any:
    root = fresh_dir()
    info = build.build_cub(root)
    first = sorted(info["names"])[0]
    (root / "CUB_200_2011" / "images" / info["names"][first]).write_bytes(b"not a jpeg")
    ds = CUB200(root, split=None)
    return [ds[i] for i in range(len(ds))]


def cub_missing_segmentations() -> Any:
    root = fresh_dir()
    info = build.build_cub(root)
    shutil.rmtree(info["seg_dir"])
    return CUB200(root, masks=True)


def cars_missing() -> Any:
    return Cars196(fresh_dir())


def cars_corrupt_mat() -> Any:
    root = fresh_dir()
    build.build_cars(root)
    (root / "cars_annos.mat").write_bytes(b"MATLAB 5.0 but not really")
    return Cars196(root)


def sop_corrupt_header() -> Any:
    root = fresh_dir()
    info = build.build_sop(root)
    path = info["base"] / "Ebay_train.txt"
    path.write_text("image_id class path\n" + "\n".join(path.read_text().splitlines()[1:]) + "\n")
    return StanfordOnlineProducts(root)


def sop_short_row() -> Any:
    root = fresh_dir()
    info = build.build_sop(root)
    path = info["base"] / "Ebay_test.txt"
    path.write_text(path.read_text() + "99 3\n")
    return StanfordOnlineProducts(root, split="test")


def inshop_missing() -> Any:
    return InShop(fresh_dir())


def inshop_bad_count() -> Any:
    root = fresh_dir()
    build.build_inshop(root)
    path = next(root.rglob("list_eval_partition.txt"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["999", *lines[1:]]) + "\n")
    return InShop(root)


def polyvore_missing() -> Any:
    return PolyvoreOutfits(fresh_dir())


def polyvore_corrupt_json() -> Any:
    root = fresh_dir()
    build.build_polyvore(root)
    path = next(p for p in root.rglob("*.json") if "train" in p.name)
    path.write_text("{not json")
    return PolyvoreOutfits(root)


def revisited_missing() -> Any:
    return RevisitedOxfordParis(fresh_dir())


def revisited_corrupt_pickle() -> Any:
    root = fresh_dir()
    build.build_revisited(root)
    path = next(root.rglob("*.pkl"))
    path.write_bytes(b"not a pickle")
    return RevisitedOxfordParis(root)


def cub_edited(file: str, line_of_image_1: str, **kwargs: Any) -> Any:
    """A CUB tree whose line for image 1 in ``file`` is replaced (``""``: the file is emptied); the loader."""
    root = fresh_dir()
    build.build_cub(root)
    path = root / "CUB_200_2011" / file
    lines = path.read_text().splitlines()
    text = "" if not line_of_image_1 else "\n".join(line_of_image_1 if ln.split()[0] == "1" else ln for ln in lines)
    path.write_text(text + "\n")
    return CUB200(root, **kwargs)


def cub_sample_of_image_1(line: str) -> Any:
    ds = cub_edited("bounding_boxes.txt", line, split="train", boxes=True)
    return ds[ds.image_ids.index(1)]


def cars_edited(**fields: int) -> Path:
    """A Cars196 tree whose first record (image 1, class 1, a training image) has the given fields."""
    from scipy.io import loadmat, savemat

    root = fresh_dir()
    build.build_cars(root)
    path = root / "cars_annos.mat"
    mat = loadmat(str(path))
    for name, value in fields.items():
        mat["annotations"][0, 0][name] = torch.tensor([[value]]).numpy()
    savemat(path, {"annotations": mat["annotations"], "class_names": mat["class_names"]})
    return root


def sop_edited(keep_rows: int, extra: str = "") -> Any:
    root = fresh_dir()
    info = build.build_sop(root)
    path = info["base"] / "Ebay_train.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[: 1 + keep_rows]) + "\n" + extra)
    return StanfordOnlineProducts(root)


def revisited_query_box(box: list[float], crop_queries: bool) -> Any:
    import pickle

    root = fresh_dir()
    build.build_revisited(root)
    path = next(root.rglob("*.pkl"))
    data = pickle.loads(path.read_bytes())
    data["gnd"][0]["bbx"] = box
    path.write_bytes(pickle.dumps(data))
    return RevisitedOxfordParis(root, split="query", crop_queries=crop_queries)[0]


# ---------------------------------------------------------------------------------------------- the cases

PAIR_LOSS_CLASSES = {
    "dml_bias.losses:MultiSimilarityLoss": L.MultiSimilarityLoss,
    "dml_bias.losses:ContrastiveLoss": L.ContrastiveLoss,
    "dml_bias.losses:TripletMarginLoss": L.TripletMarginLoss,
    "dml_bias.losses:NTXentLoss": L.NTXentLoss,
    "dml_bias.losses:SupConLoss": L.SupConLoss,
}
PAIR_LOSS_FUNCTIONS = {
    "dml_bias.losses.functional:multi_similarity_loss": LF.multi_similarity_loss,
    "dml_bias.losses.functional:contrastive_loss": LF.contrastive_loss,
    "dml_bias.losses.functional:triplet_margin_loss": LF.triplet_margin_loss,
    "dml_bias.losses.functional:ntxent_loss": LF.ntxent_loss,
    "dml_bias.losses.functional:supcon_loss": LF.supcon_loss,
}
HYPER_BAD = {
    "dml_bias.losses:MultiSimilarityLoss": ({"alpha": -1.0}, "alpha"),
    "dml_bias.losses:ContrastiveLoss": ({"neg_margin": NAN}, "neg_margin"),
    "dml_bias.losses:TripletMarginLoss": ({"margin": -0.1}, "margin"),
    "dml_bias.losses:NTXentLoss": ({"temperature": 0}, "temperature"),
    "dml_bias.losses:SupConLoss": ({"temperature": "0.1"}, "temperature"),
}

CASES: dict[str, list[Bad]] = {}


def pair_loss_cases(fn: Callable[..., Any]) -> list[Bad]:
    return [
        Bad("1-D embeddings", lambda: fn(torch.randn(6), LAB), ValueError, r"embeddings must be a 2-D tensor"),
        Bad("integer embeddings", lambda: fn(emb().long(), LAB), TypeError, "embeddings must be a floating-point"),
        Bad("list embeddings", lambda: fn(emb().tolist(), LAB), TypeError, "embeddings must be a torch.Tensor"),
        Bad("empty embeddings", lambda: fn(emb(0), LAB[:0]), ValueError, "embeddings must hold at least one row"),
        Bad("float labels", lambda: fn(emb(), LAB.float()), TypeError, "labels must be a 1-D integer tensor"),
        Bad("short labels", lambda: fn(emb(), LAB[:5]), ValueError, "labels must be a 1-D integer tensor of length 6"),
        Bad("NaN embeddings", lambda: fn(with_value(emb(), NAN), LAB), ValueError, "embeddings must be finite"),
        Bad(
            "inf ref_emb",
            lambda: fn(emb(), LAB, None, with_value(emb(), INF), LAB),
            ValueError,
            "ref_emb must be finite",
        ),
        Bad(
            "zero row",
            lambda: fn(emb() * torch.tensor([[0.0]] + [[1.0]] * 5), LAB),
            ValueError,
            "embeddings must have no row of zero norm",
        ),
        Bad(
            "ref_emb of another width",
            lambda: fn(emb(), LAB, None, emb(3, 5), LAB[:3]),
            ValueError,
            "ref_emb must have size D=4",
        ),
        Bad(
            "index out of range",
            lambda: fn(emb(), None, (torch.tensor([0]), torch.tensor([9]), torch.tensor([1]))),
            ValueError,
            r"indices_tuple\[1\] \(p\) must hold indices",
        ),
        Bad(
            "float indices",
            lambda: fn(emb(), None, (torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2]))),
            TypeError,
            r"indices_tuple\[0\] \(a\) must be a 1-D integer tensor",
        ),
        Bad("unknown distance", lambda: fn(emb(), LAB, distance="manhattan"), ValueError, "distance must be one of"),
    ]


for _key, _fn in PAIR_LOSS_FUNCTIONS.items():
    CASES[_key] = pair_loss_cases(_fn)
for _key, _cls in PAIR_LOSS_CLASSES.items():
    _kw, _name = HYPER_BAD[_key]
    CASES[_key] = [
        *pair_loss_cases(
            lambda *a, _c=_cls, **k: _c(**({"distance": k.pop("distance")} if "distance" in k else {}))(*a, **k)
        ),
        Bad(f"bad {_name}", lambda _c=_cls, _k=_kw: _c(**_k), (ValueError, TypeError), _name),
        Bad(
            "labels on another device",
            lambda _c=_cls: _c()(emb(), LAB.to("meta")),
            ValueError,
            "labels must be on the same device as embeddings",
        ),
    ]
CASES["dml_bias.losses:ContrastiveLoss"] += [
    Bad("pos_margin > neg_margin", lambda: L.ContrastiveLoss(1.0, 0.5), ValueError, "pos_margin must be <= neg_margin"),
    Bad(
        "pos_margin < neg_margin (cosine)",
        lambda: L.ContrastiveLoss(0.0, 1.0, distance="cosine"),
        ValueError,
        "pos_margin must be >= neg_margin",
    ),
]
CASES["dml_bias.losses.functional:contrastive_loss"] += [
    Bad(
        "pos_margin > neg_margin",
        lambda: LF.contrastive_loss(emb(), LAB, pos_margin=2.0, neg_margin=1.0),
        ValueError,
        "pos_margin must be <= neg_margin",
    ),
]

CASES["dml_bias.losses:ProxyAnchorLoss"] = [
    Bad("num_classes 0", lambda: L.ProxyAnchorLoss(0, 4), ValueError, "num_classes must be an integer"),
    Bad("float embedding_size", lambda: L.ProxyAnchorLoss(3, 4.0), TypeError, "embedding_size must be an integer"),
    Bad("negative margin", lambda: L.ProxyAnchorLoss(3, 4, margin=-0.1), ValueError, "margin must be a number"),
    Bad(
        "integer dtype",
        lambda: L.ProxyAnchorLoss(3, 4, dtype=torch.int64),
        TypeError,
        "dtype must be None or a floating-point",
    ),
    Bad("unknown device", lambda: L.ProxyAnchorLoss(3, 4, device="gpu"), ValueError, "device must name a device"),
    Bad("unknown distance", lambda: L.ProxyAnchorLoss(3, 4, distance="l1"), ValueError, "distance must be one of"),
    Bad(
        "label beyond num_classes",
        lambda: L.ProxyAnchorLoss(3, 4)(emb(), LAB + 1),
        ValueError,
        r"labels must lie in \[0, 2\]",
    ),
    Bad(
        "embeddings of another width",
        lambda: L.ProxyAnchorLoss(3, 4)(emb(6, 5), LAB),
        ValueError,
        r"embeddings must have size D=4 \(embedding_size\)",
    ),
    Bad("no labels", lambda: L.ProxyAnchorLoss(3, 4)(emb()), ValueError, "labels must be given"),
    Bad("ref_emb", lambda: L.ProxyAnchorLoss(3, 4)(emb(), LAB, ref_emb=emb()), ValueError, "does not support ref_emb"),
    Bad(
        "inf embeddings",
        lambda: L.ProxyAnchorLoss(3, 4)(with_value(emb(), INF), LAB),
        ValueError,
        "embeddings must be finite",
    ),
    Bad("lr 0", lambda: L.ProxyAnchorLoss(3, 4).param_groups(lr=0.0), ValueError, "lr must be a number"),
]
CASES["dml_bias.losses:AdditiveAngularMarginLoss"] = [
    Bad("margin pi", lambda: L.AdditiveAngularMarginLoss(3, 4, margin=3.2), ValueError, "margin must be a number in"),
    Bad("scale 0", lambda: L.AdditiveAngularMarginLoss(3, 4, scale=0.0), ValueError, "scale must be a number"),
    Bad(
        "integer dtype",
        lambda: L.AdditiveAngularMarginLoss(3, 4, dtype=torch.int32),
        TypeError,
        "dtype must be None or a floating-point",
    ),
    Bad(
        "negative device index",
        lambda: L.AdditiveAngularMarginLoss(3, 4, device=-1),
        ValueError,
        "device must name a device",
    ),
    Bad(
        "label beyond num_classes",
        lambda: L.AdditiveAngularMarginLoss(3, 4)(emb(), LAB * 2),
        ValueError,
        r"labels must lie in \[0, 2\]",
    ),
    Bad(
        "NaN embeddings",
        lambda: L.AdditiveAngularMarginLoss(3, 4)(with_value(emb(), NAN), LAB),
        ValueError,
        "embeddings must be finite",
    ),
    Bad(
        "get_logits of another width",
        lambda: L.AdditiveAngularMarginLoss(3, 4).get_logits(emb(6, 3)),
        ValueError,
        "embeddings must have size D=4",
    ),
]
CASES["dml_bias.losses.functional:proxy_anchor_loss"] = [
    Bad(
        "proxies of another width",
        lambda: LF.proxy_anchor_loss(emb(), LAB, emb(3, 5)),
        ValueError,
        r"proxies must have size D=4 \(embeddings.shape\[1\]\)",
    ),
    Bad(
        "NaN proxies",
        lambda: LF.proxy_anchor_loss(emb(), LAB, with_value(emb(3, 4), NAN)),
        ValueError,
        "proxies must be finite",
    ),
    Bad(
        "1-D proxies",
        lambda: LF.proxy_anchor_loss(emb(), LAB, torch.randn(4)),
        ValueError,
        "proxies must be a 2-D tensor",
    ),
    Bad(
        "zero proxy",
        lambda: LF.proxy_anchor_loss(emb(), LAB, torch.zeros(3, 4)),
        ValueError,
        "proxies must have no row of zero norm",
    ),
    Bad(
        "label beyond proxies",
        lambda: LF.proxy_anchor_loss(emb(), LAB, emb(2, 4)),
        ValueError,
        r"labels must lie in \[0, 1\]",
    ),
    Bad(
        "proxies on another device",
        lambda: LF.proxy_anchor_loss(emb(), LAB, emb(3, 4).to("meta")),
        ValueError,
        "proxies must be on the same device",
    ),
]
CASES["dml_bias.losses.functional:arcface_loss"] = [
    Bad(
        "weight of another width",
        lambda: LF.arcface_loss(emb(), LAB, emb(3, 5)),
        ValueError,
        r"weight must have size D=4 \(embeddings.shape\[1\]\)",
    ),
    Bad(
        "inf weight",
        lambda: LF.arcface_loss(emb(), LAB, with_value(emb(3, 4), INF)),
        ValueError,
        "weight must be finite",
    ),
    Bad(
        "integer weight",
        lambda: LF.arcface_loss(emb(), LAB, torch.ones(3, 4, dtype=torch.long)),
        TypeError,
        "weight must be a floating-point",
    ),
    Bad(
        "negative margin",
        lambda: LF.arcface_loss(emb(), LAB, emb(3, 4), margin=-0.5),
        ValueError,
        "margin must be a number",
    ),
]

CASES["dml_bias.miners:MultiSimilarityMiner"] = [
    Bad("negative epsilon", lambda: MultiSimilarityMiner(-0.1), ValueError, "epsilon must be a number"),
    Bad(
        "NaN embeddings",
        lambda: MultiSimilarityMiner()(with_value(emb(), NAN), LAB),
        ValueError,
        "embeddings must be finite",
    ),
    Bad("no labels", lambda: MultiSimilarityMiner()(emb(), None), ValueError, "labels must be given"),
    Bad(
        "ref_emb without ref_labels",
        lambda: MultiSimilarityMiner()(emb(), LAB, emb(3)),
        ValueError,
        "ref_labels must be given with ref_emb",
    ),
]
CASES["dml_bias.miners:BatchHardMiner"] = [
    Bad("unknown distance", lambda: BatchHardMiner(distance="hamming"), ValueError, "distance must be one of"),
    Bad(
        "inf embeddings", lambda: BatchHardMiner()(with_value(emb(), INF), LAB), ValueError, "embeddings must be finite"
    ),
    Bad(
        "zero row",
        lambda: BatchHardMiner()(torch.zeros(6, 4), LAB),
        ValueError,
        "embeddings must have no row of zero norm",
    ),
    Bad("2-D labels", lambda: BatchHardMiner()(emb(), LAB[:, None]), ValueError, "labels must be a 1-D integer tensor"),
]

# --- PML drop-in: distances, reducers, miners, losses, samplers, testers, utils (names resolved at call time)


def _pml(path: str) -> Any:
    return api(path)


def _triplet_dict(reduction_type: str = "triplet", losses: Any = None) -> dict[str, Any]:
    losses = torch.ones(2) if losses is None else losses
    return {"loss": {"losses": losses, "indices": None, "reduction_type": reduction_type}}


def _tiny_dataset(n: int = 6) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(emb(n), LAB[:n])


CASES["dml_bias.distances:LpDistance"] = [
    Bad("p 0", lambda: _pml("dml_bias.distances:LpDistance")(p=0), ValueError, r"\bp must be a number"),
    Bad(
        "normalize_embeddings 1",
        lambda: _pml("dml_bias.distances:LpDistance")(normalize_embeddings=1),
        TypeError,
        "normalize_embeddings must be a bool",
    ),
    Bad("3-D input", lambda: _pml("dml_bias.distances:LpDistance")()(torch.randn(2, 3, 4)), ValueError, "query_emb"),
    Bad(
        "ref of another width",
        lambda: _pml("dml_bias.distances:LpDistance")()(emb(), emb(3, 5)),
        ValueError,
        "ref_emb must have size D=4",
    ),
]
CASES["dml_bias.distances:CosineSimilarity"] = [
    Bad("power 0", lambda: _pml("dml_bias.distances:CosineSimilarity")(power=0), ValueError, "power must be"),
    Bad(
        "integer input",
        lambda: _pml("dml_bias.distances:CosineSimilarity")()(torch.ones(3, 4, dtype=torch.int64)),
        TypeError,
        "query_emb must be a floating-point",
    ),
]
CASES["dml_bias.distances:DotProductSimilarity"] = [
    Bad("p -1", lambda: _pml("dml_bias.distances:DotProductSimilarity")(p=-1), ValueError, r"\bp must be a number"),
    Bad("power '2'", lambda: _pml("dml_bias.distances:DotProductSimilarity")(power="2"), TypeError, "power must be"),
]
CASES["dml_bias.distances:BaseDistance"] = [
    Bad(
        "is_inverted 'yes'",
        lambda: _pml("dml_bias.distances:BaseDistance")(is_inverted="yes"),
        TypeError,
        "is_inverted",
    ),
    Bad(
        "no compute_mat",
        lambda: _pml("dml_bias.distances:BaseDistance")()(emb()),
        NotImplementedError,
        "compute_mat must be implemented",
    ),
]
CASES["dml_bias.reducers:MeanReducer"] = [
    Bad("empty dict", lambda: _pml("dml_bias.reducers:MeanReducer")()({}, emb(), LAB), TypeError, "loss_dict must be"),
    Bad(
        "reducer as a string",
        lambda: L.TripletMarginLoss(reducer="mean"),
        TypeError,
        "reducer must be a dml_bias.reducers reducer",
    ),
]
CASES["dml_bias.reducers:SumReducer"] = [
    Bad(
        "unknown reduction type",
        lambda: _pml("dml_bias.reducers:SumReducer")()(_triplet_dict("pair"), emb(), LAB),
        ValueError,
        "reduction_type",
    ),
]
CASES["dml_bias.reducers:AvgNonZeroReducer"] = [
    Bad(
        "sub-loss not a dict",
        lambda: _pml("dml_bias.reducers:AvgNonZeroReducer")()({"loss": [1.0]}, emb(), LAB),
        TypeError,
        r"loss_dict\['loss'\] must be a dict",
    ),
]
CASES["dml_bias.reducers:ThresholdReducer"] = [
    Bad("no bounds", lambda: _pml("dml_bias.reducers:ThresholdReducer")(), ValueError, "low or high"),
    Bad(
        "low above high", lambda: _pml("dml_bias.reducers:ThresholdReducer")(1.0, 0.5), ValueError, "low must be < high"
    ),
    Bad("low 'a'", lambda: _pml("dml_bias.reducers:ThresholdReducer")(low="a"), TypeError, "low must be a number"),
]
CASES["dml_bias.reducers:DivisorReducer"] = [
    Bad(
        "no divisor",
        lambda: _pml("dml_bias.reducers:DivisorReducer")()(_triplet_dict(), emb(), LAB),
        ValueError,
        "divisor",
    ),
]
CASES["dml_bias.reducers:DoNothingReducer"] = [
    Bad("not a dict", lambda: _pml("dml_bias.reducers:DoNothingReducer")()("x", emb(), LAB), TypeError, "loss_dict"),
]
CASES["dml_bias.reducers:BaseReducer"] = [
    Bad(
        "losses a float",
        lambda: _pml("dml_bias.reducers:BaseReducer")()(_triplet_dict(losses=1.5), emb(), LAB),
        TypeError,
        r"\['losses'\] must be a tensor",
    ),
    Bad(
        "no reduce",
        lambda: _pml("dml_bias.reducers:BaseReducer")()(_triplet_dict(), emb(), LAB),
        NotImplementedError,
        "reduce must be implemented",
    ),
]
CASES["dml_bias.miners:TripletMarginMiner"] = [
    Bad(
        "unknown type",
        lambda: _pml("dml_bias.miners:TripletMarginMiner")(type_of_triplets="medium"),
        ValueError,
        "type_of_triplets must be one of",
    ),
    Bad("NaN margin", lambda: _pml("dml_bias.miners:TripletMarginMiner")(NAN), ValueError, "margin must be a number"),
    Bad(
        "distance 42",
        lambda: _pml("dml_bias.miners:TripletMarginMiner")(distance=42),
        TypeError,
        "distance must be one of",
    ),
    Bad(
        "NaN embeddings",
        lambda: _pml("dml_bias.miners:TripletMarginMiner")()(with_value(emb(), NAN), LAB),
        ValueError,
        "embeddings must be finite",
    ),
]
CASES["dml_bias.miners:PairMarginMiner"] = [
    Bad(
        "margin '0.2'", lambda: _pml("dml_bias.miners:PairMarginMiner")("0.2"), TypeError, "pos_margin must be a number"
    ),
    Bad(
        "short labels",
        lambda: _pml("dml_bias.miners:PairMarginMiner")()(emb(), LAB[:3]),
        ValueError,
        "labels must be a 1-D integer tensor of length 6",
    ),
]
CASES["dml_bias.miners:BaseMiner"] = [
    Bad("no mine", lambda: _pml("dml_bias.miners:BaseMiner")()(emb(), LAB), NotImplementedError, "mine must be"),
]
CASES["dml_bias.losses:ArcFaceLoss"] = [
    Bad("margin 180 degrees", lambda: L.ArcFaceLoss(3, 4, margin=180.0), ValueError, "margin must be a number in"),
    Bad(
        "Euclidean distance",
        lambda: L.ArcFaceLoss(3, 4, distance=_pml("dml_bias.distances:LpDistance")()),
        ValueError,
        "distance must be a cosine",
    ),
    Bad("labels beyond classes", lambda: L.ArcFaceLoss(3, 4)(emb(), LAB * 2), ValueError, "labels must lie in"),
    Bad(
        "logits of another width",
        lambda: L.ArcFaceLoss(3, 4).get_logits(emb(6, 3)),
        ValueError,
        "embeddings must have size D=4",
    ),
]
CASES["dml_bias.losses:CrossBatchMemory"] = [
    Bad(
        "proxy loss",
        lambda: _pml("dml_bias.losses:CrossBatchMemory")(L.ProxyAnchorLoss(3, 4), 4),
        TypeError,
        "CrossBatchMemory needs a loss",
    ),
    Bad(
        "embedding_size 0",
        lambda: _pml("dml_bias.losses:CrossBatchMemory")(L.ContrastiveLoss(), 0),
        ValueError,
        "embedding_size must be an integer",
    ),
    Bad(
        "batch above memory",
        lambda: _pml("dml_bias.losses:CrossBatchMemory")(L.ContrastiveLoss(), 4, memory_size=4)(emb(), LAB),
        ValueError,
        "at most memory_size",
    ),
    Bad(
        "embeddings of another width",
        lambda: _pml("dml_bias.losses:CrossBatchMemory")(L.ContrastiveLoss(), 4)(emb(6, 5), LAB),
        ValueError,
        "embeddings must have size D=4",
    ),
    Bad(
        "float enqueue_mask",
        lambda: _pml("dml_bias.losses:CrossBatchMemory")(L.ContrastiveLoss(), 4)(
            emb(), LAB, enqueue_mask=torch.ones(6)
        ),
        TypeError,
        "enqueue_mask must be a boolean",
    ),
    Bad(
        "indices_tuple and enqueue_mask",
        lambda: _pml("dml_bias.losses:CrossBatchMemory")(L.ContrastiveLoss(), 4)(
            emb(), LAB, (LAB, LAB, LAB), enqueue_mask=LAB > 0
        ),
        ValueError,
        "indices_tuple and enqueue_mask are mutually exclusive",
    ),
]
CASES["dml_bias.losses:SelfSupervisedLoss"] = [
    Bad("loss a string", lambda: _pml("dml_bias.losses:SelfSupervisedLoss")("ntxent"), TypeError, "loss must be"),
    Bad(
        "views of different lengths",
        lambda: _pml("dml_bias.losses:SelfSupervisedLoss")(L.NTXentLoss())(emb(6), emb(5)),
        ValueError,
        "ref_emb must have as many rows",
    ),
    Bad(
        "symmetric 'yes'",
        lambda: _pml("dml_bias.losses:SelfSupervisedLoss")(L.NTXentLoss(), symmetric="yes"),
        TypeError,
        "symmetric must be a bool",
    ),
]
CASES["dml_bias.samplers:MPerClassSampler"] = [
    Bad("m 0", lambda: _pml("dml_bias.samplers:MPerClassSampler")(LAB, 0), ValueError, r"\bm must be"),
    Bad(
        "batch not a multiple of m",
        lambda: _pml("dml_bias.samplers:MPerClassSampler")(LAB, 2, 5),
        ValueError,
        "batch_size must be a multiple of m",
    ),
    Bad(
        "batch above m x classes",
        lambda: _pml("dml_bias.samplers:MPerClassSampler")(LAB, 2, 8),
        ValueError,
        "batch_size must be <= m x",
    ),
    Bad(
        "length below batch",
        lambda: _pml("dml_bias.samplers:MPerClassSampler")(LAB, 2, 4, length_before_new_iter=2),
        ValueError,
        "length_before_new_iter must be >= batch_size",
    ),
    Bad(
        "float labels",
        lambda: _pml("dml_bias.samplers:MPerClassSampler")(LAB.float(), 2),
        TypeError,
        "labels must be a 1-D integer",
    ),
    Bad(
        "generator 0",
        lambda: _pml("dml_bias.samplers:MPerClassSampler")(LAB, 2, generator=0),
        TypeError,
        "generator must be a torch.Generator",
    ),
]
CASES["dml_bias.testers:BaseTester"] = [
    Bad("batch_size 0", lambda: _pml("dml_bias.testers:BaseTester")(batch_size=0), ValueError, "batch_size must be"),
    Bad(
        "normalize 'yes'",
        lambda: _pml("dml_bias.testers:BaseTester")(normalize_embeddings="yes"),
        TypeError,
        "normalize_embeddings must be a bool",
    ),
    Bad("dtype string", lambda: _pml("dml_bias.testers:BaseTester")(dtype="float32"), TypeError, "dtype must be"),
    Bad(
        "empty dataset",
        lambda: _pml("dml_bias.testers:BaseTester")(progress=False, dataloader_num_workers=0).get_all_embeddings(
            _tiny_dataset(0), nn.Identity()
        ),
        ValueError,
        "dataset must hold at least one item",
    ),
]
CASES["dml_bias.testers:GlobalEmbeddingSpaceTester"] = [
    Bad(
        "empty dataset_dict",
        lambda: _pml("dml_bias.testers:GlobalEmbeddingSpaceTester")(progress=False).test({}, 0, nn.Identity()),
        TypeError,
        "dataset_dict must be a non-empty dict",
    ),
    Bad(
        "unknown split",
        lambda: _pml("dml_bias.testers:GlobalEmbeddingSpaceTester")(progress=False).test(
            {"a": _tiny_dataset()}, 0, nn.Identity(), splits_to_eval=[("b", ["a"])]
        ),
        ValueError,
        "splits_to_eval names splits not in dataset_dict",
    ),
]
_AC = "dml_bias.utils.accuracy_calculator:AccuracyCalculator"
CASES[_AC] = [
    Bad("k 0", lambda: _pml(_AC)(k=0), ValueError, "k must be an integer >= 1"),
    Bad("unknown metric", lambda: _pml(_AC)(include=("recall",)), ValueError, "include must name metrics"),
    Bad("include a string", lambda: _pml(_AC)(include="precision_at_1"), TypeError, "include must be a tuple"),
    Bad("both averages", lambda: _pml(_AC)(avg_of_avgs=True, return_per_class=True), ValueError, "mutually exclusive"),
    Bad("knn_func a string", lambda: _pml(_AC)(knn_func="faiss"), TypeError, "knn_func must be callable"),
    Bad(
        "short labels",
        lambda: _pml(_AC)().get_accuracy(emb(), LAB[:3]),
        ValueError,
        "query_labels must be a 1-D integer tensor of length 6",
    ),
    Bad("float labels", lambda: _pml(_AC)().get_accuracy(emb(), LAB.float()), TypeError, "query_labels must be a 1-D"),
    Bad(
        "reference without labels",
        lambda: _pml(_AC)().get_accuracy(emb(), LAB, emb(4)),
        ValueError,
        "reference_labels must be given",
    ),
    Bad(
        "reference not starting with the query",
        lambda: _pml(_AC)().get_accuracy(emb(), LAB, emb() + 1, LAB, ref_includes_query=True),
        ValueError,
        "ref_includes_query=True",
    ),
    Bad(
        "reference of another width",
        lambda: _pml(_AC)().get_accuracy(emb(), LAB, emb(4, 5), LAB[:4]),
        ValueError,
        "reference must have size D=4",
    ),
    Bad("query a list", lambda: _pml(_AC)().get_accuracy([[1.0]], LAB), TypeError, "query must be a torch.Tensor"),
]
CASES["dml_bias.utils.accuracy_calculator:normalized_mutual_info"] = [
    Bad(
        "2-D labels",
        lambda: _pml("dml_bias.utils.accuracy_calculator:normalized_mutual_info")([[0]], [0]),
        ValueError,
        "labels_true must be 1-D",
    ),
]
CASES["dml_bias.utils.accuracy_calculator:adjusted_mutual_info"] = [
    Bad(
        "lengths differ",
        lambda: _pml("dml_bias.utils.accuracy_calculator:adjusted_mutual_info")([0, 1], [0]),
        ValueError,
        "labels_true and labels_pred must have the same length",
    ),
]
CASES["dml_bias.utils.distributed:DistributedLossWrapper"] = [
    Bad(
        "efficient=True",
        lambda: _pml("dml_bias.utils.distributed:DistributedLossWrapper")(L.ContrastiveLoss(), efficient=True),
        ValueError,
        "efficient=True is not provided",
    ),
    Bad(
        "loss a string",
        lambda: _pml("dml_bias.utils.distributed:DistributedLossWrapper")("loss"),
        TypeError,
        "loss must be a callable",
    ),
]
CASES["dml_bias.utils.distributed:DistributedMinerWrapper"] = [
    Bad(
        "miner None", lambda: _pml("dml_bias.utils.distributed:DistributedMinerWrapper")(None), TypeError, "miner must"
    ),
    Bad(
        "efficient 'no'",
        lambda: _pml("dml_bias.utils.distributed:DistributedMinerWrapper")(BatchHardMiner(), efficient="no"),
        TypeError,
        "efficient must be a bool",
    ),
]

# --- similarity
CASES["dml_bias.similarity:pairwise"] = [
    Bad("unknown metric", lambda: S.pairwise(emb(), metric="l1"), ValueError, "metric must be one of"),
    Bad("y of another width", lambda: S.pairwise(emb(), emb(3, 5)), ValueError, "y must have size D=4"),
    Bad("3-D x", lambda: S.pairwise(torch.randn(2, 3, 4)), ValueError, "x must be a 2-D tensor"),
    Bad("integer x", lambda: S.pairwise(torch.ones(3, 4, dtype=torch.int32)), TypeError, "x must be a floating-point"),
]
CASES["dml_bias.similarity:is_similarity"] = [
    Bad("unknown metric", lambda: S.is_similarity("jaccard"), ValueError, "metric must be one of"),
]
CASES["dml_bias.similarity:normalize"] = [
    Bad(
        "non-tensor",
        lambda: S.normalize([[1.0, 2.0]]),
        TypeError,
        r"\bx must be a torch\.Tensor",
    ),
    Bad(
        "integer x",
        lambda: S.normalize(torch.ones(2, 3, dtype=torch.long)),
        TypeError,
        r"\bx must be a floating-point",
    ),
]

# --- metrics
KS1: dict[Any, dict[str, Any]] = {M.retrieval_metrics: {"ks": (1,)}}
RET = [M.map_at_r, M.r_precision, M.mean_average_precision, M.recall_at_k, M.retrieval_metrics]
for _fn in RET:
    _key = f"dml_bias.metrics.retrieval:{_fn.__name__}"
    CASES[_key] = [
        Bad("NaN query", lambda _f=_fn: _f(with_value(emb(), NAN), LAB), ValueError, "query must be finite"),
        Bad(
            "short labels",
            lambda _f=_fn: _f(emb(), LAB[:4]),
            ValueError,
            "query_labels must be a 1-D integer tensor of length 6",
        ),
        Bad(
            "float labels",
            lambda _f=_fn: _f(emb(), LAB.double()),
            TypeError,
            "query_labels must be a 1-D integer tensor",
        ),
        Bad(
            "single self-excluded query",
            lambda _f=_fn: _f(emb(1), LAB[:1]),
            ValueError,
            "query must hold at least 2 rows",
        ),
        Bad(
            "reference without labels",
            lambda _f=_fn: _f(emb(), LAB, emb(3)),
            ValueError,
            "reference_labels must be given",
        ),
        Bad("unknown metric", lambda _f=_fn: _f(emb(), LAB, metric="l2"), ValueError, "metric must be one of"),
        Bad(
            "all lone queries",
            lambda _f=_fn: _f(emb(), torch.arange(6), **KS1.get(_f, {})),
            ValueError,
            "query_labels must share a label",
        ),
    ]
CASES["dml_bias.metrics.retrieval:retrieval_metrics"] += [
    Bad("ks=[]", lambda: M.retrieval_metrics(emb(), LAB, ks=[]), ValueError, "ks must hold at least one k"),
    Bad("k > n", lambda: M.retrieval_metrics(emb(), LAB, ks=(1, 6)), ValueError, r"ks must be .*\[1, 5\]"),
    Bad("k = 0", lambda: M.retrieval_metrics(emb(), LAB, ks=(0,)), ValueError, "ks must be an integer"),
    Bad("ks a string", lambda: M.retrieval_metrics(emb(), LAB, ks="1"), TypeError, "ks must be a sequence"),
    Bad("unknown key", lambda: M.retrieval_metrics(emb(), LAB, metrics=("ap",)), ValueError, "metrics must hold names"),
    Bad(
        "exclude_self with other reference rows",
        lambda: M.retrieval_metrics(emb(3), LAB[:3], emb(6).flip(0), LAB.flip(0), ks=(1,), exclude_self=True),
        ValueError,
        "query i is reference item i",
    ),
    Bad(
        "meta-device query",
        lambda: M.retrieval_metrics(emb().to("meta"), LAB.to("meta"), ks=(1,)),
        ValueError,
        "query must hold values",
    ),
    Bad(
        "float groups",
        lambda: M.retrieval_metrics(emb(), LAB, ks=(1,), query_groups=LAB.double()),
        TypeError,
        "query_groups must be a 1-D integer tensor",
    ),
    Bad(
        "reference groups missing",
        lambda: M.retrieval_metrics(emb(), LAB, emb(), LAB, ks=(1,), query_groups=LAB),
        ValueError,
        "reference_groups must be given",
    ),
]
CASES["dml_bias.metrics.retrieval:recall_at_k"] += [
    Bad("k = 0", lambda: M.recall_at_k(emb(), LAB, k=0), ValueError, r"^k must be an integer in \[1, 5\], got 0"),
    Bad("k > n", lambda: M.recall_at_k(emb(), LAB, k=6), ValueError, r"^k must be an integer in \[1, 5\], got 6"),
    Bad("float k", lambda: M.recall_at_k(emb(), LAB, k=1.5), TypeError, r"^k must be an integer"),
]
CASES["dml_bias.metrics.knn:knn"] = [
    Bad("k = 0", lambda: M.knn(emb(), k=0), ValueError, r"\bk must be"),
    Bad("k > n", lambda: M.knn(emb(), k=6), ValueError, r"\bk must be"),
    Bad("inf reference", lambda: M.knn(emb(), with_value(emb(3), INF)), ValueError, "reference must be finite"),
    Bad("chunk_size 0", lambda: M.knn(emb(), k=1, chunk_size=0), ValueError, "chunk_size must be"),
]
CASES["dml_bias.metrics:faiss_knn"] = [
    Bad("k = 0", lambda: M.faiss_knn(emb(), k=0), (ValueError, ImportError), r"\bk must be|faiss"),
    Bad(
        "unknown metric",
        lambda: M.faiss_knn(emb(), k=1, metric="hamming"),
        (ValueError, ImportError),
        "metric must be one of|faiss",
    ),
]
CASES["dml_bias.metrics.sharded:sharded_knn"] = [
    Bad("k = 0", lambda: M.sharded_knn(emb(), emb(4), 0), ValueError, r"\bk must be"),
    Bad(
        "NaN shard",
        lambda: M.sharded_knn(emb(), with_value(emb(4), NAN), 1),
        ValueError,
        "reference_shard must be finite",
    ),
    Bad(
        "shard of another width",
        lambda: M.sharded_knn(emb(), emb(4, 5), 1),
        ValueError,
        "reference_shard must have size D=4",
    ),
    Bad(
        "group given as a string outside a run",
        lambda: M.sharded_knn(emb(), emb(4), 1, group="world"),
        TypeError,
        "group must be None or a torch.distributed.ProcessGroup",
    ),
]
CASES["dml_bias.metrics.sharded:sharded_retrieval_metrics"] = [
    Bad(
        "ks=[]",
        lambda: M.sharded_retrieval_metrics(emb(), LAB, emb(), LAB, ks=[]),
        (ValueError, TypeError),
        "ks must be a non-empty",
    ),
    Bad(
        "short shard labels",
        lambda: M.sharded_retrieval_metrics(emb(), LAB, emb(), LAB[:3]),
        ValueError,
        "reference_shard_labels must be",
    ),
    Bad(
        "NaN query",
        lambda: M.sharded_retrieval_metrics(with_value(emb(), NAN), LAB, emb(), LAB),
        ValueError,
        "query must be finite",
    ),
    Bad(
        "query_indices beyond the reference",
        lambda: M.sharded_retrieval_metrics(emb(), LAB, emb(), LAB, ks=(1,), query_indices=torch.arange(6) + 3),
        ValueError,
        "query_indices must be global reference indices below 6",
    ),
    Bad(
        "all lone queries",
        lambda: M.sharded_retrieval_metrics(
            emb(), torch.arange(6), emb(), torch.arange(6), ks=(1,), query_indices=torch.arange(6)
        ),
        ValueError,
        "query_labels must share a label",
    ),
    Bad(
        "chunk_size 0",
        lambda: M.sharded_retrieval_metrics(emb(), LAB, emb(), LAB, chunk_size=0),
        ValueError,
        "chunk_size",
    ),
    Bad(
        "meta-device query",
        lambda: M.sharded_retrieval_metrics(emb().to("meta"), LAB, emb(), LAB),
        ValueError,
        "query must hold values",
    ),
    Bad(
        "unknown key",
        lambda: M.sharded_retrieval_metrics(emb(), LAB, emb(), LAB, metrics=("ap",)),
        ValueError,
        "metrics must",
    ),
]
CASES["dml_bias.metrics.evaluator:RetrievalEvaluator"] = [
    Bad("ks=[]", lambda: M.RetrievalEvaluator(ks=[]), (ValueError, TypeError), "ks must be a non-empty"),
    Bad("device 'gpu'", lambda: M.RetrievalEvaluator(device="gpu"), ValueError, "device must name a device"),
    Bad("device 1.5", lambda: M.RetrievalEvaluator(device=1.5), TypeError, "device must be a torch.device"),  # type: ignore[arg-type]
    Bad("unknown key", lambda: M.RetrievalEvaluator(metrics=("ap",)), ValueError, "metrics must hold names"),
    Bad(
        "meta-device update",
        lambda: M.RetrievalEvaluator().update(emb().to("meta"), LAB.to("meta")),
        ValueError,
        "embeddings must hold values",
    ),
    Bad("unknown metric", lambda: M.RetrievalEvaluator(metric="l3"), ValueError, "metric must be one of"),
    Bad(
        "NaN update",
        lambda: M.RetrievalEvaluator().update(with_value(emb(), NAN), LAB),
        ValueError,
        "embeddings must be finite",
    ),
    Bad(
        "short labels",
        lambda: M.RetrievalEvaluator().update(emb(), LAB[:2]),
        ValueError,
        "labels must be a 1-D integer tensor of length 6",
    ),
    Bad(
        "compute when empty",
        lambda: M.RetrievalEvaluator().compute(),
        (ValueError, RuntimeError),
        "update|empty|no embeddings",
    ),
]
CASES["dml_bias.metrics.protocols:fitb_accuracy"] = [
    Bad(
        "NaN scores",
        lambda: M.fitb_accuracy(with_value(torch.rand(3, 4), NAN), torch.zeros(3, dtype=torch.long)),
        ValueError,
        "scores must be finite",
    ),
    Bad(
        "answer beyond candidates",
        lambda: M.fitb_accuracy(torch.rand(3, 4), torch.tensor([0, 1, 4])),
        ValueError,
        "answers",
    ),
    Bad(
        "1-D scores",
        lambda: M.fitb_accuracy(torch.rand(3), torch.zeros(3, dtype=torch.long)),
        ValueError,
        "scores must be",
    ),
]
CASES["dml_bias.metrics.protocols:compatibility_auc"] = [
    Bad(
        "one class only",
        lambda: M.compatibility_auc(torch.rand(4), torch.ones(4, dtype=torch.long)),
        ValueError,
        "labels",
    ),
    Bad("labels not 0/1", lambda: M.compatibility_auc(torch.rand(4), torch.tensor([0, 1, 2, 1])), ValueError, "labels"),
    Bad("length mismatch", lambda: M.compatibility_auc(torch.rand(4), torch.tensor([0, 1, 1])), ValueError, "labels"),
]
CASES["dml_bias.metrics.revisited:revisited_map"] = [
    Bad(
        "unknown protocol",
        lambda: M.revisited_map(torch.tensor([[0, 1]]), [{"easy": [0], "hard": []}], protocols=("tough",)),
        ValueError,
        "protocols",
    ),
    Bad("gnd length mismatch", lambda: M.revisited_map(torch.tensor([[0, 1]]), [], kappas=(1,)), ValueError, "gnd"),
    Bad(
        "kappa 0",
        lambda: M.revisited_map(torch.tensor([[0, 1]]), [{"easy": [0], "hard": []}], kappas=(0,)),
        ValueError,
        "kappas",
    ),
]
CASES["dml_bias.metrics.revisited:revisited_average_precision"] = [
    Bad("negative num_positives", lambda: M.revisited_average_precision([0], -1), ValueError, "num_positives"),
    Bad("negative rank", lambda: M.revisited_average_precision([-1], 1), ValueError, "positive_ranks"),
]

# --- transforms
CASES["dml_bias.transforms.functional:mask_background"] = [
    Bad(
        "empty image",
        lambda: TF.mask_background(torch.rand(3, 0, 0), torch.zeros(0, 0, dtype=torch.uint8)),
        ValueError,
        "image must have C, H and W >= 1",
    ),
    Bad(
        "mask of another size",
        lambda: TF.mask_background(image(), mask(4, 4)),
        ValueError,
        "mask and image must have the same height and width",
    ),
    Bad(
        "complex mask",
        lambda: TF.mask_background(image(), mask().to(torch.complex64)),
        TypeError,
        "mask must be a real",
    ),
    Bad(
        "sigma 1",
        lambda: TF.mask_background(image(), mask(), "soft", sigma=1.0),
        ValueError,
        "sigma must be a number in",
    ),
    Bad(
        "sigma 0",
        lambda: TF.mask_background(image(), mask(), "soft", sigma=0.0),
        ValueError,
        "sigma must be a number in",
    ),
    Bad("unknown mode", lambda: TF.mask_background(image(), mask(), "blur"), ValueError, "mode must be one of"),
    Bad("float mask > 1", lambda: TF.mask_background(image(), mask().float()), ValueError, "mask must hold values in"),
    Bad(
        "int16 image",
        lambda: TF.mask_background(image().to(torch.int16), mask()),
        TypeError,
        "image must be a tensor of dtype",
    ),
    Bad(
        "2-channel mask",
        lambda: TF.mask_background(image(), mask().expand(2, 8, 8)),
        ValueError,
        "mask must have a single channel",
    ),
    Bad("list image", lambda: TF.mask_background(image().tolist(), mask()), TypeError, "image must be a torch.Tensor"),
]
CASES["dml_bias.transforms.functional:foreground_mask"] = [
    Bad("1-D mask", lambda: TF.foreground_mask(torch.zeros(4)), ValueError, "mask must have shape"),
    Bad("threshold 2", lambda: TF.foreground_mask(mask(), threshold=2.0), ValueError, "threshold must be a number"),
    Bad(
        "empty background_ids",
        lambda: TF.foreground_mask(mask(), background_ids=[]),
        TypeError,
        "background_ids must be a non-empty",
    ),
    Bad(
        "background_ids on a float mask",
        lambda: TF.foreground_mask(mask().float() / 255, background_ids=[0]),
        TypeError,
        "background_ids, mask must be an integer",
    ),
]
CASES["dml_bias.transforms.functional:swap_background"] = [
    Bad(
        "donor of another size",
        lambda: TF.swap_background(image(), mask(), image(3, 6, 6), mask()),
        ValueError,
        "donor_mask|donor_image",
    ),
    Bad(
        "unknown fill",
        lambda: TF.swap_background(image(), mask(), image(), mask(), fill="blur"),
        ValueError,
        "fill must be one of",
    ),
    Bad(
        "negative dilation",
        lambda: TF.swap_background(image(), mask(), image(), mask(), dilation=-1),
        ValueError,
        "dilation must be",
    ),
    Bad(
        "empty image",
        lambda: TF.swap_background(torch.rand(3, 0, 4), torch.zeros(1, 0, 4), image(), mask()),
        ValueError,
        "image must have C, H and W >= 1",
    ),
]
CASES["dml_bias.transforms.functional:make_variant"] = [
    Bad("unknown variant", lambda: TF.make_variant("only_sky", image(), mask()), ValueError, "name must be one of"),
    Bad("mixed without donor", lambda: TF.make_variant("mixed_rand", image(), mask()), ValueError, "donor"),
]
CASES["dml_bias.transforms.functional:choose_donor"] = [
    Bad("unknown rule", lambda: TF.choose_donor("nearest", [0, 1, 1], 0), ValueError, "rule must be one of"),
    Bad("index out of range", lambda: TF.choose_donor("mixed_rand", [0, 1, 1], 5), ValueError, "index"),
    Bad(
        "no other class",
        lambda: TF.choose_donor("mixed_rand", [0, 0, 0], 0),
        ValueError,
        "no donor satisfies rule 'mixed_rand'",
    ),
]
CASES["dml_bias.transforms:BackgroundMask"] = [
    Bad("sigma 1.5", lambda: T.BackgroundMask("soft", sigma=1.5), ValueError, "sigma must be a number in"),
    Bad("unknown mode", lambda: T.BackgroundMask("fuzzy"), ValueError, "mode must be one of"),
    Bad("soft_alpha not bool", lambda: T.BackgroundMask(soft_alpha=1), TypeError, "soft_alpha must be a bool"),
    Bad("no mask in the sample", lambda: T.BackgroundMask()({"image": image()}), (ValueError, TypeError), "mask|Mask"),
]
CASES["dml_bias.transforms:BackgroundSwap"] = [
    Bad("empty donors", lambda: T.BackgroundSwap([]), ValueError, "donors"),
    Bad("p 2", lambda: T.BackgroundSwap([(image(), mask())], p=2.0), ValueError, r"\bp must be"),
    Bad(
        "unknown variant",
        lambda: T.BackgroundSwap([(image(), mask())], variant="only_fg"),
        ValueError,
        "variant must be one of",
    ),
]
CASES["dml_bias.transforms:adapt_input_conv"] = [
    Bad("in_channels 0", lambda: T.adapt_input_conv(nn.Conv2d(3, 4, 3), 0), ValueError, "in_channels must be"),
    Bad(
        "unknown init",
        lambda: T.adapt_input_conv(nn.Conv2d(3, 4, 3), 4, init="random"),
        ValueError,
        "init must be one of",
    ),
    Bad("not a conv", lambda: T.adapt_input_conv(nn.Linear(3, 4), 4), (TypeError, ValueError), "conv_or_model"),
]

# --- data sets
CASES["dml_bias.datasets.cub:CUB200"] = [
    Bad("missing folder", lambda: CUB200(fresh_dir()), FileNotFoundError, "missing"),
    Bad("missing annotation file", cub_missing_file, FileNotFoundError, "image_class_labels.txt"),
    Bad("corrupt split line", cub_corrupt_line, AnnotationError, r"train_test_split.txt, line \d+"),
    Bad("corrupt image", cub_corrupt_image, CorruptImageError, r"\.jpg"),
    Bad("masks without segmentations", cub_missing_segmentations, FileNotFoundError, "segmentations"),
    Bad("unknown split", lambda: CUB200(fresh_dir(), split="val"), ValueError, "split must be one of"),
    Bad(
        "NaN box",
        lambda: cub_edited("bounding_boxes.txt", "1 nan 2.0 5.5 4.0", boxes=True),
        AnnotationError,
        r"bounding_boxes.txt, line 1: box must be finite",
    ),
    Bad(
        "negative box width",
        lambda: cub_edited("bounding_boxes.txt", "1 2.0 2.0 -5.5 4.0", boxes=True),
        AnnotationError,
        r"bounding_boxes.txt, line 1: width and height must be >= 0, got width=-5.5",
    ),
    Bad(
        "box outside the image",
        lambda: cub_sample_of_image_1("1 50.0 2.0 5.5 4.0"),
        AnnotationError,
        r"bounding_boxes.txt, line 1: box .* lies outside the image .*\.jpg of 11x9 pixels",
    ),
    Bad(
        "split flag 2",
        lambda: cub_edited("train_test_split.txt", "1 2", protocol="classification"),
        AnnotationError,
        r"train_test_split.txt, line 1: column is_training_image must be one of \[0, 1\], got 2",
    ),
    Bad("empty images.txt", lambda: cub_edited("images.txt", ""), AnnotationError, r"images.txt: lists no image"),
]
CASES["dml_bias.datasets.cars:Cars196"] = [
    Bad("missing annotations", cars_missing, FileNotFoundError, "cars_annos.mat|missing"),
    Bad("corrupt .mat", cars_corrupt_mat, (AnnotationError, ValueError), "cars_annos.mat"),
    Bad("unknown protocol", lambda: Cars196(fresh_dir(), protocol="fine"), ValueError, "protocol must be one of"),
    Bad(
        "box with x2 < x1",
        lambda: Cars196(cars_edited(bbox_x2=1), boxes=True),
        AnnotationError,
        r"cars_annos.mat, record 1: box must have x1 <= x2",
    ),
    Bad(
        "box outside the image",
        lambda: Cars196(cars_edited(bbox_x2=60), boxes=True)[0],
        AnnotationError,
        r"cars_annos.mat, record 1: box .* lies outside the image .*000001.jpg of 9x7 pixels",
    ),
    Bad(
        "test flag 2",
        lambda: Cars196(cars_edited(test=2)),
        AnnotationError,
        r"cars_annos.mat, record 1: field 'test' must be 0 or 1, got 2",
    ),
]
CASES["dml_bias.datasets.sop:StanfordOnlineProducts"] = [
    Bad("wrong header", sop_corrupt_header, AnnotationError, r"Ebay_train.txt, line 1"),
    Bad("short row", sop_short_row, AnnotationError, r"Ebay_test.txt, line \d+"),
    Bad("unknown split", lambda: StanfordOnlineProducts(fresh_dir(), split="val"), ValueError, "split must be one of"),
    Bad("only a header", lambda: sop_edited(0), AnnotationError, r"Ebay_train.txt: lists no image"),
    Bad(
        "duplicate image_id",
        lambda: sop_edited(2, "1 1 1 bicycle_final/100001_1.JPG\n"),
        AnnotationError,
        r"Ebay_train.txt, line 4: duplicate image_id 1 \(first on line 2\)",
    ),
]
CASES["dml_bias.datasets.inshop:InShop"] = [
    Bad("missing partition file", inshop_missing, FileNotFoundError, "list_eval_partition.txt|missing"),
    Bad("count line disagrees", inshop_bad_count, AnnotationError, "list_eval_partition.txt"),
]
CASES["dml_bias.datasets.polyvore:PolyvoreOutfits"] = [
    Bad("missing folder", polyvore_missing, FileNotFoundError, "missing"),
    Bad("corrupt JSON", polyvore_corrupt_json, AnnotationError, r"\.json"),
    Bad("unknown variant", lambda: PolyvoreOutfits(fresh_dir(), variant="joint"), ValueError, "variant must be one of"),
]
CASES["dml_bias.datasets.revisited:RevisitedOxfordParis"] = [
    Bad("missing folder", revisited_missing, FileNotFoundError, "missing"),
    Bad("corrupt pickle", revisited_corrupt_pickle, AnnotationError, r"\.pkl"),
    Bad("unknown name", lambda: RevisitedOxfordParis(fresh_dir(), name="rrome"), ValueError, "name must be one of"),
    Bad(
        "query box outside the image (cropped)",
        lambda: revisited_query_box([2.0, 1.0, 40.0, 12.0], crop_queries=True),
        AnnotationError,
        r"gnd_roxford5k.pkl, query 0: box .* lies outside the image .*all_souls_000013.jpg of 20x16 pixels",
    ),
    Bad(
        "query box outside the image (uncropped)",
        lambda: revisited_query_box([-30.0, 1.0, 4.0, 12.0], crop_queries=False),
        AnnotationError,
        r"gnd_roxford5k.pkl, query 0: box .* lies outside the image",
    ),
    Bad(
        "infinite query box",
        lambda: revisited_query_box([2.0, 1.0, float("inf"), 12.0], crop_queries=True),
        AnnotationError,
        r"gnd_roxford5k.pkl, query 0: box must be finite",
    ),
]
CASES["dml_bias.datasets.synthetic:SyntheticBackgrounds"] = [
    Bad("unknown split", lambda: SyntheticBackgrounds("val"), ValueError, "split must be one of"),
    Bad(
        "correlation 1.5",
        lambda: SyntheticBackgrounds(background_correlation=1.5),
        ValueError,
        "background_correlation",
    ),
    Bad("num_classes 0", lambda: SyntheticBackgrounds(num_classes=0), ValueError, "num_classes"),
    Bad("unknown variant", lambda: SyntheticBackgrounds(variant="only_sky"), ValueError, "variant must be one of"),
    Bad("image_size 2", lambda: SyntheticBackgrounds(image_size=2), ValueError, "image_size"),
]
CASES["dml_bias.datasets.compatibility:AttributeCompatibility"] = [
    Bad("unknown rule", lambda: DS.AttributeCompatibility(rule="nand"), ValueError, "rule must be one of"),
    Bad("attributes a string", lambda: DS.AttributeCompatibility(attributes="colour"), TypeError, "attributes"),
    Bad("unknown attribute", lambda: DS.AttributeCompatibility(attributes=("size",)), ValueError, "attributes"),
    Bad("noise 0.5", lambda: DS.AttributeCompatibility(noise=0.5), ValueError, "noise"),
    Bad("unknown background", lambda: DS.AttributeCompatibility(background="sky"), ValueError, "background"),
    Bad("float indices", lambda: _compat().labels(torch.tensor([0.0]), torch.tensor([1])), TypeError, "first"),
    Bad("index out of range", lambda: _compat().matches(torch.tensor([0]), torch.tensor([9])), ValueError, "second"),
    Bad("num_pairs 0", lambda: _compat().pairs(0), ValueError, "num_pairs"),
]
CASES["dml_bias.datasets.compatibility:compatibility_labels"] = [
    Bad("float values", lambda: DS.compatibility_labels(torch.zeros(2, 2), torch.zeros(2, 2)), TypeError, "values1"),
    Bad(
        "shape mismatch",
        lambda: DS.compatibility_labels(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
        ValueError,
        "values2",
    ),
    Bad("unknown rule", lambda: DS.compatibility_labels(LAB[:, None], LAB[:, None], "nor"), ValueError, "rule"),
]
CASES["dml_bias.datasets.compatibility:attribute_match_gate"] = [
    Bad("not a tensor", lambda: DS.attribute_match_gate([[1] * 20], torch.zeros(1, 20)), TypeError, "a1"),
    Bad("19 columns", lambda: DS.attribute_match_gate(torch.zeros(2, 19), torch.zeros(2, 19)), ValueError, "a1"),
    Bad("rows differ", lambda: DS.attribute_match_gate(torch.zeros(2, 20), torch.zeros(3, 20)), ValueError, "a2"),
]
CASES["dml_bias.datasets.samplers:MPerClassBatchSampler"] = [
    Bad("m 0", lambda: MPerClassBatchSampler(LAB, 0, 4), ValueError, r"\bm must be"),
    Bad("batch_size not a multiple of m", lambda: MPerClassBatchSampler(LAB, 2, 5), ValueError, "batch_size"),
    Bad("float labels", lambda: MPerClassBatchSampler(LAB.float(), 2, 4), (TypeError, ValueError), "labels"),
    Bad(
        "more classes per batch than exist", lambda: MPerClassBatchSampler(LAB, 2, 8), ValueError, "batch_size|classes"
    ),
    Bad(
        "rank beyond num_replicas", lambda: MPerClassBatchSampler(LAB, 2, 4, num_replicas=2, rank=2), ValueError, "rank"
    ),
]

# --- distributed
CASES["dml_bias.distributed:DistributedLossWrapper"] = [
    Bad("loss not callable", lambda: dist.DistributedLossWrapper(3), TypeError, "loss"),
    Bad(
        "unknown grad_reduction",
        lambda: dist.DistributedLossWrapper(L.NTXentLoss(), grad_reduction="max"),
        ValueError,
        "grad_reduction must be one of",
    ),
    Bad(
        "NaN embeddings",
        lambda: dist.DistributedLossWrapper(L.NTXentLoss())(with_value(emb(), NAN), LAB),
        ValueError,
        "embeddings must be finite",
    ),
]
CASES["dml_bias.distributed:gather_with_grad"] = [
    Bad("non-tensor", lambda: dist.gather_with_grad([1.0]), TypeError, "tensor must be a torch.Tensor"),
]
CASES["dml_bias.distributed:gather_no_grad"] = [
    Bad("non-tensor", lambda: dist.gather_no_grad(1.0), TypeError, "tensor must be a torch.Tensor"),
]
CASES["dml_bias.distributed:average_gradients"] = [
    Bad("not parameters", lambda: dist.average_gradients(3), TypeError, "parameters"),
]
CASES["dml_bias.distributed:broadcast_parameters"] = [
    Bad("not a module", lambda: dist.broadcast_parameters([torch.zeros(1)]), TypeError, "module"),
    Bad("negative src", lambda: dist.broadcast_parameters(nn.Linear(2, 2), src=-1), ValueError, "src"),
]
CASES["dml_bias.distributed:get_rank"] = [
    Bad(
        "group without a process group",
        lambda: dist.get_rank(group="world"),
        (TypeError, ValueError),
        "group",
    ),
]
CASES["dml_bias.distributed:get_world_size"] = [
    Bad(
        "group without a process group",
        lambda: dist.get_world_size(group=3),
        (TypeError, ValueError),
        "group",
    ),
]
CASES["dml_bias.distributed:is_distributed"] = [
    Bad("an argument", lambda: dist.is_distributed(True), TypeError, "is_distributed"),  # type: ignore[call-arg]
]

# --- heads
CASES["dml_bias.heads.pooling:gem"] = [
    Bad("3-D x", lambda: H.gem(torch.rand(2, 3, 4)), ValueError, r"\bx must be a 4-D"),
    Bad("p 0", lambda: H.gem(torch.rand(1, 2, 3, 3), p=0.0), ValueError, r"\bp must be"),
    Bad("eps 0", lambda: H.gem(torch.rand(1, 2, 3, 3), eps=0.0), ValueError, "eps must be"),
    Bad(
        "integer x", lambda: H.gem(torch.ones(1, 2, 3, 3, dtype=torch.long)), TypeError, r"\bx must be a floating-point"
    ),
    Bad("empty map", lambda: H.gem(torch.rand(1, 2, 0, 3)), ValueError, r"\bx must"),
    Bad("NaN x", lambda: H.gem(with_value(torch.rand(1, 2, 3, 3), NAN)), ValueError, r"\bx must be finite"),
    Bad("meta x", lambda: H.gem(torch.rand(1, 2, 3, 3, device="meta")), ValueError, r"\bx must hold values"),
]
CASES["dml_bias.heads.pooling:GeM"] = [
    Bad("p -1", lambda: H.GeM(p=-1.0), ValueError, r"\bp must be"),
    Bad("integer dtype", lambda: H.GeM(dtype=torch.int64), TypeError, "dtype must be None or a floating-point"),
    Bad("unknown device", lambda: H.GeM(learnable=True, device="gpu"), ValueError, "device must name a device"),
    Bad("learnable not bool", lambda: H.GeM(learnable="yes"), TypeError, "learnable must be a bool"),
    Bad("inf x", lambda: H.GeM()(with_value(torch.rand(1, 2, 3, 3), INF)), ValueError, r"\bx must be finite"),
]
CASES["dml_bias.heads.delg:DELGGlobalHead"] = [
    Bad("dim 0", lambda: H.DELGGlobalHead(16, 0), ValueError, "dim must be"),
    Bad(
        "integer dtype",
        lambda: H.DELGGlobalHead(16, 8, dtype=torch.int32),
        TypeError,
        "dtype must be None or a floating-point",
    ),
    Bad(
        "channels mismatch",
        lambda: H.DELGGlobalHead(16, 8)(torch.rand(2, 12, 3, 3)),
        ValueError,
        "features|in_channels",
    ),
    Bad(
        "NaN features",
        lambda: H.DELGGlobalHead(16, 8)(with_value(torch.rand(2, 16, 3, 3), NAN)),
        ValueError,
        "features must be finite",
    ),
    Bad(
        "features on another device",
        lambda: H.DELGGlobalHead(16, 8)(torch.rand(2, 16, 3, 3, device="meta")),
        ValueError,
        r"features must be on the same device as parameters \(cpu\), got device meta",
    ),
]
CASES["dml_bias.heads.delg:DELGLocalHead"] = [
    Bad("hidden_channels 0", lambda: H.DELGLocalHead(16, 4, 0), ValueError, "hidden_channels must be"),
    Bad("unknown device", lambda: H.DELGLocalHead(16, 4, 8, device="tpu:0"), ValueError, "device must name a device"),
    Bad("2-D input", lambda: H.DELGLocalHead(16, 4, 8)(torch.rand(2, 16)), ValueError, "features|must be a 4-D"),
    Bad(
        "one 1x1 location in training",
        lambda: H.DELGLocalHead(16, 4, 8).train()(torch.rand(1, 16, 1, 1)),
        ValueError,
        r"features must give more than one location per batch .* training mode",
    ),
    Bad(
        "inf features",
        lambda: H.DELGLocalHead(16, 4, 8)(with_value(torch.rand(2, 16, 3, 3), INF)),
        ValueError,
        "features must be finite",
    ),
    Bad(
        "NaN attention",
        lambda: H.DELGLocalHead(16, 4, 8, num_classes=3).attention_logits(
            torch.rand(2, 16, 3, 3), with_value(torch.rand(2, 3, 3), NAN)
        ),
        ValueError,
        "attention must be finite",
    ),
]
CASES["dml_bias.heads.delg:DELG"] = [
    Bad("unknown backbone", lambda: H.DELG("resnet7"), ValueError, "backbone"),
    Bad("num_classes 0", lambda: H.DELG("resnet18", num_classes=0), ValueError, "num_classes must be"),
    Bad(
        "missing weights file",
        lambda: H.DELG("resnet50", weights=str(fresh_dir() / "none.pth")),
        FileNotFoundError,
        "none.pth",
    ),
    Bad(
        "NaN images",
        lambda: H.DELG(resnet18(), global_dim=8, local_dim=4).extract_global(with_value(torch.rand(1, 3, 40, 40), NAN)),
        ValueError,
        "images must be finite",
    ),
    Bad(
        "one small image in training",
        lambda: H.DELG(resnet18(), num_classes=3, global_dim=8, local_dim=4).train()(
            torch.rand(1, 3, 32, 32), torch.tensor([0])
        ),
        ValueError,
        r"images must give more than one location per batch .* \(a 1×1 map\)",
    ),
]
CASES["dml_bias.heads.pan:ConditionalSimilarity"] = [
    Bad("num_conditions 0", lambda: H.ConditionalSimilarity(4, 0), ValueError, "num_conditions must be"),
    Bad("unknown joint", lambda: H.ConditionalSimilarity(4, 2, joint="sum"), ValueError, "joint must be one of"),
    Bad("dropout 1", lambda: H.ConditionalSimilarity(4, 2, dropout=1.0), ValueError, "dropout must be"),
    Bad(
        "integer dtype",
        lambda: H.ConditionalSimilarity(4, 2, dtype=torch.long),
        TypeError,
        "dtype must be None or a floating-point",
    ),
    Bad(
        "device of the wrong type",
        lambda: H.ConditionalSimilarity(4, 2, device=["cpu"]),
        TypeError,
        "device must be None",
    ),
    Bad("length mismatch", lambda: head()(emb(4), emb(3)), ValueError, "h2|second"),
    Bad("NaN features", lambda: head().score_matrix(with_value(emb(3), NAN), emb(5)), ValueError, "must be finite"),
    Bad("NaN h1", lambda: head()(with_value(emb(4), NAN), emb(4)), ValueError, "h1 must be finite"),
    Bad("inf gallery", lambda: head().score_matrix(emb(3), with_value(emb(5), -INF)), ValueError, "gallery must be"),
    Bad("inf query (topk)", lambda: head().topk(with_value(emb(3), INF), emb(5), 2), ValueError, "query must be"),
    Bad(
        "NaN parameters",
        lambda: nan_weight_head()(emb(4), emb(4)),
        ValueError,
        r"parameters of ConditionalSimilarity .* must be finite",
    ),
    Bad(
        "too large for float64",
        lambda: head().double()(*(torch.full((1, 4), v, dtype=torch.float64) for v in (1.5e308, -1.5e308))),
        ValueError,
        r"h1 and h2 must be small enough .* float64",
    ),
    Bad(
        "meta head and inputs",
        lambda: H.ConditionalSimilarity(4, 2, device="meta").score_matrix(emb(3).to("meta"), emb(5).to("meta")),
        ValueError,
        "query must hold values .* got a meta tensor",
    ),
]
CASES["dml_bias.heads.pan:PANLoss"] = [
    Bad("negative lam", lambda: H.PANLoss(lam=-1.0), ValueError, "lam must be"),
    Bad("unknown gate", lambda: H.PANLoss(gate="implies"), ValueError, "gate must be one of"),
    Bad("unknown reduction", lambda: H.PANLoss(reduction="max"), ValueError, "reduction must be one of"),
]
CASES["dml_bias.heads.pan:pan_loss"] = [
    Bad("target of another length", lambda: H.pan_loss(pan_output(), torch.tensor([1, 0])), ValueError, "target"),
    Bad("target not 0/1", lambda: H.pan_loss(pan_output(), torch.tensor([0, 1, 2, 1])), ValueError, "target"),
    Bad(
        "a1 without a2",
        lambda: H.pan_loss(pan_output(), torch.tensor([1, 0, 1, 0]), torch.ones(4, 5)),
        ValueError,
        "a2",
    ),
    Bad(
        "more attributes than conditions",
        lambda: H.pan_loss(pan_output(), torch.tensor([1, 0, 1, 0]), torch.ones(4, 7), torch.ones(4, 7)),
        ValueError,
        "a1",
    ),
    Bad(
        "NaN logits",
        lambda: H.pan_loss(nan_logits(pan_output()), torch.tensor([1, 0, 1, 0])),
        ValueError,
        r"output\.condition_logits must be finite",
    ),
    Bad(
        "meta output",
        lambda: H.pan_loss(
            H.ConditionalSimilarityOutput(*(t.detach().to("meta") for t in pan_output())),
            torch.tensor([1, 0, 1, 0], device="meta"),
        ),
        ValueError,
        r"output\.condition_logits must hold values",
    ),
]
CASES["dml_bias.heads.pan:attribute_gate"] = [
    Bad(
        "unknown gate",
        lambda: H.attribute_gate(torch.ones(1, 2), torch.ones(1, 2), "implies"),
        ValueError,
        "gate must be one of",
    ),
    Bad("shape mismatch", lambda: H.attribute_gate(torch.ones(1, 2), torch.ones(1, 3), "or"), ValueError, "a2"),
    Bad(
        "values not 0/1",
        lambda: H.attribute_gate(torch.full((1, 2), 2), torch.ones(1, 2, dtype=torch.long), "or"),
        ValueError,
        "a1",
    ),
    Bad(
        "meta attributes",
        lambda: H.attribute_gate(torch.ones(1, 2, device="meta"), torch.ones(1, 2, device="meta"), "or"),
        ValueError,
        "a1 must hold values",
    ),
]
CASES["dml_bias.heads.pairwise:PairwiseSimilarityModel"] = [
    Bad("encoder not a module", lambda: H.PairwiseSimilarityModel("resnet", head()), TypeError, "encoder"),
    Bad("head not a module", lambda: H.PairwiseSimilarityModel(nn.Identity(), None), TypeError, "head"),
]
CASES["dml_bias.heads.pairwise:sample_pairs"] = [
    Bad("num_pairs 0", lambda: H.sample_pairs(LAB, 0), ValueError, "num_pairs must be"),
    Bad(
        "positive_fraction 2",
        lambda: H.sample_pairs(LAB, 4, positive_fraction=2.0),
        ValueError,
        "positive_fraction must be",
    ),
    Bad("float labels", lambda: H.sample_pairs(LAB.float(), 4), TypeError, "labels must be"),
    Bad("no positive pair", lambda: H.sample_pairs(torch.arange(6), 4), ValueError, "labels"),
    Bad("10**12 pairs", lambda: H.sample_pairs(LAB, 10**12), MemoryError, r"num_pairs=1000000000000 pairs do not fit"),
]
CASES["dml_bias.metrics.protocols:few_shot_episodes"] = [
    Bad(
        "n_way beyond classes",
        lambda: next(M.few_shot_episodes(LAB, n_way=5, k_shot=1, n_query=1)),
        ValueError,
        "n_way",
    ),
    Bad("k_shot 0", lambda: next(M.few_shot_episodes(LAB, n_way=2, k_shot=0, n_query=1)), ValueError, "k_shot must be"),
    Bad(
        "too few samples",
        lambda: next(M.few_shot_episodes(LAB, n_way=2, k_shot=2, n_query=1)),
        ValueError,
        "k_shot|n_query|samples",
    ),
]
CASES["dml_bias.metrics.protocols:few_shot_accuracy"] = [
    Bad(
        "features of another length",
        lambda: M.few_shot_accuracy(head(), emb(5), LAB, n_way=2, k_shot=1, n_query=1),
        ValueError,
        "labels|features",
    ),
    Bad(
        "ddof negative",
        lambda: M.few_shot_accuracy(head(), emb(), LAB, n_way=2, k_shot=1, n_query=1, ddof=-1),
        ValueError,
        "ddof",
    ),
    Bad(
        "NaN features",
        lambda: M.few_shot_accuracy(head(), with_value(emb(), NAN), LAB, n_way=2, k_shot=1, n_query=1),
        ValueError,
        "features must be finite",
    ),
]
CASES["dml_bias.metrics.protocols:fitb_scores"] = [
    Bad("item beyond features", lambda: M.fitb_scores(head(), emb(8), [([0, 1], [2, 99])]), ValueError, "questions"),
    Bad(
        "chunk_size 0",
        lambda: M.fitb_scores(head(), emb(8), [([0, 1], [2, 3])], chunk_size=0),
        ValueError,
        "chunk_size must be",
    ),
    Bad("no candidates", lambda: M.fitb_scores(head(), emb(8), [([0, 1], [])]), ValueError, "questions"),
    Bad(
        "NaN features",
        lambda: M.fitb_scores(head(), with_value(emb(8), NAN), [([0, 1], [2, 3])]),
        ValueError,
        "features must be finite",
    ),
    Bad(
        "a head giving NaN scores",
        lambda: M.fitb_scores(lambda a, b: torch.full((a.shape[0],), NAN), emb(8), [([0, 1], [2, 3])]),
        ValueError,
        r"the scores of head\(h1, h2\) must be finite",
    ),
]
CASES["dml_bias.metrics.protocols:compatibility_scores"] = [
    Bad("item beyond features", lambda: M.compatibility_scores(head(), emb(6), [[0, 9]]), ValueError, "outfits"),
    Bad("one-item outfit", lambda: M.compatibility_scores(head(), emb(6), [[0]]), ValueError, "outfits"),
    Bad("1-D features", lambda: M.compatibility_scores(head(), torch.rand(6), [[0, 1]]), ValueError, "features"),
    Bad(
        "inf features",
        lambda: M.compatibility_scores(head(), with_value(emb(6), INF), [[0, 1]]),
        ValueError,
        "features must be finite",
    ),
]
CASES["dml_bias.retrieval.verification:spatial_verification"] = [
    Bad(
        "locations of another length",
        lambda: R.spatial_verification(
            local_features()[0][:5], local_features()[1], [local_features()[0]], [local_features()[1]]
        ),
        ValueError,
        "query_locations|query_descriptors",
    ),
    Bad(
        "3 coordinates",
        lambda: R.spatial_verification(
            torch.rand(12, 3), local_features()[1], [local_features()[0]], [local_features()[1]]
        ),
        ValueError,
        "query_locations",
    ),
    Bad(
        "max_trials 0",
        lambda: R.spatial_verification(*local_features(), [local_features()[0]], [local_features()[1]], max_trials=0),
        ValueError,
        "max_trials must be",
    ),
    Bad(
        "NaN descriptors",
        lambda: R.spatial_verification(
            local_features()[0], with_value(local_features()[1], NAN), [local_features()[0]], [local_features()[1]]
        ),
        ValueError,
        "query_descriptors must be finite",
    ),
    Bad(
        "inf index location",
        lambda: R.spatial_verification(
            *local_features(), [with_value(local_features()[0], INF)], [local_features()[1]]
        ),
        ValueError,
        "index_locations must be finite",
    ),
    Bad(
        "NaN in a padded index",
        lambda: R.spatial_verification(
            *local_features(), with_value(local_features()[0], NAN)[None], local_features()[1][None]
        ),
        ValueError,
        "index_locations must be finite",
    ),
    Bad(
        "ratio_test 1.5",
        lambda: R.spatial_verification(*local_features(), [local_features()[0]], [local_features()[1]], ratio_test=1.5),
        ValueError,
        "ratio_test must be",
    ),
    Bad(
        "seed 2**64",
        lambda: R.spatial_verification(*local_features(), [local_features()[0]], [local_features()[1]], seed=2**64),
        ValueError,
        r"seed must be an integer in \[-9223372036854775808, 18446744073709551615\]",
    ),
]
CASES["dml_bias.retrieval.reranking:rerank"] = [
    Bad(
        "scores of another shape",
        lambda: R.rerank(
            torch.tensor([[0, 1]]),
            torch.tensor([[0.9]]),
            [local_features()[0]],
            [local_features()[1]],
            [local_features()[0]] * 2,
            [local_features()[1]] * 2,
        ),
        ValueError,
        "scores",
    ),
    Bad(
        "rank beyond the index",
        lambda: R.rerank(
            torch.tensor([[0, 5]]),
            torch.tensor([[0.9, 0.8]]),
            [local_features()[0]],
            [local_features()[1]],
            [local_features()[0]] * 2,
            [local_features()[1]] * 2,
        ),
        ValueError,
        "ranks",
    ),
    Bad(
        "num_to_rerank 0",
        lambda: R.rerank(
            torch.tensor([[0, 1]]),
            torch.tensor([[0.9, 0.8]]),
            [local_features()[0]],
            [local_features()[1]],
            [local_features()[0]] * 2,
            [local_features()[1]] * 2,
            num_to_rerank=0,
        ),
        ValueError,
        "num_to_rerank must be",
    ),
    Bad(
        "junk=[5] (an int, not one list per query)",
        lambda: R.rerank(
            torch.tensor([[0]]),
            torch.tensor([[0.9]]),
            [local_features()[0]],
            [local_features()[1]],
            [local_features()[0]],
            [local_features()[1]],
            junk=[5],
        ),
        TypeError,
        r"junk\[0\] must be an iterable of integer database indices .*got int 5",
    ),
]


def checks_from_environment(value: str) -> bool:
    """``dml_bias.checks_enabled()`` as it reads ``DML_BIAS_CHECKS=value`` on first use (the switch restored)."""
    from dml_bias import _checks

    saved = list(_checks._checks_state)
    _checks._checks_state.clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DML_BIAS_CHECKS", value)
            return dml_bias.checks_enabled()
    finally:
        _checks._checks_state[:] = saved


CASES["dml_bias:set_checks"] = [
    Bad("enabled=0 (an int)", lambda: dml_bias.set_checks(0), TypeError, "enabled must be a bool, got int 0"),
    Bad("enabled='off'", lambda: dml_bias.set_checks("off"), TypeError, "enabled must be a bool"),
]
CASES["dml_bias:checks_enabled"] = [
    Bad("DML_BIAS_CHECKS=maybe", lambda: checks_from_environment("maybe"), ValueError, "DML_BIAS_CHECKS must be"),
]

# --- the bias study (resolved at call time: the package grows while this file is written)
B = "dml_bias.bias"
CASES[f"{B}.config:StudyConfig"] = [
    Bad("sigma 2", lambda: api(f"{B}:StudyConfig")(soft_sigmas=(2.0,)).validate(), ValueError, "soft_sigmas"),
    Bad("unknown loss", lambda: api(f"{B}:StudyConfig")(losses=("focal",)).validate(), ValueError, "losses"),
    Bad("unknown mode", lambda: api(f"{B}:StudyConfig")(modes=("blur",)).validate(), ValueError, "modes"),
    Bad("epochs 0", lambda: api(f"{B}:StudyConfig")(epochs=0).validate(), ValueError, "epochs"),
    Bad("out_dir 5", lambda: api(f"{B}:StudyConfig")(out_dir=5).validate(), TypeError, "out_dir must be None or"),
    Bad("out_dir ''", lambda: api(f"{B}:StudyConfig")(out_dir="").validate(), ValueError, "out_dir must name a"),
    Bad("progress 'no'", lambda: api(f"{B}:StudyConfig")(progress="no").validate(), TypeError, "progress must be"),
    Bad("device cpu:1", lambda: api(f"{B}:StudyConfig")(device="cpu:1").validate(), ValueError, "device must be 'cpu'"),
    Bad("seed 2**63", lambda: api(f"{B}:StudyConfig")(seed=2**63).validate(), ValueError, r"seed must be an integer"),
    Bad("num_threads 0", lambda: api(f"{B}:StudyConfig")(num_threads=0).validate(), ValueError, "num_threads must"),
]
CASES[f"{B}.config:RunSpec"] = [
    Bad("unknown loss", lambda: api(f"{B}:RunSpec")("focal", "none"), ValueError, "loss must be one of"),
    Bad("unknown mode", lambda: api(f"{B}:RunSpec")("proxy_anchor", "blur"), ValueError, "mode must be one of"),
    Bad("soft without sigma", lambda: api(f"{B}:RunSpec")("proxy_anchor", "soft"), ValueError, "sigma must be a"),
    Bad("soft sigma 1.5", lambda: api(f"{B}:RunSpec")("proxy_anchor", "soft", 1.5), ValueError, "sigma must be"),
    Bad("soft sigma '0.2'", lambda: api(f"{B}:RunSpec")("proxy_anchor", "soft", "0.2"), TypeError, "sigma must be"),
    Bad("sigma for hard", lambda: api(f"{B}:RunSpec")("proxy_anchor", "hard", 0.2), ValueError, "sigma must be None"),
]
CASES[f"{B}.study:run_study"] = [
    Bad("config of the wrong type", lambda: api(f"{B}:run_study")({"epochs": 1}), TypeError, "config"),
    Bad(
        "cub without root",
        lambda: api(f"{B}:run_study")(api(f"{B}:StudyConfig")(dataset="cub")),
        (ValueError, Exception),
        "root",
    ),
]


def _compat() -> Any:
    return DS.AttributeCompatibility(num_classes=2, images_per_class=2, image_size=8)


def _audit_data() -> Any:
    return SyntheticBackgrounds("test", num_classes=2, images_per_class=3, image_size=16)


def _audit_model() -> Any:
    return api(f"{B}:SmallCNN")(embedding_size=4, width=2)


CASES[f"{B}.audit:audit"] = [
    Bad("model not a module", lambda: api(f"{B}:audit")("model.pt", _audit_data()), TypeError, "model must be"),
    Bad("dataset not a dataset", lambda: api(f"{B}:audit")(_audit_model(), 3), TypeError, "dataset must be"),
    Bad(
        "unknown mask_input",
        lambda: api(f"{B}:audit")(_audit_model(), _audit_data(), mask_input="blur"),
        ValueError,
        "mask_input must be one of",
    ),
    Bad(
        "bootstrap 0",
        lambda: api(f"{B}:audit")(_audit_model(), _audit_data(), bootstrap=0),
        ValueError,
        "bootstrap",
    ),
    Bad(
        "std of two numbers",
        lambda: api(f"{B}:audit")(_audit_model(), _audit_data(), std=(0.2, 0.2)),
        ValueError,
        "std must be three numbers",
    ),
    Bad(
        "masks_from not callable",
        lambda: api(f"{B}:audit")(_audit_model(), _audit_data(), masks_from="seg:model"),
        TypeError,
        "masks_from must be a callable",
    ),
]
CASES["dml_bias.datasets.masked_folder:MaskedFolder"] = [
    Bad(
        "missing folder",
        lambda: api("dml_bias.datasets:MaskedFolder")(fresh_dir() / "nowhere"),
        FileNotFoundError,
        "nowhere",
    ),
    Bad("root of the wrong type", lambda: api("dml_bias.datasets:MaskedFolder")(3), TypeError, "root must be"),
    Bad(
        "masks not a bool",
        lambda: api("dml_bias.datasets:MaskedFolder")(fresh_dir(), masks="yes"),
        TypeError,
        "masks must be True or False",
    ),
]
CASES[f"{B}.models:SmallCNN"] = [
    Bad("in_channels 0", lambda: api(f"{B}:SmallCNN")(in_channels=0), ValueError, "in_channels"),
    Bad(
        "wrong input channels",
        lambda: api(f"{B}:SmallCNN")(embedding_size=8, width=4)(torch.rand(2, 4, 16, 16)),
        ValueError,
        "channels",
    ),
]
CASES[f"{B}.models:EmbeddingHead"] = [
    Bad("embedding_size 0", lambda: api(f"{B}:EmbeddingHead")(8, 0), ValueError, "embedding_size"),
]
CASES[f"{B}.models:build_resnet50"] = [
    Bad(
        "missing weights",
        lambda: api(f"{B}:build_resnet50")(8, weights=str(fresh_dir() / "r50.pth"), warn=False),
        FileNotFoundError,
        "r50.pth",
    ),
    Bad("embedding_size 0", lambda: api(f"{B}:build_resnet50")(0, warn=False), ValueError, "embedding_size"),
]
CASES[f"{B}.attribution:similarity_attribution"] = [
    Bad(
        "unknown method",
        lambda: api(f"{B}:similarity_attribution")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 3, 16, 16),
            layer="features",
            method="lime",
        ),
        ValueError,
        "method must be one of",
    ),
    Bad(
        "unknown layer",
        lambda: api(f"{B}:similarity_attribution")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 3, 16, 16),
            layer="nope",
        ),
        ValueError,
        "layer",
    ),
    Bad(
        "batch mismatch",
        lambda: api(f"{B}:similarity_attribution")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(3, 3, 16, 16),
            layer="features",
        ),
        ValueError,
        "reference",
    ),
]
CASES[f"{B}.attribution:similarity_decomposition"] = [
    Bad(
        "steps 0",
        lambda: api(f"{B}:similarity_decomposition")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 3, 16, 16),
            method="integrated_gradients",
            steps=0,
        ),
        ValueError,
        "steps",
    ),
    Bad(
        "NaN query",
        lambda: api(f"{B}:similarity_decomposition")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            with_value(torch.rand(2, 3, 16, 16), NAN),
            torch.rand(2, 3, 16, 16),
        ),
        ValueError,
        "query",
    ),
    Bad(
        "layer with a 2-D output",
        lambda: api(f"{B}:similarity_decomposition")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 3, 16, 16),
            layer="head.linear",
        ),
        ValueError,
        "layer must output",
    ),
    Bad(
        "gradcam without a layer",
        lambda: api(f"{B}:similarity_decomposition")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 3, 16, 16),
            method="gradcam",
        ),
        ValueError,
        "needs a layer",
    ),
]
CASES[f"{B}.attribution:pairwise_decomposition"] = [
    Bad(
        "embeddings as reference",
        lambda: api(f"{B}:pairwise_decomposition")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 8),
            layer="features",
        ),
        ValueError,
        "reference",
    ),
    Bad(
        "dims_chunk 0",
        lambda: api(f"{B}:pairwise_decomposition")(
            api(f"{B}:SmallCNN")(embedding_size=8, width=4),
            torch.rand(2, 3, 16, 16),
            torch.rand(2, 3, 16, 16),
            layer="features",
            dims_chunk=0,
        ),
        ValueError,
        "dims_chunk",
    ),
]
CASES[f"{B}.attribution:foreground_energy"] = [
    Bad(
        "mask of another size",
        lambda: api(f"{B}:foreground_energy")(torch.rand(1, 4, 4), torch.ones(1, 5, 5, dtype=torch.bool)),
        ValueError,
        "masks",
    ),
    Bad(
        "mask not binary",
        lambda: api(f"{B}:foreground_energy")(torch.rand(1, 4, 4), torch.full((1, 4, 4), 7, dtype=torch.uint8)),
        ValueError,
        "masks",
    ),
    Bad(
        "NaN maps",
        lambda: api(f"{B}:foreground_energy")(
            with_value(torch.rand(1, 4, 4), NAN), torch.ones(1, 4, 4, dtype=torch.bool)
        ),
        ValueError,
        "maps",
    ),
]
CASES[f"{B}.attribution:background_sensitivity"] = [
    Bad(
        "NaN images",
        lambda: api(f"{B}:background_sensitivity")(
            nn.Flatten(),
            with_value(torch.rand(2, 3, 8, 8), NAN),
            mask().expand(2, 1, 8, 8),
            donors=(torch.rand(2, 3, 8, 8), mask().expand(2, 1, 8, 8)),
        ),
        ValueError,
        "images must be finite",
    ),
    Bad(
        "a model that gives NaN",
        lambda: api(f"{B}:background_sensitivity")(
            nn.Sequential(nn.Flatten(), nn.Linear(192, 4), nn.Dropout(p=1.0).train(), nn.LogSoftmax(dim=1)),
            torch.rand(2, 3, 8, 8),
            mask().expand(2, 1, 8, 8),
            donors=(torch.rand(2, 3, 8, 8), mask().expand(2, 1, 8, 8)),
            input_fn=lambda x, m: x * float("inf"),
        ),
        ValueError,
        "NaN or infinite embeddings",
    ),
    Bad(
        "donors of another length",
        lambda: api(f"{B}:background_sensitivity")(
            nn.Flatten(),
            torch.rand(2, 3, 8, 8),
            mask().expand(2, 1, 8, 8),
            donors=(torch.rand(1, 3, 8, 8), mask()[None]),
        ),
        ValueError,
        "donors",
    ),
    Bad(
        "batch_size 0",
        lambda: api(f"{B}:background_sensitivity")(
            nn.Flatten(),
            torch.rand(2, 3, 8, 8),
            mask().expand(2, 1, 8, 8),
            donors=(torch.rand(2, 3, 8, 8), mask().expand(2, 1, 8, 8)),
            batch_size=0,
        ),
        ValueError,
        "batch_size",
    ),
    Bad(
        "unknown fill",
        lambda: api(f"{B}:background_sensitivity")(
            nn.Flatten(),
            torch.rand(2, 3, 8, 8),
            mask().expand(2, 1, 8, 8),
            donors=(torch.rand(2, 3, 8, 8), mask().expand(2, 1, 8, 8)),
            fill="blur",
        ),
        ValueError,
        "fill",
    ),
]
CASES["cli:dml-bias study"] = [
    Bad("--sigmas 2", lambda: cli("study", "--sigmas", "2"), CliExit, r"(?s)exit 2: .*--sigmas"),
    Bad("--epochs 0", lambda: cli("study", "--epochs", "0"), CliExit, r"(?s)exit 2: .*--epochs"),
    Bad("--modes blur", lambda: cli("study", "--modes", "blur"), CliExit, r"(?s)exit 2: .*--modes"),
    Bad("--dataset imagenet", lambda: cli("study", "--dataset", "imagenet"), CliExit, r"(?s)exit 2: .*--dataset"),
    Bad("--seed -1", lambda: cli("study", "--seed", "-1"), CliExit, r"(?s)exit 2: .*--seed"),
    Bad("unknown flag", lambda: cli("study", "--fast"), CliExit, r"(?s)exit 2: .*--fast"),
    Bad("unknown command", lambda: cli("train"), CliExit, r"(?s)exit 2: .*train"),
    Bad("--out ''", lambda: cli("study", "--out", ""), CliExit, r"exit 2: dml-bias: error: --out must name a dir"),
    Bad("--device cpu:1", lambda: cli("study", "--device", "cpu:1"), CliExit, r"exit 2: dml-bias: error: device must"),
    Bad("--seed 2**63", lambda: cli("study", "--seed", str(2**63)), CliExit, r"(?s)exit 2: .*--seed"),
    Bad(
        "unwritable --out",
        lambda: cli("study", "--out", "/proc" if Path("/proc").is_dir() else "/"),
        CliExit,
        r"^exit 2: dml-bias: error: --out '/p?r?o?c?' is not a writable directory: [^\n]*$",
    ),
]

#: Public names that take no input, with the reason they need no bad-input case.
EXEMPT: dict[str, str] = {
    **{
        name: "constant (a tuple, dict or int of names or limits)"
        for name in (
            "ATTRIBUTION_METHODS",
            "DATASETS",
            "LOSSES",
            "METRIC_KEYS",
            "MODES",
            "VARIANTS",
            "RULES",
            "ATTRIBUTE_NAMES",
            "BACKGROUND_FAMILIES",
            "OBJECT_ATTRIBUTES",
            "GATES",
            "JOINTS",
            "REVISITED_PROTOCOLS",
            "FAISS_GPU_MAX_K",
            "METRICS",
            "DONOR_RULES",
            "FILLS",
            "MASK_INPUTS",
            "IMAGE_EXTENSIONS",
        )
    },
    "Metric": "a typing.Literal alias, not a callable",
    "LossDict": "a typing alias of the loss dictionary, not a callable",
    "GatheredIndices": "result type (a tuple DistributedMinerWrapper builds; its entries are the miner's output)",
    **{
        name: "result type (a NamedTuple or dataclass the library builds, never user input)"
        for name in (
            "StudyResult",
            "DELGOutput",
            "LocalFeatures",
            "LocalHeadLosses",
            "LocalHeadOutput",
            "ReceptiveField",
            "FewShotResult",
            "PairIndices",
            "CompatibilityPairs",
            "ConditionalSimilarityOutput",
            "BackgroundSensitivity",
            "ForegroundEnergy",
            "SimilarityDecomposition",
            "PairwiseDecomposition",
            "AuditResult",
        )
    },
    **{
        name: "exception type (raised by the library; its arguments are the library's)"
        for name in ("StudyError", "AnnotationError", "CorruptImageError", "AuditError")
    },
}


def all_cases() -> list[Any]:
    return [
        pytest.param(
            case,
            id=f"{key.split(':')[1]}-{case.what}",
            marks=[pytest.mark.xfail(strict=True, reason=case.known)] if case.known else [],
        )
        for key, cases in CASES.items()
        for case in cases
    ]


@pytest.mark.parametrize("case", all_cases())
def test_bad_input_raises_a_clear_error(case: Bad) -> None:
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_the_sweep_is_large() -> None:
    whats = [(key, case.what) for key, cases in CASES.items() for case in cases]
    assert len(set(whats)) == len(whats), "duplicate case names"
    assert len(whats) >= 120


def inventory() -> list[str]:
    lines = INVENTORY.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def resolve(entry: str) -> Any:
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_public_name_has_bad_input_cases() -> None:
    covered = []
    for key in CASES:
        if key.startswith("cli:"):
            continue
        try:
            covered.append(resolve(key))
        except (ImportError, AttributeError):
            continue  # a name another branch removed: the inventory test reports it
    missing, wrongly_exempt = [], []
    for entry in inventory():
        obj, name = resolve(entry), entry.split(":")[1]
        if any(obj is c for c in covered):
            continue
        if name in EXEMPT:
            if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module)):
                wrongly_exempt.append(entry)
            continue
        missing.append(entry)
    assert not missing, f"public names without a bad-input case in tests/test_bad_input.py: {missing}"
    assert not wrongly_exempt, f"functions and modules cannot be exempt: {wrongly_exempt}"


# ---------------------------------------------------------------------------------------------- no mutation


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor a user passed in: inside tuples, lists and dicts, and the parameters of modules."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_of(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_of(item)


def half_emb(n: int = 6, d: int = 4) -> torch.Tensor:
    return emb(n, d).half()


def mutation_calls() -> dict[str, Callable[[], tuple[list[Any], Callable[[], Any]]]]:
    """name -> a builder of (the inputs, the call on them)."""
    feats = local_features()
    calls: dict[str, Callable[[], tuple[list[Any], Callable[[], Any]]]] = {}
    for name, cls in PAIR_LOSS_CLASSES.items():
        calls[name] = lambda c=cls: (
            lambda x, y, r, ry, idx: ([x, y, r, ry, idx], lambda: c()(x, y, idx, r, ry).backward())
        )(half_emb().requires_grad_(True), LAB.clone(), emb(5), LAB[:5].clone(), MultiSimilarityMiner(0.3)(emb(), LAB))
    calls["proxy_anchor"] = lambda: (lambda m, x: ([m, x], lambda: m(x, LAB).backward()))(
        L.ProxyAnchorLoss(3, 4, dtype=torch.float64), half_emb()
    )
    calls["arcface"] = lambda: (lambda m, x: ([m, x], lambda: m(x, LAB).backward()))(
        L.AdditiveAngularMarginLoss(3, 4), half_emb()
    )
    calls["proxy_anchor_loss"] = lambda: (lambda x, p: ([x, p], lambda: LF.proxy_anchor_loss(x, LAB, p).backward()))(
        half_emb().requires_grad_(True), emb(3, 4).half().requires_grad_(True)
    )
    calls["miners"] = lambda: (lambda x: ([x], lambda: (BatchHardMiner()(x, LAB), MultiSimilarityMiner()(x, LAB))))(
        half_emb()
    )
    calls["retrieval"] = lambda: (lambda x, y: ([x, y], lambda: (M.retrieval_metrics(x, y, ks=(1,)), M.knn(x, k=2))))(
        emb(8).half(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    )
    calls["sharded"] = lambda: (lambda x: ([x], lambda: M.sharded_knn(x, x, 2, shard_offset=0)))(emb())
    calls["outfits"] = lambda: (
        lambda s, a: ([s, a], lambda: (M.fitb_accuracy(s, a), M.compatibility_auc(s[:, 0], torch.tensor([0, 1, 1]))))
    )(torch.rand(3, 4), torch.tensor([0, 1, 3]))
    calls["mask_background"] = lambda: (
        lambda i, m: ([i, m], lambda: [TF.mask_background(i, m, mode) for mode in TF.MODES])
    )(image(), mask())
    calls["swap_background"] = lambda: (
        lambda i, m, di, dm: ([i, m, di, dm], lambda: TF.swap_background(i, m, di, dm))
    )(image(), mask(), image(3, 8, 8).flip(-1), mask().flip(-1))
    calls["BackgroundMask"] = lambda: (lambda sample: ([sample], lambda: T.BackgroundMask("soft")(sample)))(
        {"image": tv_tensors.Image(image()), "mask": tv_tensors.Mask(mask()), "label": torch.tensor(3)}
    )
    calls["gem"] = lambda: (lambda x, pool: ([x, pool], lambda: pool(x).sum().backward()))(
        torch.rand(2, 3, 4, 4, dtype=torch.float64), H.GeM(learnable=True)
    )
    calls["conditional_similarity"] = lambda: (
        lambda hd, a, b: ([hd, a, b], lambda: H.pan_loss(hd(a, b), torch.tensor([1, 0, 1, 0]), lam=0.0).backward())
    )(H.ConditionalSimilarity(4, 2), emb(4).requires_grad_(True), emb(4, 4) * 2)
    calls["spatial_verification"] = lambda: (
        lambda q, d: ([q, d], lambda: R.spatial_verification(q, d, [q + 1.0], [d], max_trials=20))
    )(*feats)
    calls["pairwise"] = lambda: (lambda x, y: ([x, y], lambda: (S.pairwise(x, y), S.normalize(x))))(emb(), emb(3))
    calls["foreground_energy"] = lambda: (
        lambda maps, m: ([maps, m], lambda: api("dml_bias.bias:foreground_energy")(maps, m))
    )(torch.rand(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool))

    def in_place_gate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.logical_not_() | y  # works in place on its first argument

    calls["attribute_gate (an in-place callable)"] = lambda: (
        lambda a1, a2: (
            [a1, a2],
            lambda: (
                H.attribute_gate(a1, a2, in_place_gate),
                H.pan_loss(pan_output(2), torch.tensor([1, 0]), a1, a2, gate=in_place_gate),
            ),
        )
    )(torch.tensor([[True, False, True], [False, False, True]]), torch.tensor([[1, 0, 0], [1, 1, 0]]))
    return calls


@pytest.mark.parametrize("name", list(mutation_calls()))
def test_nothing_a_user_passes_in_is_changed(name: str) -> None:
    inputs, call = mutation_calls()[name]()
    before = [(t.detach().clone(), t.dtype, t.device) for t in tensors_of(inputs)]
    call()
    after = list(tensors_of(inputs))
    assert len(after) == len(before)
    for (saved, dtype, device), now in zip(before, after, strict=True):
        assert now.dtype == dtype
        assert now.device == device
        assert torch.equal(saved, now.detach())


# ---------------------------------------------------------------------------------------------- 16-bit extremes

ALL_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "multi_similarity": L.MultiSimilarityLoss,
    "contrastive": L.ContrastiveLoss,
    "triplet": L.TripletMarginLoss,
    "ntxent": L.NTXentLoss,
    "supcon": L.SupConLoss,
    "proxy_anchor": lambda: L.ProxyAnchorLoss(3, 8),
    "arcface": lambda: L.AdditiveAngularMarginLoss(3, 8),
}


def extreme_rows(case: str, dtype: torch.dtype) -> torch.Tensor:
    base = emb(6, 8)
    unit = base / base.norm(dim=1, keepdim=True)
    finfo = torch.finfo(dtype)
    if case == "largest":  # every entry at the dtype's largest value (whose float32 norm fits: see below)
        big = finfo.max if dtype == torch.float16 else 1e18
        return (unit.sign() * big).to(dtype)
    if case == "subnormal rows":
        return (unit * finfo.smallest_normal / 4).to(dtype)
    if case == "one subnormal row":
        out = unit.clone()
        out[0] *= finfo.smallest_normal / 4
        return out.to(dtype)
    if case == "tiny rows (1e-4)":
        return (unit * 1e-4).to(dtype)
    if case == "identical rows":
        return unit[:1].expand(6, 8).to(dtype)
    if case == "mixed magnitudes":
        scale = torch.tensor([min(finfo.max / 16, 1e18), 1.0, 1e-3, max(finfo.smallest_normal * 8, 1e-20), 3.0, 1e2])
        return (unit * scale[:, None]).to(dtype)
    raise KeyError(case)


EXTREMES = ["largest", "subnormal rows", "one subnormal row", "tiny rows (1e-4)", "identical rows", "mixed magnitudes"]


#: bfloat16 has float32's range: its subnormal rows (~1e-39) have a float32 norm of 0, a documented ValueError.
UNDERFLOW = {("subnormal rows", torch.bfloat16), ("one subnormal row", torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", EXTREMES)
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_16_bit_extremes_give_a_finite_value_and_gradient(name: str, case: str, dtype: torch.dtype) -> None:
    module = ALL_LOSSES[name]()
    x = extreme_rows(case, dtype).requires_grad_(True)
    if (case, dtype) in UNDERFLOW:
        with pytest.raises(ValueError, match=r"embeddings must have no row of zero norm .* underflow to 0"):
            module(x, LAB)
        return
    loss = module(x, LAB)
    loss.backward()
    assert torch.isfinite(loss)
    assert x.grad is not None
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all()
    for param in module.parameters():
        assert torch.isfinite(param.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_zero_rows_and_overflowing_norms_are_documented_errors(name: str, dtype: torch.dtype) -> None:
    zero = extreme_rows("identical rows", dtype).clone()
    zero[2] = 0
    with pytest.raises(ValueError, match="embeddings must have no row of zero norm"):
        ALL_LOSSES[name]()(zero, LAB)
    if dtype != torch.float16:  # float16 rows always fit a float32 norm
        huge = torch.full((6, 8), torch.finfo(dtype).max, dtype=dtype)
        with pytest.raises(ValueError, match=r"embeddings must have row norms that fit torch\.float32"):
            ALL_LOSSES[name]()(huge, LAB)


def test_padding_past_index_lengths_may_hold_anything() -> None:
    # The finiteness check of spatial_verification must not reject the padding of a padded index tensor.
    loc, desc = local_features()
    padded_loc = torch.cat([loc, torch.full((3, 2), NAN)])[None]
    padded_desc = torch.cat([desc, torch.full((3, desc.shape[1]), INF)])[None]
    lengths = torch.tensor([loc.shape[0]])
    got = R.spatial_verification(loc, desc, padded_loc, padded_desc, index_lengths=lengths, max_trials=50)
    assert torch.equal(got, R.spatial_verification(loc, desc, [loc], [desc], max_trials=50))


# ---------------------------------------------------------------------------------------------- extreme values
# Inputs at the edge of a dtype's range that once gave a silent wrong value now give the right one.


def test_normalize_scales_before_squaring() -> None:
    torch.testing.assert_close(S.normalize(torch.tensor([[3e20, 4e20]])), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(S.normalize(torch.tensor([[3e38, -3e38]])), torch.tensor([[0.5**0.5, -(0.5**0.5)]]))
    torch.testing.assert_close(S.normalize(torch.tensor([[3e-30, 4e-30]])), torch.tensor([[3e-18, 4e-18]]))  # < eps
    x = emb(8, 16, dtype=torch.float64)
    for scale in (1e-170, 1.0, 1e170):  # against the float64 formula, from below its underflow to above its overflow
        # eps=0: rows of norm 1e-170 are normalised too (with the default eps they are divided by 1e-12, as in torch)
        torch.testing.assert_close(S.normalize(x * scale, eps=0.0), x / x.norm(dim=1, keepdim=True))
    torch.testing.assert_close(S.normalize(emb()), nn.functional.normalize(emb()))
    assert torch.autograd.gradcheck(S.normalize, (emb(3, 5, dtype=torch.float64).requires_grad_(True),))


def conditional_reference(module: H.ConditionalSimilarity, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """The pair scores in float64 from the formula, one pair at a time."""
    w_z, b_z = module.condition_layer.weight.double(), module.condition_layer.bias.double()
    w_r, b_r = module.relevance_layer.weight.double(), module.relevance_layer.bias.double()
    scores = []
    for a, b in zip(h1.double(), h2.double(), strict=True):
        if module.joint == "absdiff":
            j = (a - b).abs()
        elif module.joint == "product":
            j = (a / a.norm()) * (b / b.norm())
        else:
            j = torch.cat([a, b])
        z, r = w_z @ j + b_z, w_r @ j + b_r
        scores.append((torch.softmax(r, 0) * torch.sigmoid(z)).sum())
    return torch.stack(scores)


@pytest.mark.parametrize("joint", ["absdiff", "concat", "product"])
def test_conditional_similarity_at_the_float32_extremes(joint: str, device: torch.device) -> None:
    module = H.ConditionalSimilarity(4, 3, joint=joint).eval().to(device)
    h1 = torch.tensor([[3e38, 3e38, -1.0, 2.0], [1e20, -2e20, 3e20, 0.5]], device=device)
    h2 = torch.tensor([[-3e38, -3e38, 1.0, 2.0], [-1e20, 2e20, 0.0, 1e20]], device=device)
    expected = conditional_reference(module, h1, h2)
    out = module(h1, h2)
    assert out.score.dtype == torch.float32
    torch.testing.assert_close(out.score, expected.float())
    matrix = module.score_matrix(h1, h2)
    assert matrix.dtype == torch.float32
    torch.testing.assert_close(matrix.diagonal(), expected.float())
    torch.testing.assert_close(module.topk(h1, h2, 2)[0], matrix.sort(dim=1, descending=True).values)


def test_product_joint_is_scale_invariant_at_1e20(device: torch.device) -> None:
    module = H.ConditionalSimilarity(4, 3, joint="product").eval().to(device)
    a, b = emb(5).to(device), emb(7).to(device)
    torch.testing.assert_close(module(a * 1e20, b[:5] * 1e20).score, module(a, b[:5]).score)  # off by 0.12 before
    torch.testing.assert_close(module.score_matrix(a * 1e20, b * 1e20), module.score_matrix(a, b))


def test_half_head_whose_logits_overflow_float16() -> None:
    module = H.ConditionalSimilarity(8, 2).eval()
    h1, h2 = (emb(4, 8) * 3000).half(), (emb(4, 8) * -3000).half()  # |h1 - h2| ~ 1e4: W j overflows 65504
    half_module = module.half()
    out = half_module(h1, h2)
    assert out.score.dtype == torch.float16
    expected = conditional_reference(half_module, h1, h2)  # from the same float16 numbers, in float64
    torch.testing.assert_close(out.score.double(), expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_delg_heads_run_reduced_precision_input_in_the_weights_dtype(dtype: torch.dtype, device: torch.device) -> None:
    global_head, local_head = H.DELGGlobalHead(16, 8).eval().to(device), H.DELGLocalHead(16, 4, 8).eval().to(device)
    x = torch.rand(2, 16, 3, 3).to(device, dtype)
    got = global_head(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, global_head(x.float()))  # the input cast to float32 first: the same numbers
    local = local_head(x)
    assert local.attention.dtype == torch.float32
    torch.testing.assert_close(local.attention, local_head(x.float()).attention)


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    import numpy as np
    from PIL import Image

    from dml_bias.datasets._io import read_image, read_mask

    values = np.array([[0, 128, 257, 32767], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    path = fresh_dir() / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"  # the file really is 16-bit
    expected = torch.tensor([[0, 0, 1, 127], [128, 156, 254, 255]], dtype=torch.uint8)  # round(v * 255 / 65535)
    image = read_image(path)
    assert torch.equal(image, expected.expand(3, 2, 4))  # every value was 255 (clipped) before
    assert torch.equal(read_mask(path), expected[None])
