"""Model zoo. Importing this package registers every model family."""

from convzoo.models import (
    cifar_densenet,  # noqa: F401  (registers cifar_densenet121)
    cifar_preresnet,  # noqa: F401  (registers cifar_preresnet*)
    cifar_resnet,  # noqa: F401  (registers cifar_resnet*, cifar_plain20)
    cifar_resnext,  # noqa: F401  (registers cifar_resnext29_*)
    cifar_se_resnet,  # noqa: F401  (registers cifar_se_resnet56)
    cifar_shakeshake,  # noqa: F401  (registers cifar_shakeshake26_2x96d)
    cifar_shufflenetv2,  # noqa: F401  (registers cifar_shufflenetv2)
    mobilenet,  # noqa: F401  (registers mobilenetv1/v2, cifar_mobilenetv2*, ddsnet)
    multiception_presets,  # noqa: F401  (multiception/dsconv/mixconv presets; after the families it decorates)
    torchvision_models,  # noqa: F401  (registers resnet18/50/101, mobilenet_v2*, densenet121, shufflenet_v2_x1_0)
    zoo_placement,  # noqa: F401  (last, after every family: depthwise-only dds presets)
)
from convzoo.models.registry import add_preset, create_model, get_model_entry, list_models, register_model

__all__ = ["add_preset", "create_model", "get_model_entry", "list_models", "register_model"]
