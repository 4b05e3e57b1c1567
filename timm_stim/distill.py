"""Knowledge distillation as a main loss: timm's `--kd-*` flags, computed inside one stimulative forward.

timm's distillation tasks run the student themselves, so they cannot share the full-network pass that ST's subnet
passes distil from. The losses here compute what timm's tasks compute (timm's `DistillationTeacher`, its input
re-normalisation, temperature and weight modes) from the full pass the caller already ran, so `StimulativeTask`
adds distillation to the main loss with or without subnets and the full pass runs once:

- `LogitDistillationLoss` (--kd-distill-type logit): KL between student and teacher logits; works with ST.
- `FeatureDistillationLoss` (feature): MSE between pooled features (through a learned projection when the widths
  differ); the model's full pass also returns its features (`full_forward`). Plain training only.
- `TokenDistillationLoss` (token): DeiT-style distillation head; the model returns (class, distillation) logits
  in training. Plain training only.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher
from timm.task.distillation import FeatureDistillationTrainableModule

__all__ = ['TeacherLoss', 'LogitDistillationLoss', 'FeatureDistillationLoss', 'TokenDistillationLoss',
           'create_distillation_loss', 'distillation_weights', 'full_forward', 'main_loss', 'optimizer_module']


def distillation_weights(task_weight: Optional[float], distill_weight: Optional[float]) -> Tuple[float, float]:
    """(task, distill) weights as timm reads --task-loss-weight / --distill-loss-weight.

    Both or only distill given: independent weights (task defaults to 1). Only task given: distill = 1 - task.
    Neither: 1 and 1.
    """
    if distill_weight is not None:
        return (1.0 if task_weight is None else task_weight), distill_weight
    if task_weight is not None:
        return task_weight, 1.0 - task_weight
    return 1.0, 1.0


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the tempered distributions, averaged over the batch (timm's KD term)."""
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    reduction='batchmean', log_target=True) * temperature ** 2


class TeacherLoss(nn.Module):
    """task_weight * criterion(student logits, target) + distill_weight * distillation term.

    Called as `loss(logits, target, input=..., output=...)`: `input` is the student's (normalised) batch, which
    the frozen teacher sees re-normalised to its own mean/std; `output` the full network's raw output (`logits`
    may be ST++'s standardised logits for the task term). The teacher stays in eval mode.
    """
    takes_input = True

    def __init__(self, teacher: DistillationTeacher, criterion: Callable, student_mean, student_std,
                 task_weight: float = 1.0, distill_weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.criterion = criterion
        self.task_weight, self.distill_weight = float(task_weight), float(distill_weight)
        self.temperature = float(temperature)
        for name, value in (('student_mean', student_mean), ('student_std', student_std)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)

    def train(self, mode: bool = True) -> 'TeacherLoss':
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics and dropout never train
        return self

    @torch.no_grad()
    def teacher_output(self, input: torch.Tensor, features: bool = False) -> torch.Tensor:
        mean, std = self.student_mean.to(input.dtype), self.student_std.to(input.dtype)
        return self.teacher(self.teacher.normalize_input(input, mean, std).detach(), return_features=features)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, input: torch.Tensor,
                output: Optional[Any] = None) -> torch.Tensor:
        task_loss, distill_loss = self.losses(logits, target, input, logits if output is None else output)
        return self.task_weight * task_loss + self.distill_weight * distill_loss

    def losses(self, logits, target, input, output) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def task_state(self) -> Dict[str, Any]:
        """What a checkpoint must keep of this loss (its trainable parts), for resume."""
        return {}

    def load_task_state(self, state: Dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return f'task_weight={self.task_weight}, distill_weight={self.distill_weight}, temperature={self.temperature}'


class LogitDistillationLoss(TeacherLoss):
    """Logit distillation: KL between the student's and the teacher's tempered logits."""

    def losses(self, logits, target, input, output):
        return self.criterion(logits, target), _kl(output, self.teacher_output(input), self.temperature)


class TokenDistillationLoss(TeacherLoss):
    """Distillation-token training: the class head learns the labels, the distillation head the teacher
    (soft: tempered KL; hard: cross-entropy with the teacher's top class)."""

    def __init__(self, *args, hard: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.hard = hard

    def losses(self, logits, target, input, output):
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise ValueError('token distillation needs a model that returns (class, distillation) logits in '
                             'training (a distilled DeiT)')
        main_logits, dist_logits = output
        teacher = self.teacher_output(input)
        distill = (F.cross_entropy(dist_logits, teacher.argmax(dim=-1)) if self.hard
                   else _kl(dist_logits, teacher, self.temperature))
        return self.criterion(main_logits, target), distill


class FeatureDistillationLoss(TeacherLoss):
    """Feature distillation: MSE between the student's pooled pre-logits features, projected to the teacher's
    width when they differ (a trained Linear, saved in checkpoints), and the teacher's."""

    def __init__(self, *args, projection: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projection = projection
        self._features: Optional[torch.Tensor] = None

    def full_forward(self, model: nn.Module, input: torch.Tensor) -> torch.Tensor:
        """The full pass, keeping the pooled features for the loss (one trunk pass, timm's head calls)."""
        feature_map = model.forward_features(input)
        logits = model.forward_head(feature_map)
        self._features = model.forward_head(feature_map, pre_logits=True)
        return logits

    def losses(self, logits, target, input, output):
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError('feature distillation needs the full pass to run through full_forward')
        if self.projection is not None:
            features = self.projection(features)
        task_loss = self.criterion(logits, target)
        return task_loss, F.mse_loss(features, self.teacher_output(input, features=True))

    def task_state(self) -> Dict[str, Any]:
        return {} if self.projection is None else {'projection': self.projection.state_dict()}

    def load_task_state(self, state: Dict[str, Any]) -> None:
        if self.projection is not None:
            self.projection.load_state_dict(state['projection'])


def _feature_dim(model: nn.Module) -> int:
    dim = getattr(model, 'head_hidden_size', None) or getattr(model, 'num_features', None)
    if dim is None:
        raise ValueError(f'{type(model).__name__} has no head_hidden_size or num_features: pass '
                         f'--kd-student-feature-dim and --kd-teacher-feature-dim')
    return int(dim)


def create_distillation_loss(args, model: nn.Module, criterion: Callable, device: Optional[torch.device] = None,
                             dtype: Optional[torch.dtype] = None) -> TeacherLoss:
    """The loss for timm's --kd-* flags, with the teacher built as timm's train.py builds it (pretrained, the
    student's classes and channels: a timm name, 'hf-hub:...' or 'local-dir:...'), in timm's order."""
    kind = args.kd_distill_type
    if kind == 'token' and not hasattr(model, 'set_distilled_training'):
        raise ValueError(f'--kd-distill-type token needs a model with a distillation head (a distilled DeiT such '
                         f'as deit_tiny_distilled_patch16_224); {type(model).__name__} has none')
    if kind == 'feature' and not (hasattr(model, 'forward_features') and hasattr(model, 'forward_head')):
        raise ValueError(f'--kd-distill-type feature needs forward_features/forward_head; {type(model).__name__} '
                         f'has neither')
    if kind == 'token':
        model.set_distilled_training(True)
    teacher = DistillationTeacher(args.kd_model_name, num_classes=model.num_classes,
                                  in_chans=getattr(model, 'in_chans', 3), device=device, dtype=dtype)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    task_weight, distill_weight = distillation_weights(args.task_loss_weight, args.distill_loss_weight)
    common = dict(teacher=teacher, criterion=criterion, student_mean=cfg.get('mean', (0.485, 0.456, 0.406)),
                  student_std=cfg.get('std', (0.229, 0.224, 0.225)), task_weight=task_weight,
                  distill_weight=distill_weight)
    if kind == 'logit':
        return LogitDistillationLoss(temperature=args.kd_temperature, **common)
    if kind == 'token':
        return TokenDistillationLoss(temperature=args.kd_temperature, hard=args.kd_token_distill_type == 'hard',
                                     **common)
    student_dim = args.kd_student_feature_dim or _feature_dim(model)
    teacher_dim = args.kd_teacher_feature_dim or _feature_dim(teacher.model)
    projection = (nn.Linear(student_dim, teacher_dim, device=device, dtype=dtype) if student_dim != teacher_dim
                  else None)
    return FeatureDistillationLoss(projection=projection, **common)


def main_loss(criterion: Callable, logits: torch.Tensor, target: torch.Tensor, input, output):
    """The main loss: `criterion(logits, target)`, or with the batch and raw output for a distillation loss."""
    if getattr(criterion, 'takes_input', False):
        return criterion(logits, target, input=input, output=output)
    return criterion(logits, target)


def full_forward(model: Callable, criterion: Callable, input):
    """The full-network pass: `model(input)`, or the loss's own pass when it needs more than the logits."""
    run = getattr(criterion, 'full_forward', None)
    return run(model, input) if run is not None else model(input)


def optimizer_module(model: nn.Module, criterion: Callable) -> nn.Module:
    """What the optimizer trains: the model, plus a feature-distillation projection (as in timm: the projection's
    parameters after the model's, with the model's weight-decay and layer-decay rules)."""
    projection = getattr(criterion, 'projection', None)
    return model if projection is None else FeatureDistillationTrainableModule(model, projection)
