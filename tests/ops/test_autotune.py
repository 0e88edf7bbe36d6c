"""Tests for convzoo.ops.autotune: candidate timing and the per-signature choice cache."""

from __future__ import annotations

import time

import pytest
import torch

from convzoo.ops.autotune import AlgorithmCache, input_signature, time_candidates


def _counting(name: str, calls: dict[str, int], delay: float = 0.0):
    def run() -> torch.Tensor:
        calls[name] = calls.get(name, 0) + 1
        if delay:
            time.sleep(delay)
        return torch.zeros(1)

    return run


def test_time_candidates_picks_the_faster_one_whatever_the_order() -> None:
    calls: dict[str, int] = {}
    quick, slow = _counting("quick", calls), _counting("slow", calls, delay=0.02)
    device = torch.device("cpu")
    assert time_candidates({"slow": slow, "quick": quick}, device, repeats=2) == "quick"
    assert time_candidates({"quick": quick, "slow": slow}, device, repeats=2) == "quick"
    assert calls == {"quick": 6, "slow": 6}  # one warm-up + 2 timed runs, per call


def test_cache_times_once_per_signature() -> None:
    cache = AlgorithmCache()
    calls: dict[str, int] = {}
    candidates = {"slow": _counting("slow", calls, delay=0.01), "quick": _counting("quick", calls)}
    x = torch.zeros(2, 3, 4, 5)
    assert cache.choose(x, candidates) == "quick"
    before = dict(calls)
    assert cache.choose(torch.ones(2, 3, 4, 5), candidates) == "quick"  # same signature: no timing
    assert calls == before
    cache.choose(x.contiguous(memory_format=torch.channels_last), candidates)  # new layout: timed again
    assert calls["quick"] > before["quick"] and len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_single_candidate_is_not_timed() -> None:
    calls: dict[str, int] = {}
    assert AlgorithmCache().choose(torch.zeros(1), {"only": _counting("only", calls)}) == "only"
    assert calls == {}


def test_signature_tells_layouts_dtypes_and_shapes_apart() -> None:
    x = torch.zeros(2, 3, 4, 5)
    signatures = {
        input_signature(x),
        input_signature(x.contiguous(memory_format=torch.channels_last)),
        input_signature(x.double()),
        input_signature(torch.zeros(2, 3, 4, 6)),
    }
    assert len(signatures) == 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one"):
        time_candidates({}, torch.device("cpu"))
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        time_candidates({"a": lambda: torch.zeros(1)}, torch.device("cpu"), repeats=0)


def test_nothing_is_timed_or_cached_under_a_dispatch_mode() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    cache = AlgorithmCache()
    calls: dict[str, int] = {}
    candidates = {"first": _counting("first", calls), "second": _counting("second", calls)}
    with FlopCounterMode(display=False):
        assert cache.choose(torch.zeros(3), candidates) == "first"
    assert calls == {} and len(cache) == 0


def test_signature_tells_devices_and_autocast_apart() -> None:
    """A choice timed in float32 is not reused under autocast (the convs then run in half precision)."""
    x = torch.zeros(2, 3, 4, 5)
    plain = input_signature(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert input_signature(x) != plain
    assert input_signature(x.to("meta")) != plain
    assert "cpu" in plain  # the device with its index, e.g. 'cuda:1'
