"""The FeatureSpec: one declaration of every column, from ETL to model to export.

Declared in conf YAML (``feature_spec``); ETL fills in what only the data can tell
(vocabulary sizes, normalisation statistics, bucket boundaries) and saves the resolved
spec as JSON beside the tables; models and the embedding job build from that file.

Encoded column layout written by ETL (the loader and models rely on it):

- ``categorical``: int32 index; 0 = padding / missing, 1 = out-of-vocabulary, 2.. = known.
- ``multi_categorical``: array<int32> padded with 0 to ``max_len``.
- ``sequence``: array<int32> of indices in the vocabulary of ``vocab_of``, padded with 0
  to ``max_len``, oldest first; point-in-time (only events strictly before the sample);
  ``history_of``: the user's clicks (default) or all of the user's logged events.
- ``numeric``: float32 (``transform`` standard / log_standard / none) or, with
  ``bucketize``, an int32 bucket index (0 = missing, 1.. = buckets).
- ``label`` / ``weight``: float32.
"""
from __future__ import annotations

import json
from enum import Enum
from typing import Any, Iterable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rec_models.errors import BadInputError, InputNotFoundError, UserError
from rec_models.state_files import read_bytes, write_bytes_atomic

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_INDEX = 2


class Role(str, Enum):
    user = "user"
    item = "item"
    context = "context"
    privileged = "privileged"
    label = "label"
    weight = "weight"


class Kind(str, Enum):
    categorical = "categorical"
    multi_categorical = "multi_categorical"
    numeric = "numeric"
    sequence = "sequence"
    label = "label"


# Derived privileged statistics the ETL knows how to compute point-in-time.
PRIVILEGED_DERIVATIONS = (
    "user_category_clicks",      # user's clicks in the item's category, past window
    "user_category_ctr",         # smoothed CTR of the user in the item's category
    "user_category_mean_dwell",  # user's mean dwell (log seconds) in the item's category
    "user_item_impressions",     # times the user was shown this item before
    # explicit feedback (e.g. ratings): statistics of ``value_column`` over past events
    "user_group_count",          # user's past events in the item's groups (mean over its groups)
    "user_group_mean",           # user's smoothed past mean value in the item's groups
    "item_mean",                 # the item's smoothed past mean value, over all users
)
# derivations over the item's (possibly multi-valued, ``separator``-joined) ``group_by`` column
GROUP_DERIVATIONS = ("user_category_clicks", "user_category_ctr", "user_category_mean_dwell",
                     "user_group_count", "user_group_mean")
# derivations that read ``value_column`` of the events
VALUE_DERIVATIONS = ("user_group_mean", "item_mean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Feature(_Strict):
    name: str
    role: Role
    kind: Kind
    # where the raw value comes from: an entity table column, or a derivation from events
    source: Literal["users", "items", "events", "derived"] = "events"
    derive: Optional[str] = None
    window_days: Optional[float] = Field(None, gt=0)  # derived statistics: look-back window
    group_by: str = "category"                        # derived user x group statistics: item column
    value_column: Optional[str] = None                # derived mean statistics: the events column
    transform: Literal["none", "standard", "log_standard", "bucketize"] = "standard"
    num_buckets: int = Field(10, ge=2)
    max_len: int = Field(1, ge=1)
    separator: str = "|"
    vocab_of: Optional[str] = None       # sequences: whose vocabulary (and embedding) they use
    # sequences: the user's clicked items (None: clicks), or every item of the user's logged
    # events (each impression, clicked or not: what the user was shown is known at serving)
    history_of: Optional[Literal["clicks", "events"]] = None
    min_count: int = Field(1, ge=1)
    embedding_dim: Optional[int] = Field(None, ge=1)
    # filled by ETL
    vocab_size: Optional[int] = None
    mean: Optional[float] = None
    std: Optional[float] = None
    boundaries: Optional[tuple[float, ...]] = None

    @model_validator(mode="after")
    def _consistent(self) -> "Feature":
        where = f"feature '{self.name}'"
        if self.role in (Role.label, Role.weight) and self.kind not in (Kind.label, Kind.numeric):
            raise ValueError(f"{where}: role {self.role.value} needs kind 'label' or 'numeric'")
        if self.kind == Kind.label and self.role not in (Role.label, Role.weight):
            raise ValueError(f"{where}: kind 'label' is only for roles label/weight")
        if self.kind == Kind.sequence:
            if not self.vocab_of:
                raise ValueError(f"{where}: a sequence needs 'vocab_of' (the id feature it holds)")
            if self.role not in (Role.user, Role.privileged):
                raise ValueError(f"{where}: a history sequence belongs to role user")
        elif self.history_of is not None:
            raise ValueError(f"{where}: history_of is for sequences (kind 'sequence'), not kind {self.kind.value}")
        if self.source == "derived" and self.derive not in PRIVILEGED_DERIVATIONS:
            raise ValueError(
                f"{where}: unknown derivation {self.derive!r}; known: {', '.join(PRIVILEGED_DERIVATIONS)}")
        if self.derive is not None and self.source != "derived":
            raise ValueError(f"{where}: 'derive' needs source 'derived'")
        if self.source == "derived" and self.role != Role.privileged:
            raise ValueError(f"{where}: derived user x item statistics are privileged only")
        if (self.derive in VALUE_DERIVATIONS) != (self.value_column is not None):
            raise ValueError(f"{where}: 'value_column' is needed by (and only by) derivations "
                             f"{', '.join(VALUE_DERIVATIONS)}")
        return self

    @property
    def group_column(self) -> Optional[str]:
        """The item column a derived statistic groups by (None: not grouped)."""
        return self.group_by if self.derive in GROUP_DERIVATIONS else None

    @property
    def is_categorical(self) -> bool:
        """Encoded as integer indices (embedded by a lookup table)."""
        return self.kind in (Kind.categorical, Kind.multi_categorical, Kind.sequence) or (
            self.kind == Kind.numeric and self.transform == "bucketize")

    @property
    def is_list(self) -> bool:
        return self.kind in (Kind.multi_categorical, Kind.sequence)

    @property
    def table_size(self) -> int:
        """Rows of the embedding table (indices 0..table_size-1)."""
        if self.kind == Kind.numeric and self.transform == "bucketize":
            if self.boundaries is None:
                raise ValueError(f"feature '{self.name}' is not resolved: run ETL first")
            return len(self.boundaries) + 2
        if self.vocab_size is None:
            raise ValueError(f"feature '{self.name}' has no vocab_size: run ETL first")
        return self.vocab_size


class Keys(_Strict):
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"


class FeatureSpec(_Strict):
    keys: Keys = Keys()
    features: tuple[Feature, ...]
    resolved: bool = False
    split_times: Optional[dict[str, int]] = None  # filled by ETL: first timestamp of valid / test
    split: Optional[dict[str, Any]] = None  # filled by ETL: the data.split conf it was built with
    # filled by ETL: the Delta version of each table this spec was built with; readers pin
    # these, so a rebuild that fails half-way never mixes old and new tables
    table_versions: Optional[dict[str, int]] = None

    @field_validator("features")
    @classmethod
    def _unique(cls, features):
        seen = set()
        for f in features:
            if f.name in seen:
                raise ValueError(f"feature '{f.name}' is declared twice")
            seen.add(f.name)
        return features

    @model_validator(mode="after")
    def _shape(self) -> "FeatureSpec":
        labels = [f for f in self.features if f.role == Role.label]
        if len(labels) != 1:
            raise ValueError(f"the spec needs exactly one label feature, found {len(labels)}")
        names = {f.name for f in self.features}
        for f in self.features:
            if f.vocab_of and f.vocab_of not in names:
                raise ValueError(f"feature '{f.name}': vocab_of '{f.vocab_of}' is not a declared feature")
        for key, role in ((self.keys.user, Role.user), (self.keys.item, Role.item)):
            f = self.get(key) if key in names else None
            if f is None or f.role != role or f.kind != Kind.categorical:
                raise ValueError(f"the {role.value} key '{key}' must be a categorical feature of role {role.value}")
        return self

    # ---- lookups -------------------------------------------------------------------------
    def get(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature named '{name}' in the FeatureSpec")

    def by_role(self, *roles: Role | str) -> tuple[Feature, ...]:
        wanted = {Role(r) for r in roles}
        return tuple(f for f in self.features if f.role in wanted)

    @property
    def label(self) -> Feature:
        return self.by_role(Role.label)[0]

    @property
    def weight(self) -> Optional[Feature]:
        w = self.by_role(Role.weight)
        return w[0] if w else None

    @property
    def user_features(self) -> tuple[Feature, ...]:
        return self.by_role(Role.user)

    @property
    def item_features(self) -> tuple[Feature, ...]:
        return self.by_role(Role.item)

    @property
    def privileged_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.by_role(Role.privileged))

    def input_features(self) -> tuple[Feature, ...]:
        """Every model input (all but label and weight)."""
        return tuple(f for f in self.features if f.role not in (Role.label, Role.weight))

    def columns(self, features: Iterable[Feature]) -> list[str]:
        return [f.name for f in features]

    def embedding_table_owner(self, feature: Feature) -> Feature:
        """The feature whose embedding table ``feature`` looks up (sequences share it)."""
        return self.get(feature.vocab_of) if feature.vocab_of else feature

    def assert_public(self, names: Iterable[str], where: str) -> None:
        """Refuse privileged columns where only public ones may go (student towers, serving)."""
        leaked = sorted(set(names) & self.privileged_names)
        if leaked:
            raise PrivilegedLeakError(f"{where} may not use privileged columns: {', '.join(leaked)}")

    # ---- persistence ---------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        return cls.model_validate(json.loads(text))

    def save(self, path: str) -> None:
        """Write atomically (rec_models.state_files): readers never see half a spec. ``path``
        may be a URI (the warehouse root's: ``dbfs:/``, ``s3://``, ...)."""
        write_bytes_atomic(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str) -> "FeatureSpec":
        try:
            text = read_bytes(path).decode()
        except FileNotFoundError:
            raise InputNotFoundError(f"no resolved FeatureSpec at {path}: run jobs/build_features.py first") from None
        try:
            return cls.from_json(text)
        except ValueError as exc:   # JSON syntax or schema: name the file, not only the parser's position
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"{path} is not a valid resolved FeatureSpec ({first}): rerun jobs/build_features.py "
                             "to rewrite it") from None

    def resolve(self, updates: dict[str, dict]) -> "FeatureSpec":
        """A validated copy with ETL's statistics filled in (``updates``: feature -> fields)."""
        unknown = sorted(set(updates) - {f.name for f in self.features})
        if unknown:
            raise KeyError(f"cannot resolve unknown feature(s): {', '.join(unknown)}")
        data = self.model_dump()
        for f in data["features"]:
            f.update(updates.get(f["name"], {}))
        data["resolved"] = True
        return FeatureSpec.model_validate(data)


class PrivilegedLeakError(UserError, ValueError):
    """A privileged column was about to reach a student tower, the embedding job or serving."""
