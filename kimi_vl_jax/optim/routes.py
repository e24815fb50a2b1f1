"""The route table: parameter path -> optimizer treatment (Muon, AdamW or frozen).

One declarative table, ``ROUTES``, of ``(regex, rule)`` pairs searched in order against the
'/'-joined parameter path (``decoder/layers/mlp/wi/kernel``); the first match wins. Rules:

- ``ADAMW``: AdamW (SPEC §4.1: embeddings, lm_head, norms, biases, other non-matrices).
- ``MUON``: Muon with the matrix axes found from the parameter's logical axis names: the
  leading run of ``layers``/``experts`` axes are batch axes (each layer's / expert's matrix is
  orthogonalized on its own); of the remaining axes, a projection *into* the residual stream
  (last axis ``embed``/``vision_embed``) reduces over all but the last, anything else reduces
  over the first. So ``[embed, heads, kv]`` is one ``embed x (heads*kv)`` matrix and
  ``[heads, kv, embed]`` one ``(heads*kv) x embed`` matrix: attention projections are never
  split per head (SPEC §4.1). Without logical names every leading axis but the last two is a
  batch axis. Fewer than two matrix axes, or a ``vocab`` axis, falls back to AdamW.
- ``MuonAxes(reduction, output)``: Muon with explicit (negative = from the end) axes.

Frozen parameters come from ``trainable`` regexes (a path is trainable iff one matches);
non-trainable collections (the router's correction bias) are not in ``params`` at all.

``python -m kimi_vl_jax.optim.routes --config=experiments/x.py`` prints path, shape,
treatment, matrix and batch axes for every registered model component.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax

BATCH_LOGICAL = ('layers', 'experts')        # stacked axes orthogonalized per matrix
RESIDUAL_LOGICAL = ('embed', 'vision_embed')  # the residual-stream width of weights


@dataclasses.dataclass(frozen=True)
class MuonAxes:
  """Explicit Muon matrix axes; negative ints count from the end. Other axes are batch."""
  reduction: tuple[int, ...] = (-2,)
  output: tuple[int, ...] = (-1,)


ADAMW = 'adamw'
MUON = 'muon'
Rule = Union[str, MuonAxes]

# path regex -> rule; first match wins. Paths are '/'-joined keys inside 'params'.
ROUTES: tuple[tuple[str, Rule], ...] = (
    (r'(^|/)(embed_tokens|embedding|embeddings|token_embed|wte)(/|$)', ADAMW),  # lookups
    (r'(^|/)lm_head(/|$)', ADAMW),                      # untied output head (SPEC §4.1)
    (r'(^|/)[^/]*(norm|ln)[^/]*/', ADAMW),              # RMSNorm / LayerNorm gains, biases
    (r'(^|/)(bias|scale)$', ADAMW),                     # biases and norm gains anywhere
    (r'(^|/)pos_emb[^/]*(/|$)', ADAMW),                 # MoonViT's (H, W, D) position table
    (r'.*', MUON),                                      # every other weight: a matrix if it has 2 axes
)


@dataclasses.dataclass(frozen=True)
class Route:
  """The treatment of one parameter. Axes are non-negative ints into its shape."""
  path: str
  shape: tuple[int, ...]
  treatment: str                      # 'muon' | 'adamw' | 'frozen'
  reduction: tuple[int, ...] = ()
  output: tuple[int, ...] = ()
  batch: tuple[int, ...] = ()
  logical: Optional[tuple] = None

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(A, B): the full matrix's reduction and output sizes (Muon only)."""
    return (math.prod(self.shape[a] for a in self.reduction),
            math.prod(self.shape[a] for a in self.output))


def path_str(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in key_path)


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def flatten_params(params) -> tuple[list[tuple[str, tuple, Optional[tuple]]], Any]:
  """[(path, shape, logical names or None)] and the treedef of the UNBOXED tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
  rows = []
  for key_path, leaf in flat:
    if _is_box(leaf):
      rows.append((path_str(key_path), tuple(leaf.value.shape), tuple(leaf.names)))
    else:
      rows.append((path_str(key_path), tuple(leaf.shape), None))
  treedef = jax.tree.structure(nn.unbox(params))
  return rows, treedef


def _auto_axes(path: str, shape: tuple, logical: Optional[tuple]):
  """(reduction, output, batch) for the MUON rule, or None for AdamW."""
  ndim = len(shape)
  if ndim < 2:
    return None
  if logical is not None:
    if 'vocab' in logical:
      return None
    n_batch = 0
    while n_batch < ndim - 2 and logical[n_batch] in BATCH_LOGICAL:
      n_batch += 1
    matrix = tuple(range(n_batch, ndim))
    names = [logical[a] for a in matrix]
    if len(matrix) > 2 and names[-1] in RESIDUAL_LOGICAL and names[0] not in RESIDUAL_LOGICAL:
      reduction, output = matrix[:-1], matrix[-1:]
    else:
      reduction, output = matrix[:1], matrix[1:]
    return reduction, output, tuple(range(n_batch))
  return (ndim - 2,), (ndim - 1,), tuple(range(ndim - 2))


def _explicit_axes(path: str, shape: tuple, rule: MuonAxes):
  ndim = len(shape)
  try:
    reduction = tuple(sorted(a % ndim for a in rule.reduction if -ndim <= a < ndim))
    output = tuple(sorted(a % ndim for a in rule.output if -ndim <= a < ndim))
  except ZeroDivisionError:
    reduction = output = ()
  if (len(reduction) != len(rule.reduction) or len(output) != len(rule.output)
      or set(reduction) & set(output) or not reduction or not output):
    raise ValueError(f'route for {path} shape {shape}: invalid Muon axes {rule}')
  batch = tuple(a for a in range(ndim) if a not in reduction and a not in output)
  return reduction, output, batch


def _compile(patterns) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f'trainable pattern {p!r} is not a valid regex: {e}') from e
  return out


def route_leaf(path: str, shape: tuple, logical: Optional[tuple] = None,
               trainable: Optional[Sequence[str]] = None, routes=ROUTES) -> Route:
  """The Route of one parameter (see the module docstring)."""
  if trainable is not None and not any(p.search(path) for p in _compile(trainable)):
    return Route(path, shape, 'frozen', logical=logical)
  for pattern, rule in routes:
    if re.search(pattern, path):
      break
  else:
    raise ValueError(f'no route matches parameter {path}; add one to routes.ROUTES')
  if rule == ADAMW:
    return Route(path, shape, 'adamw', logical=logical)
  axes = (_auto_axes(path, shape, logical) if rule == MUON
          else _explicit_axes(path, shape, rule))
  if axes is None:
    return Route(path, shape, 'adamw', logical=logical)
  reduction, output, batch = axes
  return Route(path, shape, 'muon', reduction, output, batch, logical)


def route_params(params, trainable: Optional[Sequence[str]] = None, routes=ROUTES) -> Any:
  """A tree of ``Route`` matching the unboxed ``params`` (boxed or unboxed input)."""
  rows, treedef = flatten_params(params)
  return jax.tree.unflatten(treedef, [route_leaf(p, s, l, trainable, routes) for p, s, l in rows])


def format_table(routes_tree) -> str:
  """One line per parameter: path, shape, treatment, matrix (A x B), batch axes."""
  leaves = jax.tree.leaves(routes_tree, is_leaf=lambda x: isinstance(x, Route))
  width = max([len(r.path) for r in leaves] + [4])
  lines = [f'{"path":<{width}}  {"shape":<22} {"treatment":<9} {"matrix A x B":<14} batch axes']
  for r in leaves:
    matrix = 'x'.join(map(str, r.matrix_shape)) if r.treatment == 'muon' else '-'
    batch = ','.join(f'{a}' + (f':{r.logical[a]}' if r.logical else '') for a in r.batch) or '-'
    lines.append(f'{r.path:<{width}}  {str(r.shape):<22} {r.treatment:<9} {matrix:<14} {batch}')
  counts = {}
  for r in leaves:
    counts[r.treatment] = counts.get(r.treatment, 0) + math.prod(r.shape)
  lines.append('params by treatment: ' + ', '.join(f'{k}={v:,}' for k, v in sorted(counts.items())))
  return '\n'.join(lines)


def routes_report(model_cfg, trainable: Optional[Sequence[str]] = None) -> str:
  """The route table of every registered model component (abstract shapes, no allocation)."""
  from kimi_vl_jax.models.abstract import abstract_components
  comps = abstract_components(model_cfg)
  if not comps:
    return 'no model components are registered in kimi_vl_jax.models.abstract'
  out = []
  for name, (variables, _) in comps.items():
    params = variables['params'] if isinstance(variables, Mapping) and 'params' in variables else variables
    out.append(f'== {name}')
    out.append(format_table(route_params(params, trainable)))
  return '\n'.join(out)


def main(argv):
  from absl import flags
  del argv
  config = flags.FLAGS.config
  if config is None:
    raise SystemExit('--config=experiments/<name>.py is required')
  trainable = config.optim.get('trainable', None) if 'optim' in config else None
  print(routes_report(config.model, trainable or None))
  return 0


if __name__ == '__main__':
  from absl import app
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Experiment file (experiments/x.py[:arg]).')
  app.run(main)
