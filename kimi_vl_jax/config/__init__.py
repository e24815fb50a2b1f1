"""Experiment configuration: presets (model dims), the schema, validation."""
from kimi_vl_jax.config.base import base_config
from kimi_vl_jax.config.presets import get_preset, PRESET_NAMES
from kimi_vl_jax.config.validate import ConfigError, validate, resolve_mesh_shape
