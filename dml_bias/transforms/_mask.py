"""BackgroundMask: the torchvision v2 transform around :func:`dml_bias.transforms.functional.mask_background`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dml_bias._checks import describe
from dml_bias._compat import V2TransformHooks
from dml_bias.transforms._masking import check_mask_options, mask_background_checked
from dml_bias.transforms._sample import find_mask, is_image_leaf

__all__ = ["BackgroundMask"]


class BackgroundMask(V2TransformHooks, v2.Transform):
    r"""Hide or weaken the background of every image in a sample with the sample's segmentation mask.

    A :class:`torchvision.transforms.v2.Transform`: it takes any sample (a dict, tuple, list or nested mix)
    holding exactly one :class:`torchvision.tv_tensors.Mask`, and applies
    :func:`~dml_bias.transforms.functional.mask_background` to each image leaf
    (:class:`torchvision.tv_tensors.Image`, :class:`torchvision.tv_tensors.Video`, ``PIL.Image.Image``, and a
    pure tensor when torchvision treats it as the image: no explicit image in the sample, first pure tensor).
    The mask comes back unchanged (the same object), every other leaf by identity.

    * ``"hard"``: background pixels become 0.
    * ``"soft"``: background pixels are multiplied by ``sigma``.
    * ``"channel"``: the mask is appended as a last channel (0/255 for ``uint8`` images, 0/1 for floating
      ones), giving ``C + 1`` channels; widen the network's first convolution with
      :func:`~dml_bias.transforms.adapt_input_conv`.

    Output types: tensors keep their tv_tensor type (``torchvision.tv_tensors.wrap``); ``uint8`` stays
    ``uint8`` (rounded half to even), floating point stays floating point. A PIL image comes back as a PIL
    image of the same mode in hard and soft mode, and as a ``uint8`` :class:`~torchvision.tv_tensors.Image` in
    channel mode (a 4-channel PIL image would read as RGBA, with the mask as transparency).

    Where to put it in a :class:`~torchvision.transforms.v2.Compose`: anywhere after the geometric transforms
    (``RandomResizedCrop``, flips, affine), which move the mask with the image. Before
    :class:`~torchvision.transforms.v2.Normalize` (the recommended place, and what the bias study does),
    "0" is black; after ``Normalize`` it is the normalisation mean colour, and ``soft`` shrinks the
    background towards that mean. ``ToDtype`` may come before or after: uint8 and float give the same
    picture up to rounding.

    Args:
        mode: ``"hard"``, ``"soft"`` or ``"channel"``.
        sigma: Background factor of the soft mode, in ``(0, 1)``.
        threshold: Object level above which a mask pixel is foreground, in ``[0, 1]`` (mask formats:
            :func:`~dml_bias.transforms.functional.foreground_mask`).
        background_ids: Class ids that are background, when the mask is a class-id map.
        soft_alpha: Use the mask's continuous object level (e.g. a soft segmentation) as the blending weight
            instead of the thresholded mask: soft mode gives :math:`x\,(a + (1 - a)\,\sigma)`.

    Example:
        >>> import torch
        >>> from torchvision import tv_tensors
        >>> from torchvision.transforms import v2
        >>> image = tv_tensors.Image(torch.full((3, 4, 4), 200, dtype=torch.uint8))
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
        >>> mask[:, 1:3, 1:3] = 255
        >>> sample = {"image": image, "mask": tv_tensors.Mask(mask), "label": 3}
        >>> out = v2.Compose([v2.RandomHorizontalFlip(1.0), BackgroundMask("soft", sigma=0.5)])(sample)
        >>> out["image"][0]
        tensor([[100, 100, 100, 100],
                [100, 200, 200, 100],
                [100, 200, 200, 100],
                [100, 100, 100, 100]], dtype=torch.uint8)
        >>> BackgroundMask("channel")(sample)["image"].shape
        torch.Size([4, 4, 4])
    """

    def __init__(
        self,
        mode: Literal["hard", "soft", "channel"] = "hard",
        sigma: float = 0.5,
        threshold: float = 0.5,
        background_ids: Sequence[int] | None = None,
        soft_alpha: bool = False,
    ) -> None:
        ids = check_mask_options(mode, sigma, threshold, background_ids, soft_alpha)
        super().__init__()
        self.mode = mode
        self.sigma = float(sigma)
        self.threshold = float(threshold)
        self.background_ids = ids
        self.soft_alpha = soft_alpha

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Find the sample's one mask (``ValueError`` if there is none or more than one)."""
        return {"mask": find_mask(flat_inputs, type(self).__name__)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Mask one image leaf; return any other leaf (the mask included) as it is."""
        if not is_image_leaf(inpt):
            return inpt
        mask = params["mask"].as_subclass(torch.Tensor)
        if isinstance(inpt, PIL.Image.Image):
            out = self._apply(TF.pil_to_tensor(inpt), mask)
            if self.mode == "channel":
                return tv_tensors.Image(out)
            return TF.to_pil_image(out, mode=inpt.mode)
        out = self._apply(inpt.as_subclass(torch.Tensor), mask)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def _apply(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            return mask_background_checked(
                image, mask, self.mode, self.sigma, self.threshold, self.background_ids, self.soft_alpha
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{type(self).__name__}: {err} (image {describe(image)})") from None

    def extra_repr(self) -> str:
        """The configuration, e.g. ``mode='soft', sigma=0.5, threshold=0.5``."""
        parts = [f"mode={self.mode!r}"]
        if self.mode == "soft":
            parts.append(f"sigma={self.sigma}")
        parts.append(f"threshold={self.threshold}")
        if self.background_ids is not None:
            parts.append(f"background_ids={self.background_ids}")
        if self.soft_alpha:
            parts.append("soft_alpha=True")
        return ", ".join(parts)
