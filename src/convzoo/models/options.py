"""Checks of the options every zoo network takes: its image channels and the zero-init of residual branches."""

from __future__ import annotations

from convzoo.ops.conv_spec import check_bool, check_channels


def check_network_options(in_channels: object, zero_init_residual: object = False) -> tuple[int, bool]:
    """Check a zoo network's ``in_channels`` and ``zero_init_residual`` and return them.

    Args:
        in_channels: channels C of the input images (B, C, H, W): a positive int, not a bool.
        zero_init_residual: whether the last BN of every residual branch starts with gamma 0: a bool
            (a truthy string such as ``'no'`` would silently zero them).

    Returns:
        (in_channels as an int, zero_init_residual).

    Raises:
        TypeError: ``in_channels`` is not an int (a bool or a str such as ``'3'``), ``zero_init_residual``
            not a bool.
        ValueError: ``in_channels`` < 1.
    """
    return check_channels(in_channels, "in_channels"), check_bool(zero_init_residual, "zero_init_residual")
