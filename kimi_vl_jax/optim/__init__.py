"""Optimizers: Muon (Moonlight) + AdamW routing, schedules, ZeRO-1 state sharding."""
from kimi_vl_jax.optim.optimizer import (MuonAdamWState, Optimizer, build_optimizer,
                                         optimizer_metrics, plan_optimizer)
from kimi_vl_jax.optim.routes import ROUTES, Route, route_params
from kimi_vl_jax.optim.schedule import make_schedule
