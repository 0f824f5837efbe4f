"""Field embeddings: every feature field of the FeatureSpec becomes one token of size ``dim``.

A feature field's embedding is a token (docs/architecture.md): the text-matching methods of the
survey (DSSM, PFD, ColBERT, VIRT, ...) read a side as a sequence of tokens; here a user
is the tokens of its user fields and an item the tokens of its item fields.

Per field kind (encoded layout in ``rec_models/spec.py``):

- categorical, bucketised numeric:  e_f = E_f[x]                       (row 0 = padding)
- multi_categorical:                e_f = sum_j m_j E_f[x_j] / max(1, sum_j m_j),  m_j = [x_j != 0]
- sequence:                         as multi_categorical, over the table of ``vocab_of``
                                    (history item ids share the item-id embedding)
- numeric (float):                  e_f = x * w_f + b_f                 (w_f, b_f in R^dim)

One table per *owner* (``spec.embedding_table_owner``): a sequence and the id feature it
holds look up the same ``nn.Embedding``, created once even when the owner itself is not
among this module's fields. ``shared=`` reuses another module's tables and numeric
tokens (PFD: teacher and student share the public embeddings).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from rec_models.spec import Feature, FeatureSpec, Kind, Role

INIT_STD = 0.05  # small init: pooled means and MLP inputs start near zero, Adam scales up


class NumericToken(nn.Module):
    """A float feature as a token: e = x * w + b (w, b learned vectors of size dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * INIT_STD)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # missing values after standardisation are the mean: map NaN to 0 rather than poison the batch
        x = torch.nan_to_num(x.to(self.weight.dtype), nan=0.0)
        return x.unsqueeze(-1) * self.weight + self.bias


def module_key(name: str) -> str:
    """Key of a feature's module in the ModuleDicts (and so in state_dict keys): the name
    itself, or ``name + "__"`` where the name is an nn.Module attribute ("type", "items")."""
    return name + "__" if hasattr(_PROBE, name) else name


_PROBE = nn.ModuleDict()


def _new_table(rows: int, width: int) -> nn.Embedding:
    table = nn.Embedding(rows, width, padding_idx=0)
    nn.init.normal_(table.weight, std=INIT_STD)
    with torch.no_grad():
        table.weight[0].zero_()  # padding row: contributes nothing, receives no gradient
    return table


class FieldEmbeddings(nn.Module):
    """Tokens [B, F, dim] for the fields ``features`` (in that order) of a resolved spec."""

    def __init__(
        self,
        spec: FeatureSpec,
        features: Sequence[Feature | str],
        dim: int,
        shared: Optional["FieldEmbeddings"] = None,
    ):
        super().__init__()
        if not spec.resolved:
            raise ValueError(
                "FieldEmbeddings needs a resolved FeatureSpec (vocabulary sizes, bucket boundaries): "
                "load the feature_spec.json written by ETL (jobs/build_features.py)")
        if shared is not None and shared.dim != dim:
            raise ValueError(f"shared FieldEmbeddings has dim {shared.dim}, this one {dim}")
        self.dim = int(dim)
        # take the spec's (resolved) entry even if the caller passed an unresolved Feature
        feats = tuple(spec.get(f if isinstance(f, str) else f.name) for f in features)
        names = [f.name for f in feats]
        if len(set(names)) != len(names):
            raise ValueError(f"FieldEmbeddings: a field is listed twice in {names}")
        for f in feats:
            if f.role in (Role.label, Role.weight):
                raise ValueError(f"FieldEmbeddings: '{f.name}' is a {f.role.value}, not an input")
            if "." in f.name:  # module-dict keys; also keeps state_dict keys parseable
                raise ValueError(f"FieldEmbeddings: feature name '{f.name}' may not contain '.'")
        self.features = feats
        self._index = {n: i for i, n in enumerate(names)}

        # keys: module_key(feature name)
        self.tables = nn.ModuleDict()       # table owner -> nn.Embedding (one per owner)
        self.projections = nn.ModuleDict()  # table owner -> Linear(width, dim), only if widths differ
        self.numeric = nn.ModuleDict()      # numeric feature -> NumericToken
        self._owner: dict[str, str] = {}    # categorical field -> key of its table
        self._key_to_owner: dict[str, str] = {}
        for f in feats:
            if f.is_categorical:
                owner = spec.embedding_table_owner(f)
                key = self._owner[f.name] = module_key(owner.name)
                self._key_to_owner[key] = owner.name
                if key in self.tables:
                    continue
                if shared is not None and key in shared.tables:
                    # the very same module objects: one set of parameters, trained by both users
                    self.tables[key] = shared.tables[key]
                    if key in shared.projections:
                        self.projections[key] = shared.projections[key]
                    continue
                rows = self._table_size(spec, owner)
                width = owner.embedding_dim or self.dim
                self.tables[key] = _new_table(rows, width)
                if width != self.dim:  # a per-feature embedding_dim: project to the token size
                    self.projections[key] = nn.Linear(width, self.dim, bias=False)
            elif f.kind == Kind.numeric:
                key = module_key(f.name)
                if shared is not None and key in shared.numeric:
                    self.numeric[key] = shared.numeric[key]
                else:
                    self.numeric[key] = NumericToken(self.dim)
            else:
                raise ValueError(f"FieldEmbeddings: cannot embed '{f.name}' of kind {f.kind.value}")

    @staticmethod
    def _table_size(spec: FeatureSpec, owner: Feature) -> int:
        try:
            rows = owner.table_size
        except ValueError as exc:
            raise ValueError(f"FieldEmbeddings: {exc} (the spec says resolved, but it lacks this size)") from None
        if rows < 2:
            raise ValueError(f"feature '{owner.name}': table_size {rows} < 2 (needs padding and OOV rows)")
        return rows

    # ---- introspection -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Input columns this module reads (one per field, in token order)."""
        return [f.name for f in self.features]

    @property
    def table_owners(self) -> list[str]:
        """Features whose embedding tables this module holds (its own or shared)."""
        return [self._key_to_owner[k] for k in self.tables.keys()]

    def table(self, owner: str) -> nn.Embedding:
        """The embedding table of feature ``owner`` (e.g. ``table("item_id")``)."""
        return self.tables[module_key(owner)]

    def positions(self, fields: Sequence[str]) -> list[int]:
        """Token positions of ``fields`` in ``tokens(batch)``."""
        missing = [n for n in fields if n not in self._index]
        if missing:
            raise KeyError(f"FieldEmbeddings has no field(s) {missing}; it holds {self.names}")
        return [self._index[n] for n in fields]

    # ---- lookups -----------------------------------------------------------------------
    def _lookup(self, owner: str, idx: torch.Tensor) -> torch.Tensor:
        out = self.tables[owner](idx)
        if owner in self.projections:
            out = self.projections[owner](out)
        return out

    def field_token(self, f: Feature, x: torch.Tensor) -> torch.Tensor:
        """[B, dim] token of one field from its encoded column ``x``."""
        if f.kind == Kind.numeric and not f.is_categorical:
            return self.numeric[module_key(f.name)](x)
        owner = self._owner[f.name]
        if not f.is_list:
            return self._lookup(owner, x)
        # masked mean over the non-padding positions; an all-padding row gives the zero vector
        # (explicit mask: do not rely on row 0 staying zero after a state_dict load)
        emb = self._lookup(owner, x)                          # [B, L, dim]
        mask = (x != 0).unsqueeze(-1).to(emb.dtype)           # [B, L, 1]
        return (emb * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def tokens(self, batch: Mapping[str, torch.Tensor], fields: Optional[Sequence[str]] = None) -> torch.Tensor:
        """[B, F, dim]: one token per field, in the order of ``features`` (or of ``fields``).

        Only the columns of the requested fields are read from ``batch``.
        """
        feats = self.features if fields is None else [self.features[i] for i in self.positions(fields)]
        if not feats:
            raise ValueError("FieldEmbeddings.tokens: no fields requested")
        missing = [f.name for f in feats if f.name not in batch]
        if missing:
            raise KeyError(f"batch lacks column(s) {missing} (has {sorted(batch)})")
        return torch.stack([self.field_token(f, batch[f.name]) for f in feats], dim=1)

    def flat(self, batch: Mapping[str, torch.Tensor], fields: Optional[Sequence[str]] = None) -> torch.Tensor:
        """[B, F * dim]: the tokens concatenated (input of an MLP tower)."""
        return self.tokens(batch, fields).flatten(1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.tokens(batch)
