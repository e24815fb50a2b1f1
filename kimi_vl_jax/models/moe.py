"""DeepSeek-V3 / Moonlight MoE block (SPEC §3.2): noaux_tc router, routed + shared experts.

Variables (names follow transformers' ``DeepseekV3MoE`` so conversion is a rename):
- ``params/gate/kernel`` [D, E] (logical ('embed', 'experts')): router weight (HF ``gate.weight``.T).
- ``router/gate/e_score_correction_bias`` [E] fp32: selection-only bias; no gradient; updated by
  the train step with ``update_router_bias``.
- ``params/experts/{gate_proj, up_proj}`` [E, D, F] and ``params/experts/down_proj`` [E, F, D]
  (logical ('experts', 'embed', 'expert_mlp') / ('experts', 'expert_mlp', 'embed')).
- ``params/shared_experts/{gate_proj, up_proj, down_proj}/kernel``: one SwiGLU of width
  n_shared_experts * moe_intermediate_size.

Routing (fp32): s = sigmoid(x @ W); choice = s + bias; group-limited top-k (group score = sum of
the top-2 choice scores of the group; keep topk_group groups); w = s[idx] / (sum + 1e-20) *
routed_scaling_factor. Padding tokens (segment id 0) are not routed at all: they use no expert
capacity, add nothing to the load statistics, and get only the shared-expert output.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.mlp import MLP
from kimi_vl_jax.ops import moe_dispatch
from kimi_vl_jax.ops.moe_ep import (data_parallel_ffn, data_parallel_shards, expert_parallel_ffn,
                                    expert_parallel_size)


def route(x_td, kernel_de, bias_e, *, top_k: int, n_group: int, topk_group: int,
          routed_scaling_factor: float, norm_topk_prob: bool = True):
  """noaux_tc routing, exactly as transformers' ``DeepseekV3TopkRouter``.

  Returns (scores_te fp32 sigmoid scores, idx_tk int32 expert ids, w_tk fp32 combine weights).
  The bias only affects which experts are chosen, never the weights.
  """
  t = x_td.shape[0]
  e = kernel_de.shape[-1]
  logits_te = jnp.dot(x_td.astype(jnp.float32), kernel_de.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  scores_te = jax.nn.sigmoid(logits_te)
  choice_te = jax.lax.stop_gradient(scores_te) + bias_e.astype(jnp.float32)
  if n_group > 1:
    per_group = e // n_group
    choice_tgx = choice_te.reshape(t, n_group, per_group)
    group_tg = jax.lax.top_k(choice_tgx, min(2, per_group))[0].sum(-1)
    _, group_idx = jax.lax.top_k(group_tg, topk_group)
    keep_tg = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], group_idx].set(True)
    choice_te = jnp.where(jnp.repeat(keep_tg, per_group, axis=1), choice_te, -jnp.inf)
  _, idx_tk = jax.lax.top_k(choice_te, top_k)
  w_tk = jnp.take_along_axis(scores_te, idx_tk, axis=1)
  if norm_topk_prob:
    w_tk = w_tk / (w_tk.sum(-1, keepdims=True) + 1e-20)
  return scores_te, idx_tk.astype(jnp.int32), w_tk * routed_scaling_factor


def sequence_balance_loss(scores_te, idx_tk, seg_key_t, num_segments: int, top_k: int):
  """DeepSeek-V3 sequence-wise balance loss, averaged over the sequences present.

  Per sequence s with T_s tokens: f_i = E / (K T_s) * #{t: i in topk(t)},
  P_i = mean_t s_it / sum_j s_jt; loss_s = sum_i f_i P_i (1 when perfectly balanced).
  seg_key_t: [T] int sequence key in [0, num_segments); padding tokens carry num_segments.
  """
  e = scores_te.shape[-1]
  valid_t = seg_key_t < num_segments
  norm_te = scores_te / scores_te.sum(-1, keepdims=True)
  hits_te = jnp.zeros_like(scores_te).at[jnp.arange(idx_tk.shape[0])[:, None], idx_tk].add(
      1.0, mode='drop')
  seg = jnp.where(valid_t, seg_key_t, num_segments)
  tokens_s = jax.ops.segment_sum(valid_t.astype(jnp.float32), seg, num_segments + 1)[:-1]
  hits_se = jax.ops.segment_sum(hits_te, seg, num_segments + 1)[:-1]
  prob_se = jax.ops.segment_sum(norm_te, seg, num_segments + 1)[:-1]
  denom_s = jnp.maximum(tokens_s, 1.0)[:, None]
  f_se = jax.lax.stop_gradient(hits_se * e / (top_k * denom_s))
  loss_s = jnp.sum(f_se * prob_se / denom_s, axis=-1)
  present_s = tokens_s > 0
  return jnp.sum(jnp.where(present_s, loss_s, 0.0)) / jnp.maximum(present_s.sum(), 1)


def _natural_key(path) -> tuple:
  """Sort key of a tree path with numbers compared as numbers (layers_2 before layers_10)."""
  text = jax.tree_util.keystr(path)
  return tuple(int(p) if p.isdigit() else p for p in re.split(r'(\d+)', text))


def update_router_bias(router_vars: Any, load_le, rate: float):
  """Aux-loss-free balancing: b += rate * sign(mean_e load - load_e), per layer.

  router_vars: the 'router' collection (any tree whose leaves are biases [..., E]).
  load_le: routed-token counts, either a tree with the same structure, or one array [L, E]
  whose rows follow the bias leaves in layer order (leaves sorted by path with numbers
  compared as numbers, so unscanned ``layers_2`` precedes ``layers_10``; a scanned stack is a
  single leaf [L, E]; a single [E] leaf takes load [E] or [1, E]).
  Returns the updated tree (biases keep their dtype).
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(router_vars)
  if not paths_leaves:
    raise ValueError('update_router_bias: router_vars has no e_score_correction_bias leaves')
  leaves = [leaf for _, leaf in paths_leaves]
  if isinstance(load_le, (dict, list, tuple)) or hasattr(load_le, 'keys'):
    loads = treedef.flatten_up_to(load_le)
  else:
    load_le = jnp.asarray(load_le)
    rows = [int(jnp.size(b)) // b.shape[-1] for b in leaves]
    flat = load_le.reshape(-1, load_le.shape[-1])
    if sum(rows) != flat.shape[0] or flat.shape[-1] != leaves[0].shape[-1]:
      raise ValueError(f'update_router_bias: load shape {load_le.shape} does not match the '
                       f'router biases {[b.shape for b in leaves]}')
    loads = [None] * len(leaves)
    start = 0
    for i in sorted(range(len(leaves)), key=lambda i: _natural_key(paths_leaves[i][0])):
      loads[i] = flat[start:start + rows[i]].reshape(leaves[i].shape)
      start += rows[i]

  def one(b, load):
    load = load.astype(jnp.float32)
    delta = jnp.sign(load.mean(-1, keepdims=True) - load)
    return (b.astype(jnp.float32) + rate * delta).astype(b.dtype)

  return jax.tree.unflatten(treedef, [one(b, l) for b, l in zip(leaves, loads)])


def routed_in_slices(routed, x_btd, idx_btk, w_btk, token_chunk: int, num_experts: int):
  """``routed(x, idx, w) -> (y_btd, dropped)`` over sequence slices of ``token_chunk`` tokens.

  Dispatch buffers grow with the tokens routed at once (the expert-parallel send and receive
  buffers of one 128K row at capacity factor 2 are 6 GiB each); slices bound them. Each slice
  is rematerialized in the backward pass, so only its inputs are saved. Capacities then apply
  per slice (``dropped`` is summed). S is padded up to a multiple with unrouted tokens.
  ``token_chunk`` <= 0 or >= S: one call.
  """
  b, s, d = x_btd.shape
  if token_chunk <= 0 or token_chunk >= s:
    return routed(x_btd, idx_btk, w_btk)
  n = -(-s // token_chunk)
  pad = n * token_chunk - s
  if pad:
    x_btd = jnp.pad(x_btd, ((0, 0), (0, pad), (0, 0)))
    idx_btk = jnp.pad(idx_btk, ((0, 0), (0, pad), (0, 0)), constant_values=num_experts)
    w_btk = jnp.pad(w_btk, ((0, 0), (0, pad), (0, 0)))
  # [N, B, Sc, ...]: slices lead, the (data-parallel) batch axis keeps its place.
  slices = lambda a: jnp.swapaxes(a.reshape(b, n, token_chunk, *a.shape[2:]), 0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(dropped, xs):
    y, drop = routed(*xs)
    return dropped + jnp.asarray(drop, jnp.int32), y.astype(jnp.float32)

  dropped, y_nbsd = jax.lax.scan(body, jnp.zeros((), jnp.int32),
                                 (slices(x_btd), slices(idx_btk), slices(w_btk)))
  return jnp.swapaxes(y_nbsd, 0, 1).reshape(b, n * token_chunk, d)[:, :s], dropped


class MoEGate(nn.Module):
  """Router weight [D, E] plus the non-trainable selection bias (collection 'router')."""
  config: FrozenConfigDict

  @nn.compact
  def __call__(self, x_td):
    cfg = self.config
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ('embed', 'experts')),
        (cfg.hidden_size, cfg.n_routed_experts), jnp.dtype(cfg.param_dtype))
    bias = self.variable(
        'router', 'e_score_correction_bias',
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ('experts',)),
        jax.random.PRNGKey(0), (cfg.n_routed_experts,), jnp.float32)
    bias_e = nn.unbox(bias.value)
    return route(x_td, kernel, jax.lax.stop_gradient(bias_e), top_k=cfg.num_experts_per_tok,
                 n_group=cfg.n_group, topk_group=cfg.topk_group,
                 routed_scaling_factor=cfg.routed_scaling_factor,
                 norm_topk_prob=cfg.norm_topk_prob)


class RoutedExperts(nn.Module):
  """The stacked expert weights; returns them cast to the compute dtype."""
  config: FrozenConfigDict

  @nn.compact
  def __call__(self):
    cfg = self.config
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    pdt = jnp.dtype(cfg.param_dtype)
    mk = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, pdt)
    w_gate = mk('gate_proj', (e, d, f), ('experts', 'embed', 'expert_mlp'))
    w_up = mk('up_proj', (e, d, f), ('experts', 'embed', 'expert_mlp'))
    w_down = mk('down_proj', (e, f, d), ('experts', 'expert_mlp', 'embed'))
    return w_gate, w_up, w_down


class MoEBlock(nn.Module):
  """Routed experts + shared experts. ``__call__(x_btd, segment_ids_bt) -> (y_btd, aux)``.

  aux: 'load_e' fp32 [E] routed assignments per expert over non-padding tokens, 'dropped'
  int32 (capacity drops), 'balance_loss' fp32 (alpha-weighted sequence-wise loss; 0 when
  seq_balance_loss_alpha == 0). On a mesh (``jax.set_mesh``, ``ops/moe_ep.py``): with an
  'expert' axis larger than 1, tokens are exchanged with all-to-all so every device runs only
  its own experts; otherwise, when the batch axes split the batch, every device dispatches
  only its own tokens.
  """
  config: FrozenConfigDict

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt):
    cfg = self.config
    b, s, d = x_btd.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    dtype = jnp.dtype(cfg.dtype)
    x_td = x_btd.reshape(b * s, d)
    valid_t = segment_ids_bt.reshape(-1) > 0

    scores_te, idx_tk, w_tk = MoEGate(cfg, name='gate')(x_td)
    idx_tk = jnp.where(valid_t[:, None], idx_tk, e)          # padding: not routed
    w_tk = jnp.where(valid_t[:, None], w_tk, 0.0)
    load_e = jnp.zeros((e + 1,), jnp.float32).at[idx_tk.reshape(-1)].add(1.0)[:e]

    w_gate, w_up, w_down = RoutedExperts(cfg, name='experts')()
    kwargs = dict(backend=cfg.moe_backend, capacity_factor=float(cfg.moe_capacity_factor),
                  dtype=dtype)

    def routed(x_btd, idx_btk, w_btk):
      """(routed_btd fp32, dropped) of one slice of the sequence."""
      bb, ss, _ = x_btd.shape
      if expert_parallel_size() > 1 or data_parallel_shards(bb) > 1:
        sharded_ffn = expert_parallel_ffn if expert_parallel_size() > 1 else data_parallel_ffn
        return sharded_ffn(x_btd.astype(dtype), idx_btk, w_btk, w_gate, w_up, w_down, **kwargs)
      routed_td, dropped = moe_dispatch.expert_ffn(
          x_btd.reshape(bb * ss, d), idx_btk.reshape(bb * ss, k), w_btk.reshape(bb * ss, k),
          w_gate, w_up, w_down, **kwargs)
      return routed_td.reshape(bb, ss, d), dropped

    y_btd, dropped = routed_in_slices(routed, x_btd, idx_tk.reshape(b, s, k),
                                      w_tk.reshape(b, s, k), int(cfg.moe_token_chunk), e)
    if cfg.n_shared_experts > 0:
      # HF ``shared_experts``: one SwiGLU of n_shared_experts * moe_intermediate_size.
      shared = MLP(cfg.n_shared_experts * cfg.moe_intermediate_size, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, initializer_range=cfg.initializer_range,
                   name='shared_experts')
      y_btd = y_btd + shared(x_btd).astype(jnp.float32)

    balance = jnp.float32(0.0)
    if cfg.seq_balance_loss_alpha > 0:
      # One sequence = one (row, segment id) pair of the packed batch.
      seg_key_t = (jnp.arange(b)[:, None] * (s + 1) + segment_ids_bt).reshape(-1)
      seg_key_t = jnp.where(valid_t, seg_key_t, b * (s + 1))
      balance = cfg.seq_balance_loss_alpha * sequence_balance_loss(
          scores_te, idx_tk, seg_key_t, b * (s + 1), k)
    aux = {'load_e': load_e, 'dropped': jnp.asarray(dropped, jnp.int32),
           'balance_loss': balance.astype(jnp.float32)}
    return y_btd.astype(x_btd.dtype), aux
