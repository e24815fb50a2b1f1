"""SwiGLU MLP: ``down(silu(gate(x)) * up(x))``, no biases (the dense layers and shared experts)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """SwiGLU with kernels gate/up [embed, mlp] and down [mlp, embed].

  ``intermediate_size``: width of the hidden layer; ``dtype`` compute, ``param_dtype`` storage.
  """
  intermediate_size: int
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    init = nn.initializers.normal(self.initializer_range)
    dense = lambda feat, axes, name: nn.Dense(  # noqa: E731
        feat, use_bias=False, dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes), name=name)
    gate_btf = dense(self.intermediate_size, ('embed', 'mlp'), 'gate_proj')(x_btd)
    up_btf = dense(self.intermediate_size, ('embed', 'mlp'), 'up_proj')(x_btd)
    h_btf = nn.with_logical_constraint(nn.silu(gate_btf) * up_btf, ('batch', 'length', 'act_mlp'))
    return dense(x_btd.shape[-1], ('mlp', 'embed'), 'down_proj')(h_btf)
