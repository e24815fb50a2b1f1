"""Test-wide set-up: 8 simulated CPU devices, so sharding tests see a real mesh.

`make test` already exports this flag; setting it here too keeps a bare ``pytest tests/x.py``
equivalent. It must happen before jax creates its CPU backend (conftest runs first).
"""
import os

_FLAG = '--xla_force_host_platform_device_count'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {_FLAG}=8').strip()
