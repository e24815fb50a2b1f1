"""Optimizers: Muon (Moonlight) + AdamW routing, schedules, ZeRO-1 state sharding.

Public entry: ``build_optimizer(optim_cfg, params, mesh=None, trainable=None)``. Names are
resolved lazily so that ``python -m kimi_vl_jax.optim.routes`` runs its module cleanly.
"""
import importlib

_EXPORTS = {
    'MuonAdamWState': 'optimizer', 'Optimizer': 'optimizer', 'build_optimizer': 'optimizer',
    'optimizer_metrics': 'optimizer', 'plan_optimizer': 'optimizer',
    'ROUTES': 'routes', 'Route': 'routes', 'route_params': 'routes',
    'make_schedule': 'schedule',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
