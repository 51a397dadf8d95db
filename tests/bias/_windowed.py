"""Models whose reliance on the object is known by construction, and scenes to run them on.

The image is 64 × 64 with the object a 24 × 24 square at rows and columns 20–43 (chance energy 0.14). The stem has
a 1 × 1 convolution and two 2 × 2 stride-2 convolutions, so each cell of its 16 × 16 output sees exactly one 4 × 4
block of pixels and the object covers cells 5–10: nothing leaks across the object's border. The head pools the
stem's cells inside the object window with weight ``alpha`` and outside with weight ``1 − alpha`` (masked average
pooling), then a bias-free linear layer: ``alpha = 1`` looks only at the object, ``alpha = 0`` only at the
background.
"""

from __future__ import annotations

import torch
from torch import nn

SIZE = 64
LO, HI = 20, 44  # the object's rows and columns (pixels)
CELL_LO, CELL_HI = LO // 4, HI // 4


class WindowNet(nn.Module):
    def __init__(self, alpha: float, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 2, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 2, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        inside = torch.zeros(16, 16)
        inside[CELL_LO:CELL_HI, CELL_LO:CELL_HI] = 1.0
        self.register_buffer("inside", inside)
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        obj = (a * self.inside).sum(dim=(2, 3)) / self.inside.sum()
        bg = (a * (1 - self.inside)).sum(dim=(2, 3)) / (1 - self.inside).sum()
        return self.head(self.alpha * obj + (1 - self.alpha) * bg)


def scenes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images of class ``i % 4`` (own object colour, own background colour, noise), masks, labels."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9], [0.9, 0.9, 0.2]])
    backgrounds = torch.tensor([[0.3, 0.6, 0.9], [0.8, 0.5, 0.2], [0.5, 0.8, 0.4], [0.6, 0.3, 0.7]])
    labels = torch.arange(n) % 4
    images = backgrounds[labels][:, :, None, None].expand(n, 3, SIZE, SIZE).clone()
    images[:, :, LO:HI, LO:HI] = objects[labels][:, :, None, None]
    images = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    masks[:, LO:HI, LO:HI] = True
    return images, masks, labels


def trained_small_cnn(steps: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A SmallCNN briefly trained (Proxy-Anchor, seeded) on 32 scenes, and 6 queries with 6 references."""
    from dml_bias.bias import SmallCNN
    from dml_bias.losses import ProxyAnchorLoss

    torch.manual_seed(0)
    x, _, y = scenes(32, seed=3)
    model = SmallCNN(embedding_size=8, width=4)
    loss_fn = ProxyAnchorLoss(4, 8)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-2)
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x[:6], x[6:12]
