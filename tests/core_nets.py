"""Tiny networks with known structure for the explainer tests."""

from __future__ import annotations

import torch
from torch import nn

from medcam3d.layouts import SlicesAsBatch


def conv(nd: int):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]


class ConvFC(nn.Module):
    """conv -> ReLU (explained: ``act``) -> flatten -> Linear: an affine head (one FC layer)."""

    def __init__(self, nd: int = 3, size: int = 4, c_in: int = 2, feats: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv = conv(nd)(c_in, feats, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(feats * size**nd, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


class ConvGAP(nn.Module):
    """conv -> ReLU (``act``) -> global average pool -> Linear: the CAM architecture."""

    def __init__(self, nd: int = 3, c_in: int = 1, feats: int = 4, classes: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.conv = conv(nd)(c_in, feats, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(feats, classes, bias=bias)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(2).mean(2))


class ConvMLP(nn.Module):
    """conv -> ReLU (``act``) -> FC -> ReLU -> FC: a head that is not affine."""

    def __init__(self, nd: int = 2, size: int = 4, feats: int = 3, hidden: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv = conv(nd)(1, feats, 3, padding=1)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(feats * size**nd, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.act(self.conv(x)), 1))))


class TinyAxial(nn.Module):
    """AxialNet-shaped: [B, 1, S, H, W] -> slices of 3 as RGB in the batch axis -> conv -> ReLU (explained)
    -> per-slice FC (a conv covering the map) -> mean over slices (AxialNet), or, with ``slice_weights=S``,
    a learned weighted sum over the S slice groups (still affine; slices then get different gradients)."""

    medcam3d_target_layer = "act"
    medcam3d_layout = SlicesAsBatch()

    def __init__(self, hw: int = 6, feats: int = 4, classes: int = 5, slice_weights: int = 0) -> None:
        super().__init__()
        self.slice_weights = nn.Parameter(torch.ones(slice_weights)) if slice_weights else None
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, feats, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Conv2d(feats, classes, kernel_size=hw)

    def forward(self, x):
        b = x.shape[0]
        s = x.shape[2] // 3
        x = x.reshape(b * s, 3, x.shape[3], x.shape[4])
        x = self.act(self.conv(self.bn(x)))
        x = self.fc(x)  # [B*S, M, 1, 1]
        x = x.reshape(b, s, -1)
        if self.slice_weights is not None:
            return torch.einsum("bsm,s->bm", x, self.slice_weights)
        return x.mean(dim=1)


class Identity8(nn.Module):
    """Figure 3 of the paper: the input *is* the activation (F=2 maps of 2x2); one FC with known weights."""

    def __init__(self, bias: float = 0.5) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(8, 1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 3, 2, -1, 0, -2, 1, 1]]))
            self.fc.bias.fill_(bias)

    def forward(self, x):
        return self.fc(self.feat(x).flatten(1))
