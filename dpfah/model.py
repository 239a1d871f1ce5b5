"""The DPFAH network: a ResNet-18 (or AlexNet) trunk, PFA after the stem, hashing and
classification heads. The same network serves every method of :mod:`dpfah.methods`."""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import alexnet, resnet18

from .attention import ParameterFreeAttention
from .codes import binarize
from .settings import ModelSettings

__all__ = ["BACKBONES", "DPFAH", "load_backbone_state_dict"]

FEATURE_DIM = 512  # ResNet-18's
BACKBONES = ("resnet18", "alexnet")
# Per backbone: the torchvision constructor, its feature width, and the prefix of its
# ImageNet classifier (dropped from a weights file: the network has its own heads).
_TRUNKS = {"resnet18": (resnet18, FEATURE_DIM, "fc."), "alexnet": (alexnet, 4096, "classifier.6.")}


def load_backbone_state_dict(path: str | os.PathLike, backbone: str = "resnet18") -> dict[str, torch.Tensor]:
    """Read a torchvision ResNet-18 (or AlexNet) state dict from a local file (never downloads).

    The file is what ``torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)``
    writes. The ImageNet classifier (``fc.*``, AlexNet's ``classifier.6.*``) is dropped:
    DPFAH has its own heads.
    """
    if backbone not in _TRUNKS:
        raise ValueError(f"backbone={backbone!r}: choose one of {', '.join(BACKBONES)}")
    drop = _TRUNKS[backbone][2]
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a {backbone} state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if not k.startswith(drop)}


class DPFAH(nn.Module):
    """Deep parameter-free attention hashing network.

    ``forward(x)`` returns ``(u, logits)``: the real-valued hash layer output u (N, bits)
    and the classification logits (N, num_classes). ``codes(x)`` gives sign(u) in {-1, +1}.

    ``pfa=False`` gives the paper's plain ResNet-18 ablation. ``backbone_weights`` is a path
    to a local torchvision state dict of the backbone; without it the trunk starts from
    scratch. ResNet-18 takes any input size whose stem output is at least 1x1 (224x224 and
    32x32 included).

    ``backbone="alexnet"``: torchvision's AlexNet, the comparison methods' usual network
    (the code zoo's default): the stem is conv1 + ReLU + max-pool (PFA, when on, follows it
    as for ResNet-18), then the other convolutions, the 6x6 average pool and the classifier
    without its ImageNet layer (dropout, fc 9216-4096, ReLU, dropout, fc 4096-4096, ReLU),
    a 4096-d feature for the heads. It needs inputs of at least 63x63.
    """

    def __init__(
        self,
        bits: int,
        num_classes: int,
        pfa: bool = True,
        lam: float = 1e-4,
        backbone_weights: str | os.PathLike | None = None,
        init_std: float = 0.01,
        backbone: str = "resnet18",
    ) -> None:
        super().__init__()
        if backbone not in _TRUNKS:
            raise ValueError(f"backbone={backbone!r}: choose one of {', '.join(BACKBONES)}")
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.bits = int(bits)
        self.num_classes = int(num_classes)

        self.backbone = backbone
        make, feature_dim, drop = _TRUNKS[backbone]
        trunk = make(weights=None)
        if backbone_weights is not None:
            state = load_backbone_state_dict(backbone_weights, backbone)
            missing, unexpected = trunk.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith(drop)]
            if missing or unexpected:
                raise ValueError(
                    f"{os.fspath(backbone_weights)} is not a {backbone} state dict: "
                    f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
                )
        if backbone == "resnet18":
            self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
            self.layers = nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
            self.pool = nn.AdaptiveAvgPool2d(1)
        else:
            self.stem = trunk.features[:3]
            self.layers = trunk.features[3:]
            # the pool, then the classifier up to its ImageNet layer: already flat
            self.pool = nn.Sequential(trunk.avgpool, nn.Flatten(1), *trunk.classifier[:6])
        self.attention = ParameterFreeAttention(lam) if pfa else None

        # u = W^T phi(x) + v, W and v drawn from a Gaussian (paper, Eq. 16).
        self.hash_head = nn.Linear(feature_dim, self.bits)
        self.cls_head = nn.Linear(feature_dim, self.num_classes)
        for head in (self.hash_head, self.cls_head):
            nn.init.normal_(head.weight, std=init_std)
            nn.init.normal_(head.bias, std=init_std)

    @classmethod
    def build(
        cls,
        bits: int,
        num_classes: int,
        settings: ModelSettings = ModelSettings(),  # noqa: B008 (frozen dataclass)
        *,
        seed: int | None = None,
    ) -> DPFAH:
        """The network of ``settings``; with ``seed``, torch's generator is seeded first, so
        every data-parallel rank starts from the same weights."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(
            bits,
            num_classes,
            pfa=settings.pfa,
            lam=settings.lam,
            backbone_weights=settings.backbone_weights,
            backbone=settings.backbone,
        )

    @property
    def uses_pfa(self) -> bool:
        return self.attention is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        if self.attention is not None:
            f = f + self.attention(f)  # element-wise sum (paper, Fig. 1)
        return torch.flatten(self.pool(self.layers(f)), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.features(x)
        return self.hash_head(phi), self.cls_head(phi)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Binary codes sign(u) in {-1, +1} (sign(0) = +1), as float tensors."""
        u, _ = self.forward(x)
        return binarize(u)
