"""Models: plain torch for images (torchvision does not import with the CPU torch used here),
Hugging Face transformers for text and ViT (``plateau.hf``).

Input channels, image size and class count come from the dataset. GroupNorm models have no
buffers, which client-level DP needs: every released tensor is then a clipped, noised parameter.
Only the *travelling* state (trainable parameters and buffers) moves between server and clients;
frozen weights are rebuilt from the same source and seed everywhere and checked by a digest.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import TRANSFORMER_MODELS
from .data import DatasetInfo, InputSpec, dataset_info
from .errors import DataError

if TYPE_CHECKING:
    from .config import RunConfig


def norm_layer(kind: str, channels: int) -> nn.Module:
    """GroupNorm(2, C) as in the DP-FedPGN/FedNSAM GN-ResNets, or BatchNorm."""
    return nn.GroupNorm(2, channels) if kind == "group" else nn.BatchNorm2d(channels)


def input_width(info: DatasetInfo) -> int:
    """Numbers per example once flattened: tabular features, or C * H * W."""
    return info.features if info.kind == "tabular" else info.in_channels * info.image_size**2


class MLP(nn.Module):
    """Flattened input, hidden ReLU layers with GroupNorm (no buffers: DP- and Opacus-ready),
    BatchNorm or no normalisation, then the class logits: tabular data's model."""

    def __init__(self, info: DatasetInfo, widths: tuple[int, ...], norm: str = "group") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_width(info)
        for hidden in widths:
            layers.append(nn.Linear(width, hidden))
            if norm == "group":
                layers.append(nn.GroupNorm(2 if hidden % 2 == 0 else 1, hidden))
            elif norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            width = hidden
        layers.append(nn.Linear(width, info.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class ModelInput:
    """What a user's model builder is given: the kind of data ('tabular', 'image', 'text'),
    one example's shape ((features,), (C, H, W), or () for token tensors), and for text the
    tokenizer and length the ClientApps tokenise with."""

    kind: str
    shape: tuple[int, ...]
    tokenizer: str = ""
    max_length: int = 0


def user_model(path: str, info: DatasetInfo, spec: InputSpec) -> nn.Module:
    """The user's own torch module: ``package.module:function`` called with the input spec
    and the number of classes. The module must be importable wherever the ServerApp and the
    ClientApps run (installed in their environment or image)."""
    module_name, function_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"model={path!r}: cannot import {module_name!r} ({err}); install it "
                        "where the ServerApp and every ClientApp run (pip install, or the "
                        "image: see README 'Your own data')") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise DataError(f"model={path!r}: {module_name!r} has no function {function_name!r}")
    model = build(ModelInput(info.kind, info.input_shape, spec.tokenizer, spec.max_length),
                  info.num_classes)
    if not isinstance(model, nn.Module):
        raise DataError(f"model={path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


class SmallCNN(nn.Module):
    """Three 3x3 conv layers with GroupNorm and a two-layer head (buffer-free, DP-ready)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32,
                 norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.n1 = norm_layer(norm, width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.n2 = norm_layer(norm, 2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.n3 = norm_layer(norm, 2 * width)
        self.fc1 = nn.Linear(2 * width * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.n1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.n2(self.conv2(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.n3(self.conv3(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """ResNet basic block with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = norm_layer(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, stride 1, no max-pool, adaptive average pool."""

    def __init__(
        self, blocks: tuple[int, ...], in_channels: int, num_classes: int, norm: str, width: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.n1 = norm_layer(norm, width)
        layers: list[nn.Module] = []
        cin = width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for j in range(count):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and j == 0 else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.n1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Linear(nn.Module):
    """Softmax regression on the flattened image (650 parameters on digits).

    The default on digits because client-level DP adds noise to every released coordinate: the
    noise norm grows with the square root of the parameter count, and at a few clients per
    round only a model this small learns at single-digit epsilon.
    """

    def __init__(self, info: DatasetInfo) -> None:
        super().__init__()
        self.fc = nn.Linear(input_width(info), info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def build_model(name: str, info: DatasetInfo, *, norm: str = "group", width: int = 0,
                seed: int = 0, mlp_widths: tuple[int, ...] = (256, 128)) -> nn.Module:
    """Build a model for a dataset; the same seed gives the same initial weights everywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "linear":
            return Linear(info)
        if name == "mlp":
            return MLP(info, mlp_widths, norm)
        if info.kind == "tabular":
            raise DataError(f"model={name!r} reads images; tabular data needs 'linear', 'mlp' "
                            "or your own model")
        if name == "cnn":
            return SmallCNN(info.in_channels, info.num_classes, width or 32, norm)
        blocks = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}
        if name not in blocks:
            raise ValueError(f"unknown model {name!r}; expected linear, mlp, cnn, resnet10, "
                             "resnet18")
        return ResNet(blocks[name], info.in_channels, info.num_classes, norm, width or 64)


def float_buffer_names(model: nn.Module) -> list[str]:
    """Names of floating-point buffers (BatchNorm running statistics) that would be released."""
    return [name for name, buf in model.named_buffers() if buf.is_floating_point()]


def model_from_config(config: RunConfig, *, seed: int | None = None) -> nn.Module:
    """The configured model with its trainable part selected, seeded by ``config.seed``."""
    info = dataset_info(config)
    if config.user_model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed if seed is None else seed)
            return user_model(config.model, info, input_spec(config))
    if config.model not in TRANSFORMER_MODELS:  # no transformers import (3 s) for these
        return build_model(config.model, info, norm=config.norm, width=config.model_width,
                           seed=config.seed if seed is None else seed,
                           mlp_widths=tuple(int(w) for w in config.mlp_widths.split(",")))
    from .hf import build_transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)
        return build_transformer(
            config.model, info, trainable=config.trainable,
            trainable_layers=config.trainable_layers, lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha, lora_targets=config.lora_targets)


def input_spec(config: RunConfig) -> InputSpec:
    """How the configured model reads its dataset (tokenizer and length for text)."""
    if dataset_info(config).kind != "text":
        return InputSpec()
    from .hub import tokenizer_source

    return InputSpec(tokenizer=tokenizer_source(config.model), max_length=config.max_length)


def frozen_names(model: nn.Module) -> set[str]:
    """Parameters that are not trained and therefore never travel."""
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def travelling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the server broadcasts and clients load: the state dict without frozen weights."""
    frozen = frozen_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_travelling(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a travelling state; any missing or unexpected name is an error, never ignored."""
    expected = set(model.state_dict()) - frozen_names(model)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"model state does not match the trainable part of the model: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)


def frozen_digest(model: nn.Module) -> str:
    """SHA-256 of the frozen weights (names and bytes); '' when everything is trained.

    Server and clients rebuild frozen weights locally; a different checkpoint or library version
    would silently train a different model, so clients compare this with the server's.
    """
    frozen = frozen_names(model)
    if not frozen:
        return ""
    digest = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if n in frozen):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
          batch_size: int = 1024) -> tuple[int, float]:
    """Correct predictions and summed cross-entropy of a model in eval mode (BatchNorm uses
    its running statistics, no dropout), in fixed batches: the server's central evaluation,
    a silo's and ``plateau.predict`` compute it alike, so the same weights give the same
    accuracy everywhere."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        labels = y[start:start + batch_size]
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    model.train(was_training)
    return correct, loss_sum
