"""The one table that maps logical axis names to mesh axes.

Modules annotate parameters (``nn.with_logical_partitioning``) and activations
(``nn.with_logical_constraint``) with the logical names below; nothing else in the
package names a mesh axis for a tensor. Mesh axes: ``data`` (pure data parallel),
``fsdp`` (data parallel + parameter sharding), ``expert`` (expert parallel; also
data parallel for non-expert tensors), ``tensor`` (Megatron-style tensor parallel).

Flax resolves a rule to the first listed mesh axis that the tensor does not already
use, so e.g. a [experts, embed, mlp] kernel takes ``expert``, ``fsdp``, ``tensor``.
"""
from __future__ import annotations

# The batch of activations is split over every data-parallel axis.
BATCH_AXES = ('data', 'fsdp', 'expert')

LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # --- activations ---
    ('batch', BATCH_AXES),
    ('length', None),              # sequence positions (context parallel: not yet)
    ('act_embed', None),           # hidden features of an activation
    ('act_heads', 'tensor'),
    ('act_kv', None),              # per-head feature dims
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_experts', 'expert'),
    ('act_patches', None),         # vision patch slots of one example
    # --- parameters ---
    ('embed', 'fsdp'),             # LM hidden (d_model) of weights
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),                  # head dim of weights
    ('q_lora', None),
    ('kv_lora', None),             # MLA latent (512) of weights
    ('mlp', 'tensor'),             # dense and shared-expert intermediate
    ('experts', 'expert'),         # routed expert stack
    ('expert_mlp', 'tensor'),      # routed expert intermediate
    ('layers', None),              # scan axis of stacked layers
    ('norm', None),                # norm gains and biases
    ('vision_embed', 'fsdp'),
    ('vision_mlp', 'tensor'),
    ('vision_heads', 'tensor'),
    ('vision_pos', None),          # the (H, W) axes of the position table
    ('patch_in', None),            # 3*14*14 flattened patch pixels
)

LOGICAL_AXES = tuple(name for name, _ in LOGICAL_AXIS_RULES)
