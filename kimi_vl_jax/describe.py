"""``--mode=describe``: parameter counts and shardings from abstract shapes only.

Builds every registered model component with ``jax.eval_shape`` (nothing is
allocated, so the 16B A3B preset describes on a laptop) and prints, per module, total
and active-per-token parameter counts, then the largest tensors with their logical
axes, mesh PartitionSpec and per-device shard shape under the configured mesh.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from kimi_vl_jax.config.validate import MESH_AXES, resolve_mesh_shape
from kimi_vl_jax.models.abstract import ComponentSpec, abstract_components
from kimi_vl_jax.parallel.rules import LOGICAL_AXIS_RULES
from kimi_vl_jax.parallel.sharding import logical_to_spec


def _leaves_with_paths(tree) -> list[tuple[str, Any]]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  out = []
  for path, leaf in flat:
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    out.append((name, leaf))
  return out


def count_params(variables, spec: ComponentSpec = ComponentSpec()) -> dict:
  """{'total', 'active', 'modules': {top-level module: (total, active)}} over 'params'."""
  params = variables.get('params', variables) if isinstance(variables, dict) else variables
  modules: dict[str, list[float]] = {}
  total = active = 0.0
  for name, leaf in _leaves_with_paths(params):
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    n = float(math.prod(value.shape))
    a = n * spec.active_fraction if spec.routed_expert_key and spec.routed_expert_key in name else n
    top = name.split('/')[0]
    m = modules.setdefault(top, [0.0, 0.0])
    m[0] += n
    m[1] += a
    total += n
    active += a
  return {'total': total, 'active': active, 'modules': modules}


def _shard_shape(shape, spec: P, mesh_sizes: dict) -> tuple:
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    out.append(dim // math.prod(mesh_sizes[a] for a in names) if names else dim)
  return tuple(out)


def largest_tensors(variables, mesh_sizes: dict, top: int = 8) -> list[dict]:
  rows = []
  for name, leaf in _leaves_with_paths(variables):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value, names = leaf.value, leaf.names
      spec = logical_to_spec(names, LOGICAL_AXIS_RULES)
    else:
      value, names, spec = leaf, None, P()
    rows.append(dict(name=name, shape=tuple(value.shape), dtype=str(value.dtype),
                     logical=names, spec=spec, shard=_shard_shape(value.shape, spec, mesh_sizes),
                     size=math.prod(value.shape)))
  rows.sort(key=lambda r: -r['size'])
  return rows[:top]


def _fmt_count(n: float) -> str:
  for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= div:
      return f'{n / div:.2f}{unit}'
  return f'{n:.0f}'


def describe(config, num_devices: Optional[int] = None, print_fn=print) -> dict:
  """Prints the description of ``config.model``; returns the counts per component."""
  mesh_cfg = config.mesh
  note = ''
  if num_devices is None:
    fixed = [mesh_cfg[a] for a in MESH_AXES]
    num_devices = math.prod(fixed) if -1 not in fixed else jax.device_count()
    fixed_devices = math.prod(s for s in fixed if s != -1)
    if -1 in fixed and num_devices % fixed_devices:
      # Shapes are abstract, so a mesh this host cannot hold can still be described: the
      # smallest one the fixed axes allow (e.g. expert=8 with fsdp=-1, on a 1-device laptop).
      note = f'; this host has {num_devices}, the fixed axes need a multiple of {fixed_devices}'
      num_devices = fixed_devices
  mesh_sizes = resolve_mesh_shape(mesh_cfg, num_devices)
  print_fn(f'model preset: {config.model.get("name", "?")}   mesh: '
           + ' x '.join(f'{a}={mesh_sizes[a]}' for a in MESH_AXES)
           + f' ({num_devices} devices{note})')
  components = abstract_components(config.model)
  if not components:
    print_fn('no model components are registered yet')
    return {}
  result = {}
  grand_total = grand_active = 0.0
  for comp_name, (variables, spec) in components.items():
    counts = count_params(variables, spec)
    result[comp_name] = counts
    grand_total += counts['total']
    grand_active += counts['active']
    print_fn(f'\n== {comp_name}: total {_fmt_count(counts["total"])} '
             f'({counts["total"]:,.0f}), active per token {_fmt_count(counts["active"])}')
    for mod, (t, a) in counts['modules'].items():
      print_fn(f'   {mod:<40s} total {_fmt_count(t):>9s}   active {_fmt_count(a):>9s}')
    print_fn('   largest tensors (logical axes -> mesh spec, per-device shard):')
    for r in largest_tensors(variables, mesh_sizes):
      print_fn(f'     {r["name"]:<52s} {str(r["shape"]):<22s} {r["dtype"]:<8s} '
               f'{str(r["logical"]):<36s} {str(r["spec"]):<28s} {r["shard"]}')
  print_fn(f'\nall components: total {_fmt_count(grand_total)} ({grand_total:,.0f}), '
           f'active per token {_fmt_count(grand_active)}')
  result['all'] = {'total': grand_total, 'active': grand_active}
  return result
