"""The character language model that uses the S2MoE layer."""
from .config import ModelConfig, model_config_from_dict
from .linear import make_linear, set_linear_factory
from .loss import LossParts, lm_loss
from .transformer import CharLM

__all__ = ["CharLM", "LossParts", "ModelConfig", "lm_loss", "make_linear", "model_config_from_dict",
           "set_linear_factory"]
