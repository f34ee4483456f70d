"""Knowledge distillation for ``hymba train --distill TEACHER_CKPT`` (the recipe's
``train.distill`` section, ``training.config.DistillConfig``): a frozen teacher checkpoint
scores every training batch and the student learns

    loss = ce_weight * objective loss + kl_weight * T^2 * KL(p_teacher^T || p_student^T) + aux losses

with ``p^T = softmax(logits / T)``, the KL averaged over every position of the batch (Hinton,
Vinyals, Dean 2015, arXiv 1503.02531; the T^2 keeps the gradient scale independent of T).
The usual recovery step after hybridizing a pretrained transformer (``hymba convert
--hybridize``): Mamba-in-the-Llama, arXiv 2408.15237 §4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DistillConfig


class DistillError(ValueError):
    """A teacher that cannot be used (one line)."""


def load_teacher(path: str | Path, student: Any, device: torch.device, seq_len: int | None = None,
                 tokenizer: Any = None) -> Any:
    """The frozen teacher (eval mode, no gradients) from a checkpoint folder; its vocabulary
    must be the student's (``vocab_size`` and, where both are text tokenizers, ``tokenizer``: the
    data's, against the teacher's ``tokenizer.json``), it must predict the next token (no objective
    of another kind) and hold the run's ``seq_len`` (its call skips the input checks)."""
    from ..models.lm import CheckpointError, from_pretrained
    from .tokenizer import TokenizerError, load_file

    try:
        teacher = from_pretrained(path)
    except CheckpointError as e:
        raise DistillError(f"--distill: {e}") from None
    if teacher.config.vocab_size != student.config.vocab_size:
        raise DistillError(f"--distill {path}: vocab_size {teacher.config.vocab_size} differs from the student's "
                           f"{student.config.vocab_size}")
    if student.recipe.objective is not None:  # block diffusion, LaDiR, forecasting (LaDiR's was an IndexError)
        raise DistillError(f"--distill: only for next-token training (the recipe's objective is "
                           f"{student.recipe.objective.kind}; it must be next_token)")
    if teacher.recipe.objective is not None:  # e.g. block diffusion's logits predict their own (masked) position
        raise DistillError(f"--distill {path}: the teacher's objective is {teacher.recipe.objective.kind}; it must "
                           f"be next_token (its logits are the next-token distributions the KL term reads)")
    if seq_len is not None and seq_len > teacher.config.max_seq_len:
        raise DistillError(f"--distill {path}: the teacher's max_seq_len {teacher.config.max_seq_len} is shorter "
                           f"than the run's seq_len {seq_len}")
    tok_file = Path(path) / "tokenizer.json"
    if tokenizer is not None and tokenizer.kind != "ids" and tok_file.is_file():  # (ids: a task's, no text)
        try:
            theirs = load_file(tok_file)
        except TokenizerError as e:
            raise DistillError(f"--distill: {str(e).splitlines()[0]}") from None
        if theirs.kind != "ids" and theirs.to_json() != tokenizer.to_json():
            raise DistillError(f"--distill {path}: the teacher was trained with another tokenizer ({theirs.kind}) "
                               f"than the data's ({tokenizer.kind}): the same ids would be other text to it")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over positions of KL(softmax(t / T) || softmax(s / T)), in float32."""
    T = temperature
    s = F.log_softmax(student_logits.float() / T, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / T, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


def distill_loss(out: Any, teacher: Any, ids: Tensor, cfg: DistillConfig | None) -> tuple[Tensor, Tensor, Tensor]:
    """(the loss to train, the KL term, the part of that loss that is a mean over the batch's
    positions: ``kl_weight`` * KL + aux losses) for a student ``ModelOutput`` on ``ids``. Under
    gradient accumulation the trainer weighs the objective's part by its items (the next-token
    targets) and this part equally (every micro-batch has as many positions: the mean over the
    step's), ``Trainer.train_step``."""
    cfg = cfg or DistillConfig()
    with torch.no_grad():
        t_logits = teacher(ids, check_inputs=False).logits
    kl = kl_loss(out.logits, t_logits, cfg.temperature)
    lm = out.loss if out.aux_loss is None else out.loss - out.aux_loss
    equal = cfg.kl_weight * kl
    loss = cfg.ce_weight * lm + equal
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
        equal = equal + out.aux_loss
    return loss, kl.detach(), equal
