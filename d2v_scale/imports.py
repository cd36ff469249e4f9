"""`d2v import-fairseq`: a checkpoint of the data2vec reference code -> a d2v_scale weights file.

Reads, with `torch.load(weights_only=True)` (fairseq.py: `load_fairseq_checkpoint`), whichever of
these the file is, by its contents, not its name:

* fairseq data2vec 2.0 (`data2vec_multi`, fairseq.py): the data2vec 2.0 student, decoder and teacher;
* fairseq data2vec 1 (`data2vec_audio`, `data2vec_text`) and data2vec_vision's BEiT checkpoints
  (`run_cyclical.py`'s `checkpoint-799.pth`) (d2v1/checkpoints.py): the data2vec 1 student (encoder
  and regression head) and its EMA teacher, with `model.algorithm=data2vec`.

The file (`d2v_scale/model-v1`: student keys, teacher keys under `teacher.`, the config in its
metadata) is what `--run.init_from` continues pretraining from and `d2v finetune --init` /
`d2v probe --init` start from; written to a temporary name and renamed (outputs.py), an existing
OUT only replaced with `overwrite`.
"""
from __future__ import annotations

from pathlib import Path

from .d2v1.checkpoints import family, from_checkpoint
from .export import check_writable, write_weights
from .fairseq import FairseqImportError, from_fairseq, load_fairseq_checkpoint


def import_checkpoint(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """A fairseq data2vec 2.0 / data2vec 1 checkpoint or a data2vec_vision one -> OUT (summary dict)."""
    check_writable(out, overwrite)
    raw = load_fairseq_checkpoint(ckpt)
    name = family(raw)
    if name is None and not isinstance(raw.get("cfg"), dict):
        raise FairseqImportError(f"{ckpt} is not a data2vec checkpoint: expected fairseq's ckpt['model'] and "
                                 "ckpt['cfg']['model'] (data2vec_multi, data2vec_audio, data2vec_text) or "
                                 "data2vec_vision's ckpt['model'] with BEiT names")
    if name is None:                       # fairseq data2vec 2.0 (its refusals name what is missing)
        model = from_fairseq(raw)
        cfg, tensors = model.cfg, dict(model.student.state_dict())
        teacher = model.teacher.state_dict()
        source, student = "fairseq data2vec_multi", model.student
    else:
        cfg, student, teacher = from_checkpoint(raw, name)
        tensors, source = dict(student.state_dict()), name
    tensors.update({f"teacher.{k}": v for k, v in (teacher or {}).items()})
    write_weights(out, tensors, cfg.to_dict(), "model")
    summary = {"out": str(out), "from": source, "modality": cfg.model.modality, "algorithm": cfg.model.algorithm,
               "tensors": len(tensors), "student_params": sum(p.numel() for p in student.parameters())}
    if teacher is None:
        summary["teacher"] = "none in the checkpoint: training starts the teacher from the student"
    return summary
