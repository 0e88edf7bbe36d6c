"""convzoo: drop-in, fast, tested convolution operators from five papers for any PyTorch CNN.

Swap (``convert`` / ``create_model``), train and compare (``convzoo`` command),
deploy (``deploy``): see the README.
"""

from convzoo import profile
from convzoo.convert import (
    ConversionReport,
    conversion_report,
    convert,
    deploy,
    find_conv_bn_pairs,
    fold_batchnorm,
    reparameterize,
)
from convzoo.models import create_model, list_models, register_model
from convzoo.ops import ConvSpec, DOConv2d, get_conv_kind, list_convs, register_conv

__version__ = "0.1.0"

__all__ = [
    "ConvSpec",
    "ConversionReport",
    "DOConv2d",
    "__version__",
    "conversion_report",
    "convert",
    "create_model",
    "deploy",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "get_conv_kind",
    "list_convs",
    "list_models",
    "profile",
    "register_conv",
    "register_model",
    "reparameterize",
]
