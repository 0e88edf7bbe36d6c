"""The stage layout shared by the CIFAR residual networks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

BlockFactory = Callable[[int, int, int], nn.Module]  # (stage index, in_channels, stride) -> block


def residual_stages(
    in_channels: int, stage_out_channels: Sequence[int], blocks_per_stage: int, make_block: BlockFactory
) -> list[nn.Sequential]:
    """One ``nn.Sequential`` per stage, ``blocks_per_stage`` blocks each.

    The first block of every stage but the first has stride 2 (He et al.'s CIFAR layout); each
    block of stage s after the first reads ``stage_out_channels[s]`` channels. Module names come out
    as ``<stage>.<block>``, which the placement presets rely on (``layer{1,2,3}.<i>.conv1``).
    """
    stages = []
    channels = in_channels
    for stage, out_channels in enumerate(stage_out_channels):
        blocks = []
        for index in range(blocks_per_stage):
            blocks.append(make_block(stage, channels, 2 if stage > 0 and index == 0 else 1))
            channels = out_channels
        stages.append(nn.Sequential(*blocks))
    return stages
