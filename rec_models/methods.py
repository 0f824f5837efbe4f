"""Every trainable method by name: what it is, which frozen teachers it needs, how to build it.

A built model exposes ``forward(batch) -> {head: logit}`` (heads "teacher", "student"),
``training_loss(batch, step) -> (loss, logs)`` and, when it has a servable student,
``.student`` with ``encode_user`` / ``encode_item`` / ``score_kind``. Builders take
``(spec, cfg, teachers)``, ``teachers`` mapping each name in ``Method.teachers`` to its
trained model (frozen by the caller). Method hyper-parameters come from
``distill.params`` (conf/method/<name>.yaml) and are validated by the method's module.

Module imports are lazy: listing methods (config validation) needs no torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

ROLES = ("baseline", "teacher", "interaction", "distill")


@dataclass(frozen=True)
class Method:
    name: str
    role: str
    target: str                        # "module:callable(spec, cfg, teachers) -> nn.Module"
    teachers: tuple[str, ...] = field(default_factory=tuple)
    doc: str = ""
    # "module:class": the pydantic model of its distill.params ("": the method takes none)
    params: str = ""
    # a distillation method's student trained without a teacher (same architecture and
    # objective): the row its gains are paired with ("": none registered)
    undistilled: str = ""

    def params_model(self):
        """The pydantic model of the method's ``distill.params`` (None: it takes none).
        Imports the method's module (torch)."""
        if not self.params:
            return None
        module, cls = self.params.split(":")
        return getattr(importlib.import_module(module), cls)

    def build(self, spec, cfg, teachers: dict | None = None):
        module, fn = self.target.split(":")
        missing = [t for t in self.teachers if t not in (teachers or {})]
        if missing:
            raise ValueError(f"method '{self.name}' needs trained teacher(s): {', '.join(missing)}")
        return getattr(importlib.import_module(module), fn)(spec, cfg, teachers or {})


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dssm", "baseline", "rec_models.models.student_only:build_student_only", doc="DSSM two-tower, BCE"),
    Method("pfd_teacher", "teacher", "rec_models.models.pfd_teacher:build_teacher_only",
           doc="ranking teacher on public + privileged features"),
    Method("pfd", "distill", "rec_models.distill.pfd:build_pfd", doc="PFD: joint teacher + student, soft labels",
           undistilled="dssm"),
    Method("cross_encoder", "teacher", "rec_models.models.cross_encoder:build",
           doc="transformer over user and item field tokens",
           params="rec_models.models.cross_encoder:CrossEncoderParams"),
    Method("dcn", "teacher", "rec_models.models.dcn:build",
           doc="DCN: vector cross layers and a deep MLP over all field tokens",
           params="rec_models.models.dcn:DCNParams"),
    Method("colbert", "interaction", "rec_models.models.colbert:build", doc="ColBERT late interaction",
           params="rec_models.models.dual_encoder:DualEncoderParams"),
    Method("youtube_dnn", "baseline", "rec_models.models.youtube_dnn:build",
           doc="YouTubeDNN: history pooling, in-batch sampled softmax",
           params="rec_models.models.youtube_dnn:YouTubeDNNParams"),
    Method("inttower", "interaction", "rec_models.models.inttower:build",
           doc="IntTower: FE-block, light-SE, CIR contrastive loss",
           params="rec_models.models.inttower:IntTowerParams"),
    Method("mvke", "interaction", "rec_models.models.mvke:build", doc="MVKE: virtual-kernel experts, tag attention",
           params="rec_models.models.mvke:MVKEParams"),
    Method("kd", "distill", "rec_models.distill.kd:build", ("cross_encoder",),
           doc="Hinton KD: soft labels of the frozen cross-encoder into DSSM",
           params="rec_models.distill.kd:KDParams", undistilled="dssm"),
    Method("endx", "distill", "rec_models.distill.endx:build", ("cross_encoder",),
           doc="ENDX: geometry alignment of in-batch distributions",
           params="rec_models.distill.endx:ENDXParams", undistilled="dssm"),
    Method("trmd", "distill", "rec_models.distill.trmd:build", ("cross_encoder", "colbert"),
           doc="TRMD: two frozen teachers, two student heads",
           params="rec_models.distill.trmd:TRMDParams", undistilled="trmd_student"),
    Method("virt", "distill", "rec_models.distill.virt:build", ("cross_encoder",),
           doc="VIRT: L2 on attention, attention-weighted pooling",
           params="rec_models.distill.virt:VIRTParams", undistilled="token_dual_encoder_attn"),
    Method("distilled_dual_encoder", "distill", "rec_models.distill.distilled_dual_encoder:build", ("cross_encoder",),
           doc="Distilled-DualEncoder: KL on attention + soft labels",
           params="rec_models.distill.distilled_dual_encoder:DistilledDualEncoderParams",
           undistilled="token_dual_encoder"),
    Method("ernie_search", "distill", "rec_models.distill.ernie_search:build", ("cross_encoder",),
           doc="ERNIE-Search: cross-encoder -> late interaction -> dual encoder cascade",
           params="rec_models.distill.ernie_search:ErnieSearchParams", undistilled="token_dual_encoder"),
    # the token students trained without a teacher (same architecture and student.objective)
    Method("token_dual_encoder", "baseline", "rec_models.models.token_baselines:build_token_dual_encoder",
           doc="token dual encoder, mean pooling, no teacher: the Distilled-DualEncoder / ERNIE-Search student",
           params="rec_models.models.dual_encoder:DualEncoderParams"),
    Method("token_dual_encoder_attn", "baseline", "rec_models.models.token_baselines:build_token_dual_encoder",
           doc="token dual encoder, attention pooling, no teacher: the VIRT student",
           params="rec_models.models.dual_encoder:DualEncoderParams"),
    Method("trmd_student", "baseline", "rec_models.distill.trmd:build_student_only",
           doc="TRMD's two-ranker student, no teacher",
           params="rec_models.models.dual_encoder:DualEncoderParams"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
