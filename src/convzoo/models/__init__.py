"""Model zoo. Importing this package registers every model family."""

from convzoo.models import cifar_resnet  # noqa: F401  (registers cifar_resnet*, cifar_plain20)
from convzoo.models.registry import add_preset, create_model, get_model_entry, list_models, register_model

__all__ = ["add_preset", "create_model", "get_model_entry", "list_models", "register_model"]
