"""The character language model that uses the S2MoE layer (names resolved lazily: s2moe_dist._lazy)."""
from .._lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "CharLM": ".transformer", "LossParts": ".loss", "ModelConfig": ".config", "lm_loss": ".loss",
    "make_linear": ".linear", "model_config_from_dict": ".config", "set_linear_factory": ".linear"})

__all__ = ["CharLM", "LossParts", "ModelConfig", "lm_loss", "make_linear", "model_config_from_dict",
           "set_linear_factory"]
