"""Teacher handling shared by every distillation method.

A distillation model holds its teachers as submodules (checkpoints contain them and
``rec_models.training.loop.load_trained`` refills them), never optimises a frozen one,
keeps it in eval mode whatever mode the caller sets (dropout off), and computes its
outputs without a graph. :class:`FrozenTeachers` does the eval-mode part for any model
that lists its frozen modules; :func:`freeze` the rest; :func:`teacher_state` reads a
trained teacher's weights from a checkpoint; :class:`CrossTeacherDistill` is the base of
the methods that distil a frozen cross-encoder into a token dual encoder.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.models.cross_encoder import CrossEncoder, CrossOutputs
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.spec import FeatureSpec

CROSS_TEACHER = "cross_encoder"


def freeze(module: nn.Module) -> nn.Module:
    """No gradient, eval mode (dropout off): a teacher that is used, never optimised.
    Builders call it on teachers rebuilt untrained too (``load_trained`` loads the
    weights afterwards), so that a frozen teacher is frozen however it was made."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class FrozenTeachers:
    """Mixin for an ``nn.Module``: the modules ``frozen_modules()`` returns stay in eval
    mode when the model is put in training mode."""

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


def teacher_state(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                  prefix: str = "teacher.") -> dict[str, torch.Tensor]:
    """A teacher's state dict from a checkpoint path, a checkpoint dict (holding it under
    ``state_dict`` or ``model``) or a state dict; keys under ``prefix`` (a model that
    holds the teacher as ``.teacher``) are unprefixed. Loads with ``weights_only``."""
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(source, Mapping) and key in source and isinstance(source[key], Mapping):
            source = source[key]
    state = dict(source)
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def cross_teacher(teachers: Mapping[str, nn.Module], method: str) -> CrossEncoder:
    """The trained cross-encoder among a method's ``teachers``, or a TypeError naming the method."""
    teacher = teachers.get(CROSS_TEACHER) if teachers else None
    if not isinstance(teacher, CrossEncoder):
        raise TypeError(f"method '{method}' needs a trained CrossEncoder as teacher '{CROSS_TEACHER}', "
                        f"got {type(teacher).__name__}")
    return teacher


def student_params(layers: int, heads: int, pooling: str) -> dict:
    """``TokenDualEncoder`` params from a method's own."""
    return {"layers": layers, "heads": heads, "pooling": pooling}


class CrossTeacherDistill(FrozenTeachers, nn.Module):
    """Base of a model distilled from a frozen cross-encoder into a ``TokenDualEncoder``
    (VIRT, Distilled-DualEncoder, ERNIE-Search): heads "teacher" and "student"."""

    def __init__(self, spec: FeatureSpec, teacher: CrossEncoder, student: TokenDualEncoder):
        super().__init__()
        if (list(teacher.tokens.user_names), list(teacher.tokens.item_names)) != (
                student.user_input_names, student.item_input_names):
            raise ValueError("the cross-encoder teacher must read the student's user and item fields, in order: "
                             f"teacher {teacher.tokens.user_names} / {teacher.tokens.item_names}, "
                             f"student {student.user_input_names} / {student.item_input_names}")
        self.spec = spec
        self.teacher = freeze(teacher)
        self.student = student

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def teacher_outputs(self, batch: Batch) -> CrossOutputs:
        with torch.no_grad():
            return self.teacher.outputs(batch)

    def label_weight(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return label_and_weight(self.spec, batch)

    def student_pass(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logit [B], user states [B, Fu, D], item states [B, Fi, D]) in one pass of the towers."""
        hu, hv = self.student.user_states(batch), self.student.item_states(batch)
        logit = self.student.score(self.student.user_vector(hu), self.student.item_vector(hv))
        return logit, hu, hv

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.teacher_outputs(batch).logit, "student": self.student(batch)}
