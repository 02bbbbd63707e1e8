"""What tells the model flavours apart, as features that model/transformer.py and config.py ask about.

A flavour is a name for one combination of architectural features. model/transformer.py builds a model from
`ModelConfig.features` and never compares flavour names, so adding a third flavour means adding
its name to `Flavour`, one row to `FEATURES`, a preset in nanotrain/configs/, and (only if it
needs a norm, MLP or position encoding model/transformer.py does not have yet) one new block in model/transformer.py.
Tied embeddings are not a flavour feature: any flavour may set `model.tie_embeddings`.

This module imports neither torch nor the config, so config.py can validate with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Flavour = Literal["llama", "gpt"]  # the allowed values of model.flavour; FEATURES has a row for each


@dataclass(frozen=True)
class FlavourFeatures:
    """The architectural choices one flavour stands for."""

    norm: Literal["layernorm", "rmsnorm"]  # rmsnorm is computed in fp32, as HF Llama does
    mlp: Literal["gelu", "swiglu"]  # down(gelu(up x)) or down(silu(gate x) * up x)
    positions: Literal["learned", "rope"]  # a learned pos_embeddings table, or RoPE on q and k
    bias: bool  # biases on the attention and MLP projections (never on the head)
    grouped_query_attention: bool  # whether model.n_kv_heads may be fewer than model.n_heads


FEATURES: dict[str, FlavourFeatures] = {
    "llama": FlavourFeatures(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False,
                             grouped_query_attention=True),
    "gpt": FlavourFeatures(norm="layernorm", mlp="gelu", positions="learned", bias=True,
                           grouped_query_attention=False),
}
