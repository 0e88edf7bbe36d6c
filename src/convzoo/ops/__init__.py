"""Operators, one module per paper. Importing this package registers every kind."""

from convzoo.ops import (
    cac,  # noqa: F401  (registers "cac")
    cpwc,  # noqa: F401  (registers "cpwc")
    dilated,  # noqa: F401  (registers "dds", "pyramid")
    doconv,  # noqa: F401  (registers "doconv")
    multiception,  # noqa: F401  (registers "multiception")
    separable,  # noqa: F401  (registers "dsconv", "mixconv")
)
from convzoo.ops.cac import CAConv2d, has_cac_layers
from convzoo.ops.cac_cost import CACLoss, CACStatistics, cac_statistics
from convzoo.ops.cac_sharp import CACSharpConv2d
from convzoo.ops.cac_sparse import CACSparseConv2d
from convzoo.ops.conv_spec import ConvSpec
from convzoo.ops.cpwc import CPWCGroupingPlan, CPWConv2d, cpwc_grouping_plan
from convzoo.ops.depthwise import depthwise_conv2d
from convzoo.ops.dilated import DilatedSeparableConv2d, PyramidDilatedConv2d
from convzoo.ops.doconv import DOConv2d
from convzoo.ops.multiception import FusedMulticeptionConv2d, MulticeptionConv2d, MulticeptionOfficial
from convzoo.ops.registry import ConvKind, ConvNotReplaceableError, get_conv_kind, list_convs, register_conv
from convzoo.ops.separable import DSConv2d, MixConv2d

__all__ = [
    "CACLoss",
    "CACSharpConv2d",
    "CACSparseConv2d",
    "CACStatistics",
    "CAConv2d",
    "CPWCGroupingPlan",
    "CPWConv2d",
    "ConvKind",
    "ConvNotReplaceableError",
    "ConvSpec",
    "DOConv2d",
    "DSConv2d",
    "DilatedSeparableConv2d",
    "FusedMulticeptionConv2d",
    "MixConv2d",
    "MulticeptionConv2d",
    "MulticeptionOfficial",
    "PyramidDilatedConv2d",
    "cac_statistics",
    "cpwc_grouping_plan",
    "depthwise_conv2d",
    "get_conv_kind",
    "has_cac_layers",
    "list_convs",
    "register_conv",
]
