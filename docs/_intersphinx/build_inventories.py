"""Write the small intersphinx inventories used by the docs build, which runs without network access.

The docs cross-reference a few objects of Python, PyTorch, torchvision and NumPy. Sphinx normally downloads
each project's ``objects.inv``; CI has no network, so this script writes local inventories that hold the
objects we reference, with their real documentation addresses. Add a line here when the nitpicky build
reports a missing external target, then run ``python docs/_intersphinx/build_inventories.py``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).parent

# (project, version, {object name: (domain:role, uri relative to the project's base URL)})
INVENTORIES: dict[str, tuple[str, str, dict[str, tuple[str, str]]]] = {
    "python": (
        "Python",
        "3",
        {
            "collections.abc.Sequence": ("py:class", "library/collections.abc.html#collections.abc.Sequence"),
            "collections.abc.Mapping": ("py:class", "library/collections.abc.html#collections.abc.Mapping"),
            "collections.abc.Iterable": ("py:class", "library/collections.abc.html#collections.abc.Iterable"),
            "collections.abc.Iterator": ("py:class", "library/collections.abc.html#collections.abc.Iterator"),
            "collections.abc.Callable": ("py:class", "library/collections.abc.html#collections.abc.Callable"),
            "pathlib.Path": ("py:class", "library/pathlib.html#pathlib.Path"),
            "os.PathLike": ("py:class", "library/os.html#os.PathLike"),
            "TypeError": ("py:exception", "library/exceptions.html#TypeError"),
            "ValueError": ("py:exception", "library/exceptions.html#ValueError"),
            "ImportError": ("py:exception", "library/exceptions.html#ImportError"),
            "FileNotFoundError": ("py:exception", "library/exceptions.html#FileNotFoundError"),
            "RuntimeError": ("py:exception", "library/exceptions.html#RuntimeError"),
            "KeyboardInterrupt": ("py:exception", "library/exceptions.html#KeyboardInterrupt"),
            "sys.argv": ("py:data", "library/sys.html#sys.argv"),
            "pickle": ("py:module", "library/pickle.html#module-pickle"),
            "dataclasses.dataclass": ("py:function", "library/dataclasses.html#dataclasses.dataclass"),
            "random.Random": ("py:class", "library/random.html#random.Random"),
        },
    ),
    "torch": (
        "PyTorch",
        "2",
        {
            "torch.Tensor": ("py:class", "tensors.html#torch.Tensor"),
            "torch.dtype": ("py:class", "tensor_attributes.html#torch.dtype"),
            "torch.device": ("py:class", "tensor_attributes.html#torch.device"),
            "torch.Generator": ("py:class", "generated/torch.Generator.html#torch.Generator"),
            "torch.nn.Module": ("py:class", "generated/torch.nn.Module.html#torch.nn.Module"),
            "torch.nn.modules.module.Module": ("py:class", "generated/torch.nn.Module.html#torch.nn.Module"),
            "torch.nn.modules.conv.Conv2d": ("py:class", "generated/torch.nn.Conv2d.html#torch.nn.Conv2d"),
            "torch.nn.modules.linear.Linear": ("py:class", "generated/torch.nn.Linear.html#torch.nn.Linear"),
            "torch.optim.optimizer.Optimizer": ("py:class", "optim.html#torch.optim.Optimizer"),
            "torch.utils.data.dataset.Dataset": ("py:class", "data.html#torch.utils.data.Dataset"),
            "torch.utils.data.sampler.Sampler": ("py:class", "data.html#torch.utils.data.Sampler"),
            "torch.utils.data.dataloader.DataLoader": ("py:class", "data.html#torch.utils.data.DataLoader"),
            "torch.types.Device": ("py:data", "tensor_attributes.html#torch.device"),
            "torch.nn.Parameter": (
                "py:class",
                "generated/torch.nn.parameter.Parameter.html#torch.nn.parameter.Parameter",
            ),
            "torch.nn.parameter.Parameter": (
                "py:class",
                "generated/torch.nn.parameter.Parameter.html#torch.nn.parameter.Parameter",
            ),
            "torch.nn.Conv2d": ("py:class", "generated/torch.nn.Conv2d.html#torch.nn.Conv2d"),
            "torch.nn.Linear": ("py:class", "generated/torch.nn.Linear.html#torch.nn.Linear"),
            "torch.nn.functional.normalize": (
                "py:function",
                "generated/torch.nn.functional.normalize.html#torch.nn.functional.normalize",
            ),
            "torch.no_grad": ("py:class", "generated/torch.no_grad.html#torch.no_grad"),
            "torch._C.Generator": ("py:class", "generated/torch.Generator.html#torch.Generator"),
            "torch.round": ("py:function", "generated/torch.round.html#torch.round"),
            "torch.manual_seed": ("py:function", "generated/torch.manual_seed.html#torch.manual_seed"),
            "torch.topk": ("py:function", "generated/torch.topk.html#torch.topk"),
            "torch.cdist": ("py:function", "generated/torch.cdist.html#torch.cdist"),
            "torch.compile": ("py:function", "generated/torch.compile.html#torch.compile"),
            "torch.autocast": ("py:class", "amp.html#torch.autocast"),
            "torch.optim.Optimizer": ("py:class", "optim.html#torch.optim.Optimizer"),
            "torch.utils.data.Dataset": ("py:class", "data.html#torch.utils.data.Dataset"),
            "torch.utils.data.Sampler": ("py:class", "data.html#torch.utils.data.Sampler"),
            "torch.utils.data.DataLoader": ("py:class", "data.html#torch.utils.data.DataLoader"),
            "torch.utils.data.distributed.DistributedSampler": (
                "py:class",
                "data.html#torch.utils.data.distributed.DistributedSampler",
            ),
            "torch.distributed": ("py:module", "distributed.html#module-torch.distributed"),
            "torch.distributed.ProcessGroup": ("py:class", "distributed.html#torch.distributed.ProcessGroup"),
            "torch.autograd.Function": ("py:class", "autograd.html#torch.autograd.Function"),
            "torch.autograd.gradcheck": ("py:function", "generated/torch.autograd.gradcheck.gradcheck.html"),
            "torch.nn.parallel.DistributedDataParallel": (
                "py:class",
                "generated/torch.nn.parallel.DistributedDataParallel.html",
            ),
        },
    ),
    "torchvision": (
        "torchvision",
        "0",
        {
            "torchvision.transforms.v2.Transform": ("py:class", "transforms.html#torchvision.transforms.v2.Transform"),
            "torchvision.transforms.v2.Compose": (
                "py:class",
                "generated/torchvision.transforms.v2.Compose.html#torchvision.transforms.v2.Compose",
            ),
            "torchvision.transforms.v2.RandomResizedCrop": (
                "py:class",
                "generated/torchvision.transforms.v2.RandomResizedCrop.html",
            ),
            "torchvision.transforms.v2.ToDtype": ("py:class", "generated/torchvision.transforms.v2.ToDtype.html"),
            "torchvision.transforms.v2.Normalize": ("py:class", "generated/torchvision.transforms.v2.Normalize.html"),
            "torchvision.tv_tensors.Image": ("py:class", "generated/torchvision.tv_tensors.Image.html"),
            "torchvision.tv_tensors.Mask": ("py:class", "generated/torchvision.tv_tensors.Mask.html"),
            "torchvision.tv_tensors.Video": ("py:class", "generated/torchvision.tv_tensors.Video.html"),
            "torchvision.tv_tensors.BoundingBoxes": ("py:class", "generated/torchvision.tv_tensors.BoundingBoxes.html"),
            "torchvision.tv_tensors._image.Image": ("py:class", "generated/torchvision.tv_tensors.Image.html"),
            "torchvision.tv_tensors._mask.Mask": ("py:class", "generated/torchvision.tv_tensors.Mask.html"),
            "torchvision.transforms.v2._transform.Transform": (
                "py:class",
                "transforms.html#torchvision.transforms.v2.Transform",
            ),
            "torchvision.tv_tensors.wrap": ("py:function", "generated/torchvision.tv_tensors.wrap.html"),
            "torchvision.tv_tensors.TVTensor": ("py:class", "generated/torchvision.tv_tensors.TVTensor.html"),
            "torchvision.models.ResNet": ("py:class", "models/resnet.html"),
            "torchvision.models.resnet50": ("py:function", "models/generated/torchvision.models.resnet50.html"),
        },
    ),
    "pillow": (
        "Pillow",
        "11",
        {
            "PIL.Image.Image": ("py:class", "reference/Image.html#PIL.Image.Image"),
        },
    ),
    "numpy": (
        "NumPy",
        "2",
        {
            "numpy.ndarray": ("py:class", "reference/generated/numpy.ndarray.html#numpy.ndarray"),
            "numpy.random.Generator": ("py:class", "reference/random/generator.html#numpy.random.Generator"),
            "numpy.isin": ("py:function", "reference/generated/numpy.isin.html"),
        },
    ),
}


def write(name: str, project: str, version: str, objects: dict[str, tuple[str, str]]) -> None:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{obj} {role} 1 {uri} -\n" for obj, (role, uri) in sorted(objects.items()))
    (HERE / f"{name}.inv").write_bytes(header.encode() + zlib.compress(body.encode()))


if __name__ == "__main__":
    for key, (proj, ver, objs) in INVENTORIES.items():
        write(key, proj, ver, objs)
        print(f"wrote {key}.inv ({len(objs)} objects)")
