"""Operators, one module per paper. Importing this package registers every kind."""

from convzoo.ops import doconv  # noqa: F401  (registers "doconv")
from convzoo.ops.conv_spec import ConvSpec
from convzoo.ops.doconv import DOConv2d
from convzoo.ops.registry import ConvKind, get_conv_kind, list_convs, register_conv

__all__ = ["ConvKind", "ConvSpec", "DOConv2d", "get_conv_kind", "list_convs", "register_conv"]
