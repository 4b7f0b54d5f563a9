"""PyTorch versions of the four deep-T1-WMH networks, for the optional reference test only (never
imported by cohortseg). Parameter names and shapes are the upstream ones (bthyreau/deep-T1-WMH
``deepwmh.py``: HeadModel, ModelAff, Cap5eModel, Cap6Model); the forward passes follow the upstream
ones, written here independently so the Keras builds are checked against a second implementation."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _c(i, o, k=3, p=None):
    return nn.Conv3d(i, o, k, padding=(k - 1) // 2 if p is None else p)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        enc = [(1, 8, 8), (8, 16, 24), (24, 24, 32), (32, 48, 48)]
        for lvl, (i, a, b) in enumerate(enc):
            setattr(self, f"conv{lvl}a", _c(i, a))
            setattr(self, f"conv{lvl}b", _c(a, b))
            setattr(self, f"bn{lvl}a", nn.BatchNorm3d(b))
        for lvl, (i, u, skip, v) in zip((2, 1, 0), [(48, 24, 32, 24), (24, 24, 24, 24), (24, 16, 8, 8)]):
            setattr(self, f"conv{lvl}u", _c(i, u))
            setattr(self, f"conv{lvl}v", _c(u + skip, v))
            setattr(self, f"bn{lvl}u", nn.BatchNorm3d(v))
        self.conv1x = _c(8, 4, 1)

    def forward(self, x):
        skips = []
        for lvl in range(4):
            if lvl:
                x = F.max_pool3d(x, 2)
            x = F.elu(getattr(self, f"conv{lvl}a")(x))
            x = F.elu(getattr(self, f"bn{lvl}a")(getattr(self, f"conv{lvl}b")(x)))
            skips.append(x)
        for lvl in (2, 1, 0):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.elu(getattr(self, f"conv{lvl}u")(x))
            x = torch.cat([x, skips[lvl]], 1)
            x = F.elu(getattr(self, f"bn{lvl}u")(getattr(self, f"conv{lvl}v")(x)))
        return torch.sigmoid(self.conv1x(x))


class Aff(nn.Module):
    def __init__(self):
        super().__init__()
        self.convaff1 = _c(2, 16)
        self.convaff2, self.bnaff2 = _c(16, 16), nn.LayerNorm([32, 32, 32])
        self.convaff3, self.bnaff3 = _c(16, 32), nn.LayerNorm([16, 16, 16])
        self.convaff4, self.bnaff4 = _c(32, 64), nn.LayerNorm([8, 8, 8])
        self.convaff5 = _c(64, 128, 1)
        self.convaff6 = _c(128, 12, 4, 0)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.convaff1(x)), 2)
        x = F.max_pool3d(F.relu(self.bnaff2(self.convaff2(x))), 2)
        x = F.max_pool3d(F.relu(self.bnaff3(self.convaff3(x))), 2)
        x = F.max_pool3d(F.relu(self.bnaff4(self.convaff4(x))), 2)
        return self.convaff6(F.relu(self.convaff5(x))).reshape(-1, 12)


def _seq(*mods):
    return nn.Sequential(*mods)


class Cap5e(nn.Module):
    """Cap5eModel."""

    def __init__(self):
        super().__init__()
        widths = [(1, 24, 64), (64, 64, 64), (64, 64, 64), (64, 64, 64), (64, 64, 64), (64, 128, 64)]
        for lvl, (i, a, b) in enumerate(widths):
            setattr(self, f"block{lvl}", _seq(_c(i, a), nn.InstanceNorm3d(a), nn.ReLU(), _c(a, b), nn.ReLU()))
        for lvl in (4, 3, 2, 1, 0):
            setattr(self, f"blockUp{lvl}_a", _seq(_c(64, 64), nn.InstanceNorm3d(64), nn.ReLU()))
        for lvl in (4, 3, 2, 1):
            setattr(self, f"blockUp{lvl}_b", _seq(_c(64, 64), nn.ReLU()))
        self.blockUp0_b1 = _seq(_c(64, 64), nn.ReLU())
        self.blockUp0_b2 = _seq(_c(64, 24), nn.ReLU())
        self.conv1x = _c(24, 2, 1)
        self.pools = [(2, 2, 2)] * 3 + [(2, 2, 1)] * 2

    def forward(self, x):
        skips, idx = [], []
        x = self.block0(x)
        skips.append(x)
        for lvl in range(1, 6):
            x, ind = F.max_pool3d(x, self.pools[lvl - 1], return_indices=True)
            idx.append(ind)
            x = getattr(self, f"block{lvl}")(x)
            skips.append(x)
        for lvl in (4, 3, 2, 1, 0):
            x = F.max_unpool3d(x, idx[lvl], self.pools[lvl], output_size=skips[lvl].shape[-3:])
            x = getattr(self, f"blockUp{lvl}_a")(x)
            if lvl < 4:
                x = x + skips[lvl]
            if lvl:
                x = getattr(self, f"blockUp{lvl}_b")(x)
            else:
                x = self.blockUp0_b2(self.blockUp0_b1(x))
        return torch.sigmoid(self.conv1x(x))


class Cap6(nn.Module):
    """Cap6Model."""

    def __init__(self):
        super().__init__()
        self.block0 = _seq(_c(1, 12), nn.ReLU())
        self.block1 = _seq(_c(12, 16), nn.ReLU(), _c(16, 16, 1), nn.ReLU())
        for lvl in (2, 3, 4):
            setattr(self, f"block{lvl}", _seq(_c(16, 16), nn.ReLU(), _c(16, 16, 1), nn.ReLU()))
        self.block5 = _seq(_c(16, 16), nn.ReLU(), _c(16, 16, 1), nn.InstanceNorm3d(16), nn.ReLU())
        for lvl in (4, 3, 2, 1):
            setattr(self, f"blockUp{lvl}_a", _seq(_c(16, 16), nn.InstanceNorm3d(16), nn.ReLU()))
            setattr(self, f"blockUp{lvl}_b", _seq(_c(16, 12 if lvl == 1 else 16), nn.ReLU()))
        self.blockUp0_a = _seq(_c(12, 12), nn.ReLU())
        self.blockUp0_b1 = _seq(_c(12, 12, 1, 1), nn.ReLU())
        self.blockUp0_b2 = _seq(_c(12, 8, 3, 0), nn.ReLU())
        self.conv1x = _c(8, 4, 1)
        self.pools = [(2, 2, 2)] * 4 + [(2, 2, 1)]

    def forward(self, x):
        x = self.block0(x)
        skips, idx = [x], [None]
        x = self.block1(F.max_pool3d(x, 2))
        skips.append(x)
        for lvl in range(2, 6):
            x, ind = F.max_pool3d(x, self.pools[lvl - 1], return_indices=True)
            idx.append(ind)
            x = getattr(self, f"block{lvl}")(x)
            skips.append(x)
        for lvl in (4, 3, 2, 1):
            x = F.max_unpool3d(x, idx[lvl], self.pools[lvl], output_size=skips[lvl].shape[-3:])
            x = getattr(self, f"blockUp{lvl}_a")(x)
            x = getattr(self, f"blockUp{lvl}_b")(x + skips[lvl])
        x = self.blockUp0_a(F.interpolate(x, scale_factor=2, mode="nearest"))
        x = self.blockUp0_b2(self.blockUp0_b1(x + skips[0]))
        return torch.sigmoid(self.conv1x(x))


NETS = {"head": Head, "affine": Aff, "wmh": Cap5e, "rois": Cap6}


def randomised(kind: str, seed: int = 0) -> nn.Module:
    """A network with random weights and random (positive) BatchNorm / LayerNorm statistics."""
    torch.manual_seed(seed)
    net = NETS[kind]()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) * 2 + 0.1)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn_like(t) * 0.3)
            elif name.startswith("bn") and t.dtype.is_floating_point:  # BN / LayerNorm affine
                t.copy_(torch.randn_like(t) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return net.eval()
