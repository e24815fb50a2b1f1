"""Abstract (shape-only) variables of each model component, for describe and sharding.

``abstract_components(model_cfg)`` returns ``{name: (abstract_variables, spec)}`` built
with ``jax.eval_shape`` (no allocation), where ``spec`` says which sub-trees are routed
experts and how many of them are active per token, so describe can count active
parameters. Each model module registers itself here with ``register``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How to count a component's active parameters per token.

  ``routed_expert_key``: a path fragment marking routed-expert weights (stacked on an
  experts axis); they count ``active_fraction`` of their size as active.
  """
  routed_expert_key: str = ''
  active_fraction: float = 1.0


# name -> fn(model_cfg) -> (abstract_variables, ComponentSpec); in model order.
_BUILDERS: dict[str, Callable] = {}


def register(name: str):
  def deco(fn):
    _BUILDERS[name] = fn
    return fn
  return deco


def abstract_components(model_cfg: ml_collections.ConfigDict) -> dict:
  _import_models()
  return {name: fn(model_cfg) for name, fn in _BUILDERS.items()}


def _import_models():
  """Imports the modules that register components (kept lazy: importing jax models is slow)."""
  import importlib
  import pkgutil
  import kimi_vl_jax.models as pkg
  for info in pkgutil.iter_modules(pkg.__path__):
    if info.name != 'abstract':
      importlib.import_module(f'{pkg.__name__}.{info.name}')
