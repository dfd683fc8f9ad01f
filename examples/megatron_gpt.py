"""A Megatron-core ``GPTModel`` whose every second layer has an S2MoE MLP, trained for a few steps.

    python examples/megatron_gpt.py [--steps 3]

One process (TP=1) with a gloo process group, so it runs on a CPU. Megatron's
``DotProductAttention`` allocates on CUDA: without a GPU a plain causal attention with the same
call takes its place. For tensor parallelism set ``tensor_model_parallel_size`` and launch with
``torchrun``; ``enable_expert_tensor_parallelism=True`` in the MoE config splits the experts.
"""
import argparse
import os
import socket
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


class CPUCoreAttention(torch.nn.Module):
    """Causal softmax attention with ``DotProductAttention``'s call, for CPUs."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, h, dh] -> [b, h, s, dh]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def set_rendezvous_defaults():
    """One rank on this host unless a launcher (torchrun) set the rendezvous already."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def use_cpu_attention(model):
    """Megatron's DotProductAttention allocates on CUDA: a plain causal attention on CPUs."""
    for layer in model.decoder.layers:
        layer.self_attention.core_attention = CPUCoreAttention(None, None, None, None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="training steps")
    args = p.parse_args(argv)
    set_rendezvous_defaults()

    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from s2moe_dist.integrations.megatron import get_s2moe_block_spec

    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")   # as under torchrun
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    # S2MoE in layers 1, 3, ...
    block = get_s2moe_block_spec(config.num_layers, {"num_experts": 4, "k": 2}, moe_every=2)
    model = GPTModel(config, transformer_layer_spec=block, vocab_size=64, max_sequence_length=16)

    if not torch.cuda.is_available():
        use_cpu_attention(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vocab, seq, batch = 64, 16, 4
    for step in range(args.steps):
        tokens = torch.randint(0, vocab, (batch, seq))
        position_ids = torch.arange(seq).expand(batch, seq)
        # the per-token losses carry S2MoE's aux loss (MoEAuxLossAutoScaler): no change to the loss
        loss = model(tokens, position_ids, attention_mask=None, labels=tokens.roll(-1, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f} (layer 1 MLP: {type(model.decoder.layers[1].mlp).__name__})")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
