"""Configuration: YAML layers (base + dataset + method + profile + files + overrides).

OmegaConf merges the layers and parses ``--set a.b=value`` overrides; pydantic validates
the result, so a misspelt key or a bad value is an error that names its dotted path.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rec_models.errors import BadInputError, ConfigError, InputNotFoundError, UserError  # noqa: F401 (re-exported)
from rec_models.spec import FeatureSpec
from rec_models.state_files import is_uri  # noqa: F401 (etl and orchestration take it from the config)

CONF_DIR = Path(os.environ.get("DTT_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))

BACKENDS = ("local", "torch_distributor", "horovod")
LOADERS = ("arrow", "petastorm")   # petastorm: only in an env like the petastorm lane (pyspark 3.5)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# run.name / run.version become folder names under run.output_dir: no '/', no '..', not absolute
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def local_path_of(value: str, key: str) -> str:
    """A ``file:`` URI (``file:/p``, ``file:///p``, ``file://localhost/p``) as the local path
    ``p`` it names, so that the code's plain-path uses (the spec file, run folders) and the
    tables agree on the folder; any other value unchanged."""
    if not value.lower().startswith("file:"):
        return value
    uri = urllib.parse.urlsplit(value)
    if uri.netloc not in ("", "localhost") or not uri.path.startswith("/") or uri.query or uri.fragment:
        raise ValueError(f"{key}={value!r} is not an absolute local file URI: write file:/abs/path or "
                         "file:///abs/path (or a plain path)")
    return urllib.parse.unquote(uri.path)


class RunConf(_Section):
    name: str = "pfd_student"
    version: str = "v1"
    seed: int = 42
    output_dir: str = "runs"

    @field_validator("output_dir")
    @classmethod
    def _local_uri(cls, value: str) -> str:
        return local_path_of(value, "run.output_dir")

    @field_validator("name", "version")
    @classmethod
    def _safe_slug(cls, value: str, info) -> str:
        if not SLUG.fullmatch(value) or ".." in value:
            raise ValueError(f"run.{info.field_name}={value!r} is not a safe folder name: use letters, digits, "
                             f"'.', '_' and '-', starting with a letter or digit, without '..' or '/'")
        return value


class TablesConf(_Section):
    user_features: str = "user_features"
    item_features: str = "item_features"
    samples: str = "samples"
    user_embeddings: str = "user_embeddings"
    item_embeddings: str = "item_embeddings"
    metrics: str = "metrics"
    model_versions: str = "model_versions"   # the committed user/item embedding pair of each model version

    @field_validator("*")
    @classmethod
    def _local_uri(cls, value: str, info) -> str:
        return local_path_of(value, f"warehouse.tables.{info.field_name}")


# a catalog or schema name: one SQL identifier, used unquoted in three-part table names
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class WarehouseConf(_Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    root: str = "warehouse"
    writer: Literal["auto", "spark", "delta_rs"] = "auto"
    tables: TablesConf = TablesConf()
    # Catalog tables (etl/catalog.py): every table written is also registered as
    # <catalog>.<schema>.<table> (Unity Catalog on Databricks; locally catalog null: Spark's
    # session catalog, <schema>.<table>). Needs a session with native Delta; schema null: none.
    catalog: Optional[str] = None
    schema_name: Optional[str] = Field("recsys", alias="schema")   # 'schema' would shadow BaseModel's

    @field_validator("root")
    @classmethod
    def _local_uri(cls, value: str) -> str:
        return local_path_of(value, "warehouse.root")

    @field_validator("catalog", "schema_name")
    @classmethod
    def _identifier(cls, value: Optional[str], info) -> Optional[str]:
        if value is not None and not IDENTIFIER.fullmatch(value):
            key = "schema" if info.field_name == "schema_name" else info.field_name
            raise ValueError(f"warehouse.{key}={value!r} is not a plain SQL identifier "
                             "(letters, digits and '_', not starting with a digit)")
        return value

    @model_validator(mode="after")
    def _catalog_needs_schema(self) -> "WarehouseConf":
        if self.catalog is not None and self.schema_name is None:
            raise ValueError(f"warehouse.catalog={self.catalog!r} needs warehouse.schema as well")
        return self

    def table_name(self, table: str) -> Optional[str]:
        """``catalog.schema.name`` (or ``schema.name``) of a table; None without a schema."""
        if self.schema_name is None:
            return None
        parts = [self.catalog, self.schema_name, getattr(self.tables, table)]
        return ".".join(p for p in parts if p)

    def uri(self, table: str) -> str:
        name = getattr(self.tables, table)
        if is_uri(name) or name.startswith("/"):
            return name
        return f"{self._root()}/{name}"

    @property
    def spec_path(self) -> str:
        """The resolved spec beside the tables (a URI where the root is one)."""
        return f"{self._root()}/feature_spec.json"

    def _root(self) -> str:
        return (self.root if is_uri(self.root) else os.path.abspath(self.root)).rstrip("/")


class SparkConf(_Section):
    master: Optional[str] = "local[2]"
    app_name: str = "distill-two-tower"
    conf: dict[str, Any] = Field(default_factory=dict)
    # a session this process builds gets Delta (jars of the pinned delta-spark from Maven,
    # SQL extension, catalog: etl/spark.py); conf/profile/local.yaml turns it on
    delta: bool = False


class SyntheticConf(_Section):
    n_users: int = Field(2000, ge=10)
    n_items: int = Field(1000, ge=10)
    n_events: int = Field(200_000, ge=100)
    n_categories: int = Field(20, ge=2)
    n_tags: int = Field(50, ge=2)
    latent_dim: int = Field(8, ge=1)
    days: float = Field(30.0, gt=0)
    partitions: int = Field(8, ge=1)
    seed: int = 7


class TableSource(_Section):
    path: str
    # recbole: RecBole atomic files; movielens_100k / movielens_1m: GroupLens' own files
    # (u.data, u.user, u.item / ratings.dat, users.dat, movies.dat), see etl/movielens.py
    format: Literal["parquet", "csv", "delta", "recbole", "movielens_100k", "movielens_1m"] = "parquet"
    columns: dict[str, str] = Field(default_factory=dict)   # canonical name -> source column
    options: dict[str, Any] = Field(default_factory=dict)  # reader options (csv sep, header...)
    casts: dict[str, str] = Field(default_factory=dict)    # column -> Spark type, after mapping


class LabelFrom(_Section):
    """A binary label from an explicit-feedback column: ``column >= positive_min``."""
    column: str = "rating"
    positive_min: float = 4.0
    drop_values: list[float] = Field(default_factory=list)  # events dropped first (e.g. neutral 3s)


class SourceConf(_Section):
    type: Literal["synthetic", "tables"] = "synthetic"
    synthetic: SyntheticConf = SyntheticConf()
    events: Optional[TableSource] = None
    users: Optional[TableSource] = None
    items: Optional[TableSource] = None
    implicit: bool = False        # no label column: events are positives, negatives sampled
    label_from: Optional[LabelFrom] = None  # derive the label from a rating column

    @model_validator(mode="after")
    def _tables_given(self) -> "SourceConf":
        if self.type == "tables" and self.events is None:
            raise ValueError("data.source.type is 'tables' but data.source.events is not set")
        if self.implicit and self.label_from is not None:
            raise ValueError("data.source.implicit and data.source.label_from exclude each other")
        return self


class SplitConf(_Section):
    # global: one cut over all events; per_user: each user's own last events; random: a
    # seeded random split that needs no time (data without a time column) (etl/splits.py)
    scheme: Literal["global", "per_user", "random"] = "global"
    valid_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    # scheme random only: 'global' draws every event's split on its own; 'per_user' holds
    # out a random test_fraction / valid_fraction of each user's own events
    random_by: Literal["global", "per_user"] = "global"
    seed: int = 13   # scheme random only: the hash seed of the draw

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitConf":
        if self.valid_fraction + self.test_fraction > 0.9 + 1e-9:
            raise ValueError("valid_fraction + test_fraction leaves less than 10% for training")
        if self.random_by != "global" and self.scheme != "random":
            raise ValueError(f"data.split.random_by={self.random_by} needs data.split.scheme=random "
                             f"(the scheme is {self.scheme})")
        return self


class NegativeConf(_Section):
    per_positive: int = Field(4, ge=1)
    seed: int = 11


class DataConf(_Section):
    name: str = "synthetic"
    source: SourceConf = SourceConf()
    split: SplitConf = SplitConf()
    negatives: NegativeConf = NegativeConf()
    history_lookback: int = Field(100, ge=1)  # events scanned back for a history sequence
    # events whose user or item is missing from the users / items table: fail, or give them
    # the out-of-vocabulary features
    unknown_ids: Literal["error", "oov"] = "error"
    # inf / -inf / NaN in a numeric feature, rating or dwell column: fail naming table,
    # column and count, or treat them as missing (imputed like nulls, counted in the report)
    non_finite: Literal["error", "missing"] = "error"
    # events repeated on (user, item, timestamp): drop the repeats, keep them, or fail
    duplicates: Literal["drop", "keep", "error"] = "drop"
    feature_spec: FeatureSpec


class ModelConf(_Section):
    embedding_dim: int = Field(16, ge=1)
    tower_dims: list[int] = Field(default_factory=lambda: [128, 64])
    output_dim: int = Field(32, ge=1)
    teacher_dims: list[int] = Field(default_factory=lambda: [256, 128, 64])
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainConf(_Section):
    backend: str = "local"
    loader: str = "arrow"
    num_processes: int = Field(2, ge=1)
    local_mode: bool = True
    use_gpu: bool = False
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(65536, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    shuffle_buffer_rows: int = Field(200_000, ge=1)
    prefetch_batches: int = Field(4, ge=0)
    # train.loader=petastorm: the converter's cache (default: <run dir>/petastorm_cache; on a
    # cluster, a folder every executor sees, e.g. file:/dbfs/...) and reader threads per process
    petastorm_cache_dir: Optional[str] = None
    petastorm_workers: int = Field(2, ge=1)
    num_threads: int = Field(0, ge=0)   # torch intra-op threads per process; 0 = leave default
    log_every: int = Field(100, ge=1)
    early_stopping_patience: int = Field(0, ge=0)  # epochs without valid AUC gain; 0 = off
    # keep the epoch of best validation (eval.select_k; the teacher's AUC for teachers), not the last
    restore_best_epoch: bool = True
    # never: every run trains from scratch; auto: continue the last unfinished run of this
    # run.name/version (same conf and spec) from its last complete epoch (run_state.json)
    resume: Literal["never", "auto"] = "never"
    # none: serve the model of the selected epoch, trained on train only. train_valid: then
    # train it again from its initial weights on train + valid for the selected number of
    # epochs and serve that one (valid's clicks are the ones nearest to test; the refit ALS
    # and BPR of orchestration.baselines see them too). Doubles training time at most.
    refit: Literal["none", "train_valid"] = "none"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown train.backend '{value}'; known: {', '.join(BACKENDS)}")
        return value

    @field_validator("loader")
    @classmethod
    def _known_loader(cls, value: str) -> str:
        if value not in LOADERS:
            raise ValueError(f"unknown train.loader '{value}'; known: {', '.join(LOADERS)}")
        return value


class DistillConf(_Section):
    method: str = "pfd"
    params: dict[str, Any] = Field(default_factory=dict)            # the method's own, validated by it
    teachers: dict[str, str] = Field(default_factory=dict)          # teacher name -> trained checkpoint
    teacher_params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # teacher name -> its params
    alpha: float = Field(0.5, ge=0)          # weight of the distillation loss after warm-up
    warmup_steps: int = Field(200, ge=0)     # linear warm-up of alpha (PFD: teacher first)
    temperature: float = Field(1.0, gt=0)
    teacher_checkpoint: Optional[str] = None  # a trained teacher (frozen) instead of joint training
    train_baseline: bool = True               # also train the student without distillation
    # train.* for that undistilled student, where its own validation-chosen settings differ
    # from the distilled one's (conf/dataset/synthetic.yaml: PFD at lr 1e-3, DSSM at 3e-3)
    baseline_train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from rec_models.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown distill.method '{value}'; known: {', '.join(sorted(METHODS))}")
        return value


class StudentConf(_Section):
    """How a dual-tower student is trained (rec_models/objectives.py): ``pointwise`` BCE on
    impressions; ``sampled_softmax`` over the batch's items with the logQ correction (Yi et
    al., RecSys 2019); ``mixed``: those plus ``corpus_negatives`` items drawn uniformly from
    the item table (Yang et al., WWW 2020). Both softmax objectives keep a calibrated
    impression score (a BCE that fits only the score's scale and bias)."""
    # docs/results.md 5.4: both softmax objectives retrieve 2x better than pointwise; mixed
    # scores higher on valid Recall@50 on both data sets, so it is the default
    objective: Literal["pointwise", "sampled_softmax", "mixed"] = "mixed"
    temperature: float = Field(0.05, gt=0)         # tau over unit vectors
    logq_correction: bool = True
    corpus_negatives: int = Field(256, ge=1)       # mixed only: uniform item draws per step
    calibration_weight: float = Field(1.0, ge=0)     # moves only the score's scale and bias
    # softmax objectives: every logged impression is also a positive of this weight, beside
    # its click (or soft label), so the towers learn who is shown what as well as what is
    # clicked; 0 keeps clicks only. Needs logged impressions (not data.source.implicit)
    impression_weight: float = Field(0.0, ge=0)


class EvalConf(_Section):
    k: list[int] = Field(default_factory=lambda: [10, 50, 100])
    # epochs of a student are selected by valid Recall@select_k over the whole catalogue
    # (training clicks excluded); teachers (no towers) by valid AUC
    select_k: int = Field(50, ge=1)
    valid_users: int = Field(20_000, ge=1)   # users sampled for that valid retrieval (memory bound)
    user_batch_size: int = Field(4096, ge=1)
    item_chunk_size: int = Field(262_144, ge=1)
    # most popular, ALS and BPR (orchestration.baselines) in run_method's metrics
    baselines: bool = True

    @field_validator("k")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        return check_ks(value)


def parse_params(params_cls: type[BaseModel], raw: Optional[Mapping], method: str) -> BaseModel:
    """Validate a method's ``distill.params`` (or a teacher's ``teacher_params``) with its
    pydantic model: the one validation path of every method, so an unknown key or a bad
    value is a :class:`ConfigError` naming ``distill.params.<key>`` and the method."""
    try:
        return params_cls.model_validate(dict(raw or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"distill.params.{where}: {msg}")
        raise ConfigError(f"invalid params of method '{method}':\n  " + "\n  ".join(problems)) from None


def check_ks(ks) -> list[int]:
    """The cut-offs of Recall@K / NDCG@K / coverage@K, sorted and distinct; each K >= 1."""
    bad = [k for k in ks if int(k) <= 0]
    if not len(ks) or bad:
        raise ValueError(f"eval.k needs at least one K and every K >= 1, got {list(ks)}")
    return sorted({int(k) for k in ks})


class TrackingConf(_Section):
    """MLflow (orchestration/tracking.py): every training job logs a run; the student is
    logged as a pyfunc model and registered."""
    # auto: log where mlflow is installed (the local extra; Databricks ML runtimes ship it),
    # else a warning; true: a job without mlflow fails before any work; false: no tracking
    enabled: bool | Literal["auto"] = "auto"
    # null: sqlite:///<run.output_dir>/mlflow.db (no server); "databricks": the workspace's
    uri: Optional[str] = None
    registry_uri: Optional[str] = None        # null: the tracking store; "databricks-uc": Unity Catalog
    experiment: str = "distill_two_tower"      # on Databricks a workspace path, e.g. /Shared/distill_two_tower
    register_model: bool = True
    # null: run.name, or <warehouse.catalog>.<warehouse.schema>.<run.name> with a catalog (Unity Catalog)
    registered_model: Optional[str] = None


class Config(_Section):
    run: RunConf = RunConf()
    warehouse: WarehouseConf = WarehouseConf()
    spark: SparkConf = SparkConf()
    data: DataConf
    model: ModelConf = ModelConf()
    train: TrainConf = TrainConf()
    distill: DistillConf = DistillConf()
    student: StudentConf = StudentConf()
    eval: EvalConf = EvalConf()
    tracking: TrackingConf = TrackingConf()
    profile: str = "local"

    @model_validator(mode="after")
    def _impressions_to_weigh(self) -> "Config":
        if self.student.impression_weight and self.data.source.implicit:
            raise ValueError("student.impression_weight needs logged impressions: with data.source.implicit "
                             "the non-clicked rows are sampled negatives, never shown to the user")
        if self.student.impression_weight and self.student.objective == "pointwise":
            raise ValueError("student.impression_weight weighs the softmax objectives' positives; "
                             "student.objective=pointwise has none")
        return self

    @model_validator(mode="after")
    def _baseline_train_is_a_train_section(self) -> "Config":
        try:
            self.undistilled_train()
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"distill.baseline_train (train.* of the undistilled student): {problems}") from None
        return self

    def undistilled_train(self) -> TrainConf:
        """``train`` with ``distill.baseline_train`` over it: how the undistilled student trains."""
        if not self.distill.baseline_train:
            return self.train
        return TrainConf.model_validate({**self.train.model_dump(), **self.distill.baseline_train})

    @property
    def spec(self) -> FeatureSpec:
        return self.data.feature_spec


def _layer(path: Path, what: str):
    if not path.exists():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.exists() else []
        raise ConfigError(f"no {what} conf '{path.stem}' at {path}; available: {', '.join(choices) or 'none'}")
    try:
        layer = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())   # one line: YAML's messages span several
        raise ConfigError(f"cannot read {what} conf {path}: {detail}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{what} conf {path} is not a mapping of keys to values (its top level is a "
                          f"{type(layer).__name__})")
    return layer


def _layer_path(conf_dir: Path, kind: str, name: str) -> Path:
    """conf/<kind>/<name>.yaml; a dataset may also be given as the path of its YAML file
    (``--dataset path/to/mine.yaml``)."""
    if kind == "dataset" and (name.endswith((".yaml", ".yml")) or os.sep in name or "/" in name):
        return Path(name)
    return conf_dir / kind / f"{name}.yaml"


def load_config(
    dataset: Optional[str] = None,
    method: Optional[str] = None,
    profile: Optional[str] = None,
    files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    conf_dir: Path | str = CONF_DIR,
) -> Config:
    """Merge base.yaml, dataset/, method/, the dataset's ``methods.<method>`` section,
    profile/, extra files, then ``key=value`` overrides.

    The base names the default dataset, method and profile (``defaults``).
    """
    conf_dir = Path(conf_dir)
    base = _layer(conf_dir / "base.yaml", "base")
    defaults = base.pop("defaults", {}) or {}
    chosen = {
        "dataset": dataset or defaults.get("dataset", "synthetic"),
        "method": method or defaults.get("method", "pfd"),
        "profile": profile or defaults.get("profile", "local"),
    }
    dataset_layer, method_layer, profile_layer = (_layer(_layer_path(conf_dir, kind, name), kind)
                                                  for kind, name in chosen.items())
    # a data set's settings for one method, chosen on its validation split: over the method's
    # own conf, under the profile, --conf files and --set overrides
    for_methods = dataset_layer.pop("methods", None)
    if for_methods is None:
        for_methods = OmegaConf.create({})
    if not isinstance(for_methods, DictConfig):
        raise ConfigError(f"dataset conf '{chosen['dataset']}': 'methods' maps method names to their settings, "
                          f"not {type(for_methods).__name__}")
    unknown = sorted(set(for_methods) - {p.stem for p in (conf_dir / "method").glob("*.yaml")})
    if unknown:
        raise ConfigError(f"dataset conf '{chosen['dataset']}': methods.{unknown[0]} names no conf/method/*.yaml")
    for_method = for_methods.get(chosen["method"]) or {}
    layers = [base, dataset_layer, method_layer, for_method, profile_layer]
    layers += [_layer(Path(f), "extra") for f in files]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        if item.split("=", 1)[0].strip() == "profile":
            raise ConfigError("the profile is chosen with --profile NAME, not an override")
    dotlists, by_name = [], []
    for item in overrides:   # one at a time, so that the error names the override
        key, value = item.split("=", 1)
        try:
            if _NAMED_KEY.search(key):   # a list element by its name: the value parsed as any override's
                by_name.append((item, OmegaConf.from_dotlist([f"value={value}"])["value"]))
            else:
                dotlists.append(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"bad override '{item}' (--set): {detail}") from None
    try:
        merged = OmegaConf.merge(*layers, *dotlists, {"profile": chosen["profile"]})
        for item, value in by_name:   # after the plain ones: the list they address is complete
            OmegaConf.update(merged, _indexed_key(merged, item, value), value, merge=True)
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"cannot merge the conf layers and overrides: {detail}") from None
    except TypeError as exc:   # OmegaConf's own for a key path through a list, e.g. features.4.max_len
        raise ConfigError(f"cannot merge the conf layers and overrides {list(overrides)}: {exc}; an override "
                          "cannot index into a list (such as data.feature_spec.features) by position: name "
                          "the element, e.g. data.feature_spec.features[hist_item_ids].max_len=50, or give "
                          "the whole changed list in an extra conf file (--conf FILE)") from None
    return validate_config(raw)


_NAMED_KEY = re.compile(r"\[([^\[\]=]+)\]")


def _indexed_key(merged, item: str, value) -> str:
    """``a.list[name].key`` of an override as OmegaConf's ``a.list.<index>.key``: the index
    of the list element whose ``name`` is ``name`` (the notation of validation errors).
    ``a.list[name]={...}`` with a name the list lacks appends an element of that name."""
    key = item.split("=", 1)[0].strip()
    parts, node, start = [], merged, 0
    for m in _NAMED_KEY.finditer(key):
        path = [p for p in key[start:m.start()].split(".") if p]
        node = OmegaConf.select(node, ".".join(path)) if path else node
        where = ".".join([*parts, *path])
        if not OmegaConf.is_list(node):
            raise ConfigError(f"bad override '{item}' (--set): {where} is not a list, so [{m.group(1)}] names nothing")
        names = [e.get("name") if OmegaConf.is_dict(e) else None for e in node]
        if m.group(1) not in names and m.end() == len(key) and OmegaConf.is_dict(value):
            node.append({"name": m.group(1)})   # a new element: the mapping is merged into it
            names.append(m.group(1))
        if m.group(1) not in names:
            raise ConfigError(f"bad override '{item}' (--set): {where} has no element named '{m.group(1)}' "
                              f"(a mapping value, {key}={{...}}, would add one); "
                              f"its names: {', '.join(str(n) for n in names if n is not None)}")
        index = names.index(m.group(1))
        parts += [*path, str(index)]
        node, start = node[index], m.end()
    rest = [p for p in key[start:].split(".") if p]
    return ".".join([*parts, *rest])


def validate_config(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = _named_location(raw, err["loc"]) or "(top)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{where}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def _named_location(raw: Any, loc: Sequence) -> str:
    """The dotted path of a validation error, with a feature's name instead of its list
    index: ``data.feature_spec.features[clicks].role``, not ``...features.5.role``."""
    parts, node = [], raw
    for p in loc:
        if isinstance(p, int) and parts and parts[-1] == "features" and isinstance(node, list) \
                and p < len(node) and isinstance(node[p], Mapping) and node[p].get("name"):
            parts[-1] = f"features[{node[p]['name']}]"
        else:
            parts.append(str(p))
        if isinstance(node, Mapping):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            node = None
    return ".".join(parts)
