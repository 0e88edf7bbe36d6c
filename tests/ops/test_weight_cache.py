"""WeightCache: rebuilt when its tensors change, empty in copies."""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn

from convzoo.ops.weight_cache import WeightCache


def _counting() -> tuple[WeightCache[int], list[int]]:
    return WeightCache(), []


def test_the_value_is_kept_until_a_tensor_changes() -> None:
    cache, builds = _counting()
    layer = nn.Linear(3, 4)
    build = lambda: builds.append(1) or len(builds)  # noqa: E731
    assert cache.get((layer.weight, layer.bias), build) == 1
    assert cache.get((layer.weight, layer.bias), build) == 1  # unchanged: kept
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the version moves
    assert cache.get((layer.weight, layer.bias), build) == 2
    layer.weight = nn.Parameter(torch.randn(4, 3))  # replaced
    assert cache.get((layer.weight, layer.bias), build) == 3
    layer.weight.data = torch.randn(4, 3)  # a new .data: new memory
    assert cache.get((layer.weight, layer.bias), build) == 4
    layer.load_state_dict(nn.Linear(3, 4).state_dict())
    assert cache.get((layer.weight, layer.bias), build) == 5
    assert cache.get((layer.bias, layer.weight), build) == 6  # other tensors in the key
    layer.weight.data.mul_(3.0)  # through .data: not seen, as documented; clear() after it
    assert cache.get((layer.bias, layer.weight), build) == 6
    cache.clear()
    assert cache.get((layer.bias, layer.weight), build) == 7


def test_copies_start_empty() -> None:
    cache: WeightCache[int] = WeightCache()
    weight = torch.randn(3)
    cache.get((weight,), lambda: 41)
    assert copy.deepcopy(cache).get((weight,), lambda: 42) == 42
    assert pickle.loads(pickle.dumps(cache)).get((weight,), lambda: 43) == 43
    assert cache.get((weight,), lambda: 44) == 41


def test_inference_tensors_have_no_version_but_are_still_keyed() -> None:
    cache: WeightCache[int] = WeightCache()
    with torch.inference_mode():
        weight = torch.randn(3)
    assert cache.get((weight,), lambda: 1) == 1
    assert cache.get((weight,), lambda: 2) == 1
    with torch.inference_mode():
        other = torch.randn(3)
    assert cache.get((other,), lambda: 3) == 3
