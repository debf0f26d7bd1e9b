"""Models: shapes from the dataset, buffer-free GroupNorm, seeded initialisation."""

from __future__ import annotations

import pytest
import torch

from plateau.data import DATASETS
from plateau.models import build_model, float_buffer_names


@pytest.mark.parametrize("dataset", ["digits", "fashion-mnist", "cifar10", "cifar100"])
@pytest.mark.parametrize("name", ["linear", "cnn", "resnet10"])
def test_forward_shape_follows_the_dataset(name: str, dataset: str) -> None:
    info = DATASETS[dataset]
    model = build_model(name, info, width=8)
    x = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    assert model(x).shape == (2, info.num_classes)


def test_resnet_sizes_match_the_reference_definition() -> None:
    resnet10 = build_model("resnet10", DATASETS["cifar10"])
    resnet18 = build_model("resnet18", DATASETS["cifar10"])
    assert sum(p.numel() for p in resnet10.parameters()) == 4_903_242
    assert sum(p.numel() for p in resnet18.parameters()) == 11_173_962
    assert len(list(resnet10.parameters())) == 38 and len(list(resnet18.parameters())) == 62


def test_groupnorm_models_have_no_buffers_and_batchnorm_models_do() -> None:
    info = DATASETS["cifar10"]
    assert list(build_model("resnet10", info, width=8).buffers()) == []
    assert list(build_model("cnn", info).buffers()) == []
    assert list(build_model("linear", info).buffers()) == []
    assert sum(p.numel() for p in build_model("linear", DATASETS["digits"]).parameters()) == 650
    bn = build_model("resnet10", info, norm="batch", width=8)
    # stem + 2 per block x 4 blocks + 3 projection shortcuts = 12 BatchNorm layers, mean and var
    assert len(float_buffer_names(bn)) == 2 * 12
    assert all("running" in n for n in float_buffer_names(bn))


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cnn", DATASETS["digits"], seed=4)
    assert torch.equal(torch.rand(1), before)
    b = build_model("cnn", DATASETS["digits"], seed=4)
    c = build_model("cnn", DATASETS["digits"], seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
