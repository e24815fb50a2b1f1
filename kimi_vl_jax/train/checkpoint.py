"""Orbax checkpoints: one ``CheckpointManager`` per stage under ``<workdir>/checkpoints/<stage>/``.

Items of a checkpoint step:
- ``state``: the TrainState (StandardSave; restored with target shardings, so a checkpoint
  written on 8 devices restores onto a 4-device mesh);
- ``meta``: JSON (config, stage, step, tokens seen, data position, ``complete`` when the stage's
  last step);
- ``data``: JSON state of the data iterator, when the source has one.

Keep-last-N applies within a stage's directory; a finished stage never gets another save, so its
final checkpoint stays (per-stage finals). Saves are asynchronous. Orbax writes each step into a
temporary directory and renames it only after every item is committed, and ``latest_step``
lists committed steps only, so an interrupted (killed) write is never restored.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints', stage)


class StageCheckpoints:
  """Saves and restores one stage's checkpoints."""

  def __init__(self, workdir: str, stage: str, keep: int = 2, async_save: bool = True):
    self.directory = stage_dir(workdir, stage)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta', 'data'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, data_state: Optional[dict] = None,
           force: bool = True) -> None:
    """Starts an (async) save of ``state`` at ``step``; call ``wait`` before reading it back."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta)))
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(_jsonable(data_state))
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: Optional[int] = None) -> Optional[dict]:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, Optional[dict]]:
    """(state, meta, data_state) at ``step`` (default latest), laid out as ``abstract_state``
    (ShapeDtypeStructs with the target shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no committed checkpoint in {self.directory}')
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    has_data = os.path.isdir(os.path.join(self.directory, str(step), 'data'))
    if has_data:
      items['data'] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out['state'], dict(out['meta']), (dict(out['data']) if has_data else None)

  def restore_raw(self, step: Optional[int] = None) -> dict:
    """The saved state as a nested dict of host numpy arrays (no target structure needed), for
    loading parameters by path into a different model (the next stage)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no committed checkpoint in {self.directory}')
    meta = self.manager.item_metadata(step)['state']
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=None, restore_args=restore_args)))
    return out['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).item()
  return x
