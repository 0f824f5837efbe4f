"""Export of a trained student (towers only) for the embedding job and serving.

A bundle is one ``torch.save`` file: {format, class, spec (JSON), model_conf, state_dict,
meta}. It holds the student alone: no teacher module, no privileged parameter, and the
spec inside lists no privileged feature: checked at export, refused otherwise. Loading
uses ``torch.load(weights_only=True)``: the bundle is plain data, never pickled code.
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from rec_models.config import ModelConf
from rec_models.models.dssm import DSSM, CalibratedDSSM
from rec_models.layers.embeddings import module_key
from rec_models.spec import FeatureSpec, PrivilegedLeakError, Role

BUNDLE_FORMAT = 1

# student classes a bundle may name: constructor (spec, model_conf[, params]),
# encode_user / encode_item, and a ``score_kind`` of rec_models.serving.scoring (default "dot")
STUDENT_CLASSES: dict[str, type[nn.Module]] = {"DSSM": DSSM, "CalibratedDSSM": CalibratedDSSM}


def register_student(cls: type[nn.Module]) -> type[nn.Module]:
    """Make another student class exportable."""
    STUDENT_CLASSES[cls.__name__] = cls
    return cls


def _register_builtin() -> None:
    from rec_models.models.colbert import ColBERT
    from rec_models.models.dual_encoder import CalibratedTokenDualEncoder, TokenDualEncoder
    from rec_models.models.inttower import IntTower
    from rec_models.models.mvke import MVKE
    from rec_models.models.youtube_dnn import YouTubeDNN
    from rec_models.distill.trmd import CalibratedTRMDStudent, TRMDStudent

    for cls in (TokenDualEncoder, CalibratedTokenDualEncoder, ColBERT, YouTubeDNN, IntTower, MVKE, TRMDStudent,
                CalibratedTRMDStudent):
        register_student(cls)


def _params(student: nn.Module) -> dict:
    params = getattr(student, "params", None)
    return params.model_dump() if params is not None else {}


def _construct(cls, spec: FeatureSpec, conf: ModelConf, params: dict) -> nn.Module:
    if "params" in inspect.signature(cls).parameters:
        return cls(spec, conf, params=params)
    return cls(spec, conf)


def public_spec(spec: FeatureSpec) -> FeatureSpec:
    """The spec without its privileged features (what serving may know of)."""
    # through a dump, so every other spec field (keys, resolved, ETL's additions) is kept
    data = spec.model_dump()
    data["features"] = [f for f in data["features"] if f["role"] != Role.privileged]
    return FeatureSpec.model_validate(data)


def _json_safe(meta: dict) -> dict:
    def default(o: Any):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"export meta: {type(o).__name__} value {o!r} is not JSON-serialisable")
    return json.loads(json.dumps(meta, default=default))


def _check_public(student: nn.Module, spec: FeatureSpec, state: dict) -> None:
    names = list(student.user_input_names) + list(student.item_input_names)
    spec.assert_public(names, "an exported student")
    privileged = spec.privileged_names | {module_key(n) for n in spec.privileged_names}
    for key in state:
        parts = set(key.split("."))
        leaked = parts & privileged
        if leaked or "teacher" in parts:
            raise PrivilegedLeakError(
                f"an exported student may not hold teacher or privileged parameters: '{key}'")


def export_student(student: nn.Module, spec: FeatureSpec, path: str, meta: dict | None = None) -> str:
    """Write the student bundle atomically (temp file in the same folder + os.replace)."""
    _register_builtin()
    cls = type(student).__name__
    if STUDENT_CLASSES.get(cls) is not type(student):
        raise TypeError(f"cannot export a {cls}: exportable students are {sorted(STUDENT_CLASSES)}")
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    _check_public(student, spec, state)
    bundle = {
        "format": BUNDLE_FORMAT,
        "class": cls,
        "spec": public_spec(spec).to_json(),
        "model_conf": student.model_conf.model_dump(),
        "params": _params(student),
        "score_kind": getattr(student, "score_kind", "dot"),
        "state_dict": state,
        "meta": _json_safe(meta or {}),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".student-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(bundle, fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_student(path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, FeatureSpec, dict]:
    """(student in eval mode, its public spec, meta) from a bundle written by ``export_student``.

    ``path``: a file path, or a binary file object (the embedding job's broadcast bytes).
    """
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise FileNotFoundError(f"no student bundle at {path}: export one first (export_student)")
    bundle = torch.load(path, map_location=map_location, weights_only=True)
    if bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: unknown bundle format {bundle.get('format')!r} (expected {BUNDLE_FORMAT})")
    _register_builtin()
    cls = STUDENT_CLASSES.get(bundle["class"])
    if cls is None:
        raise ValueError(f"{path}: student class {bundle['class']!r} is not registered ({sorted(STUDENT_CLASSES)})")
    spec = FeatureSpec.from_json(bundle["spec"])
    student = _construct(cls, spec, ModelConf(**bundle["model_conf"]), bundle.get("params", {}))
    student.load_state_dict(bundle["state_dict"], strict=True)
    student.eval()
    return student, spec, bundle["meta"]
