"""Checkpoints of S2MoE models: naming, formats, conversion. Import the submodule you need; nothing
is imported here, so ``moe`` can use ``keys`` without pulling in the rest.

- ``keys``: the expert parameter naming scheme and DeepSpeed's checkpoint file names (pure strings;
  the only place that builds or parses them).
- ``state_dict``: the layer's state dict in DeepSpeed-MoE's per-expert layout (save/load hooks,
  ``batched_expert_state_dict``).
- ``tags``: tag folders of ``s2moe-train``: names, the completion marker and its manifest,
  verification, resume candidates, pruning (the collective ``save`` is ``train.checkpoint``).
- ``tp_merge``: a tensor-parallel checkpoint merged into one TP=1 state dict (``s2moe-eval``).
- Optimizer state across a change of EP / data-parallel size (the resharder): ``optim_state``
  (the typed state), ``optim_formats`` (reading and writing ZeRO-0, ZeRO-1/2 and portable files),
  ``canonical`` (EP-independent parameter names), ``live`` (writing into a running engine,
  ``load_checkpoint``), ``convert`` (offline ``reshard_checkpoint``), ``reshard_cli``
  (``s2moe-ckpt reshard``).

Old paths kept as thin re-exports: ``integrations.reshard``, ``integrations.ds_checkpoint``,
``train.tp_checkpoint`` and the tag helpers in ``train.checkpoint``.
"""
