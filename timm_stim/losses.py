"""Subnetwork losses of ST (KL) and ST++ (KL- on standardized logits)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['standardize_logits', 'kl_distill_loss', 'StimLoss', 'create_stim_loss']


def standardize_logits(logits: torch.Tensor, amplitude: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """phi(v) = A * (v - mean(v)) / sqrt(var(v) + eps) over the class dimension (population variance).

    Invariant to adding a constant and to a positive scale; keeps the argmax. Uses the real class count
    (the last dimension), not a hard-coded 1000. Computed in float32: under bf16 / fp16 autocast the 1 / std
    factor of nearly flat logits overflows or rounds to NaN.
    """
    logits = logits.float()
    mean = logits.mean(dim=-1, keepdim=True)
    var = logits.var(dim=-1, keepdim=True, unbiased=False)
    return amplitude * (logits - mean) * torch.rsqrt(var + eps)


def kl_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(sg[teacher]/T) || softmax(student/T)), averaged over the batch.

    The teacher is detached here, so the loss never sends gradient into the full network's logits.
    Computed in float32 for stability under autocast.
    """
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * (t * t)


class StimLoss(nn.Module):
    """Loss between a subnetwork's logits and the detached full network's logits.

    Args:
        kind: 'kl' (ST) or 'kl-' (ST++: both logit sets standardized with `standardize_logits` first).
        temperature: softmax temperature T (the loss is scaled by T^2).
        amplitude: A of the standardization (KL- only).
    """

    def __init__(self, kind: str = 'kl', temperature: float = 1.0, amplitude: float = 1.0):
        super().__init__()
        if kind not in ('kl', 'kl-'):
            raise ValueError(f"unknown stim loss {kind!r}: use 'kl' (ST) or 'kl-' (ST++).")
        if temperature <= 0 or amplitude <= 0:
            raise ValueError(f'stim loss temperature and amplitude must be > 0 (got T={temperature}, A={amplitude}).')
        self.kind = kind
        self.temperature = temperature
        self.amplitude = amplitude

    @property
    def standardizes(self) -> bool:
        return self.kind == 'kl-'

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits as this loss sees them (standardized for KL-)."""
        return standardize_logits(logits, self.amplitude) if self.standardizes else logits

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kl_distill_loss(self.transform(student_logits), self.transform(teacher_logits.detach()),
                               self.temperature)

    def extra_repr(self) -> str:
        return f'kind={self.kind!r}, temperature={self.temperature}, amplitude={self.amplitude}'


def create_stim_loss(kind: str = 'kl', temperature: float = 1.0, amplitude: float = 1.0) -> StimLoss:
    return StimLoss(kind, temperature, amplitude)
