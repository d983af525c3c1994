"""Network-based image distances for the quality record, built from local weights only (nothing downloaded).

LPIPS (Zhang et al. 2018) from a folder holding
  - ``config.json``: ``{"net": "alex"}`` (or ``"vgg16"``, ``"squeeze"``: the backbone),
  - ``backbone.safetensors``: the torchvision backbone's ``features`` state dict
    (``save_file(torchvision.models.alexnet(weights="DEFAULT").features.state_dict(), ...)``),
  - ``linear.safetensors``: the LPIPS linear layers as the ``lpips`` package ships them
    (``save_file(torch.load("alex.pth", weights_only=True), ...)``: keys ``lin0.model.1.weight`` ...).
PIE-Bench reports LPIPS of the squeeze backbone on the masked images (background preservation).

DINO structure distance (Tumanyan et al. 2022, PIE-Bench's "structure distance") from a transformers
``ViTModel`` or ``Dinov2Model`` folder (``save_pretrained``; PIE-Bench uses DINO ViT-B/8): the keys of the last
layer's self-attention, their cosine self-similarity over all tokens, and the mean squared difference between
the two images' self-similarity matrices (PIE-Bench prints it x 10^3).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

# the backbone's features cut after each ReLU LPIPS compares (the lpips package's slices), and their channels
LPIPS_NETS = {
    "alex": ("alexnet", (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg16": ("vgg16", (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
    "squeeze": ("squeezenet1_1", (2, 5, 8, 10, 11, 12, 13), (64, 128, 256, 384, 384, 512, 512)),
}
LPIPS_SHIFT = (-0.030, -0.088, -0.188)      # the lpips package's ScalingLayer, for inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
IMAGENET_MEAN = (0.485, 0.456, 0.406)       # DINO's image normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


def _weights_file(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {name} ({what}); see dedit_nb.perceptual for the folder's "
                                "files and how to write them from the published weights")
    return path


class LPIPS(nn.Module):
    """LPIPS distance between uint8 images ``(H, W, 3)``: unit-normalised backbone features at each cut, their
    squared difference weighted by the linear layer, averaged over space, summed over the cuts."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net {net!r} is not one of {sorted(LPIPS_NETS)}")
        import torchvision
        builder, cuts, channels = LPIPS_NETS[net]
        self.features = getattr(torchvision.models, builder)(weights=None).features[:cuts[-1]]
        self.cuts = cuts
        for k, c in enumerate(channels):     # the lpips package's NetLinLayer: dropout, then a 1x1 conv
            self.add_module(f"lin{k}", nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False)))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LPIPS":
        from safetensors.torch import load_file
        folder = Path(folder)
        config = json.loads(_weights_file(folder, "config.json", 'e.g. {"net": "alex"}').read_text())
        net = config.get("net", "alex")
        model = cls(net)
        model.features.load_state_dict(load_file(_weights_file(folder, "backbone.safetensors",
                                                                "the torchvision backbone's features")))
        linear = load_file(_weights_file(folder, "linear.safetensors", "the LPIPS linear layers"))
        wanted = {k for k in model.state_dict() if k.startswith("lin")}
        if set(linear) != wanted:
            raise ValueError(f"{str(folder)!r}: linear.safetensors has keys {sorted(linear)[:3]}..., the {net} net "
                             f"needs {sorted(wanted)} (the lpips package's {net}.pth, saved as safetensors)")
        model.load_state_dict(linear, strict=False)
        return model

    @torch.no_grad()
    def forward(self, a: np.ndarray, b: np.ndarray) -> float:
        x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = (x - self.shift) / self.scale
        total, start = 0.0, 0
        for k, stop in enumerate(self.cuts):
            x = self.features[start:stop](x)
            start = stop
            unit = x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total += getattr(self, f"lin{k}")((unit[:1] - unit[1:]).square()).mean().item()
        return float(total)


class DinoStructure:
    """DINO structure distance between two uint8 images (see the module's notes)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoModel
        self.model = AutoModel.from_pretrained(Path(folder), local_files_only=True).eval()
        keys = [m for name, m in self.model.named_modules() if re.search(r"attention\.(k_proj|key)$", name)]
        if not keys:
            raise ValueError(f"{str(folder)!r} is not a ViT (no self-attention keys): pass a ViTModel or "
                             "Dinov2Model folder")
        self.keys = keys[-1]                 # the last layer's

    def self_similarity(self, image: np.ndarray) -> torch.Tensor:
        from PIL import Image
        size = self.model.config.image_size
        pixels = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32) / 255
        pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        seen = []
        hook = self.keys.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            with torch.no_grad():
                self.model(pixel_values=torch.from_numpy(pixels).permute(2, 0, 1)[None])
        finally:
            hook.remove()
        keys = nn.functional.normalize(seen[0][0].float(), dim=-1)      # (tokens, heads x head size)
        return keys @ keys.T

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        return float((self.self_similarity(a) - self.self_similarity(b)).square().mean())
