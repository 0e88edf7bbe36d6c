"""convzoo: drop-in, fast, tested convolution operators from five papers for any PyTorch CNN.

Swap (``convert`` / ``create_model``), train and compare (``convzoo`` command),
deploy (``deploy``): see the README.
"""

from convzoo.convert import (
    ConversionReport,
    carry_hooks,
    conversion_report,
    convert,
    deploy,
    find_conv_bn_pairs,
    fold_batchnorm,
    reparameterize,
)
from convzoo.models import create_model, list_models, register_model
from convzoo.ops import (
    CACLoss,
    CAConv2d,
    ConvNotReplaceableError,
    ConvSpec,
    CPWConv2d,
    DilatedSeparableConv2d,
    DOConv2d,
    DSConv2d,
    MixConv2d,
    MulticeptionConv2d,
    PyramidDilatedConv2d,
    cac_statistics,
    cpwc_grouping_plan,
    depthwise_conv2d,
    get_conv_kind,
    has_cac_layers,
    list_convs,
    register_conv,
)
from convzoo.profiling import ProfileReport, count_macs, count_parameters, profile_model
from convzoo.profiling import profile_model as profile
from convzoo.runtime import tune_cpu_allocator

__version__ = "0.1.0"

__all__ = [
    "CACLoss",
    "CAConv2d",
    "CPWConv2d",
    "ConvNotReplaceableError",
    "ConvSpec",
    "ConversionReport",
    "DOConv2d",
    "DSConv2d",
    "DilatedSeparableConv2d",
    "MixConv2d",
    "MulticeptionConv2d",
    "ProfileReport",
    "PyramidDilatedConv2d",
    "__version__",
    "cac_statistics",
    "carry_hooks",
    "conversion_report",
    "convert",
    "count_macs",
    "count_parameters",
    "cpwc_grouping_plan",
    "create_model",
    "deploy",
    "depthwise_conv2d",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "get_conv_kind",
    "has_cac_layers",
    "list_convs",
    "list_models",
    "profile",
    "profile_model",
    "register_conv",
    "register_model",
    "reparameterize",
    "tune_cpu_allocator",
]
