"""What every model reads from a batch besides its features: the label, the weight and the
identity of each row's item. One definition, used by every model and method."""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from rec_models.spec import FIRST_INDEX, FeatureSpec

Batch = Mapping[str, torch.Tensor]


def label_and_weight(spec: FeatureSpec, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(label [B], weight [B] or None when the spec declares no weight column)."""
    label = batch[spec.label.name]
    weight = batch[spec.weight.name] if spec.weight is not None else None
    return label, weight


def item_ids(spec: FeatureSpec, batch: Batch) -> torch.Tensor:
    """[B] item identity of each row for in-batch candidates: the item key's index; a row
    whose key is padding or out-of-vocabulary gets an id of its own (-1 - row), since such
    rows may be different items."""
    ids = batch[spec.keys.item].long()
    rows = torch.arange(ids.shape[0], device=ids.device)
    return torch.where(ids >= FIRST_INDEX, ids, -1 - rows)
