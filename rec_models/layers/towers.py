"""Towers: a plain multi-layer perceptron, the body of DSSM towers and ranking teachers."""
from __future__ import annotations

from typing import Optional, Sequence, Type

from torch import nn


class MLP(nn.Sequential):
    """h_{l+1} = dropout(act(W_l h_l + b_l)) for each of ``dims``; then y = W_out h + b_out.

    With ``out_dim`` the last layer is linear (no activation: a logit or an embedding that
    is normalised later); without it the output is the last hidden layer.
    """

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int],
        out_dim: Optional[int] = None,
        dropout: float = 0.0,
        activation: Type[nn.Module] = nn.ReLU,
    ):
        layers: list[nn.Module] = []
        width = in_dim
        for d in dims:
            # Dropout(0) too: the state dict's layer indices must not depend on the rate, or a
            # teacher trained with dropout would not load into a model configured without it
            layers += [nn.Linear(width, d), activation(), nn.Dropout(dropout)]
            width = d
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        if not layers:
            layers.append(nn.Identity())
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = width
