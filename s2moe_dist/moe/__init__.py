"""The S2MoE layer in pure PyTorch: no DeepSpeed, no Megatron, no models.

Shapes, named the same in every file of this package:

    T        tokens entering the layer (batch x sequence, flattened)
    2T       both streams stacked: the T clean rows, then the T noisy rows (``[2T, d]``)
    N        rows one router call routes (T, or 2T when both streams are routed at once)
    d        model (hidden) size;  h: an expert's inner size (``ffn_hidden_size``)
    E        experts in the layer;  E_local: experts on this rank (E / expert-parallel size)
    k        experts per token (``k`` in training, ``eval_k`` in evaluation)
    R        rows through this rank's experts, sorted by expert (the kept slots routed to them, from every rank)
    S        tokens InfoNCE samples per layer (at most ``infonce_max_tokens``): its logits are [S, S]
"""
from .layer import S2MoELayer, s2moe_aux_loss

__all__ = ["S2MoELayer", "s2moe_aux_loss"]
