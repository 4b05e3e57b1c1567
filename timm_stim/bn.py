"""BatchNorm hygiene for subnet passes: freeze running statistics, or re-estimate them from data."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import BlockLayout
from .skip import SpecLike, subnet

__all__ = ['frozen_bn_stats', 'recalibrate_bn']


def _tracking_bns(model: nn.Module) -> List[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm layers normalise with batch statistics but leave running stats untouched.

    Turning `track_running_stats` off for the duration (rather than momentum=0) also keeps
    `num_batches_tracked` unchanged, so the state_dict is bit-identical afterwards.
    """
    bns = [m for m in _tracking_bns(model) if m.training]
    try:
        for m in bns:
            m.track_running_stats = False
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@torch.no_grad()
def recalibrate_bn(
        model: nn.Module,
        batches: Iterable,
        num_images: int = 2000,
        layout: Optional[BlockLayout] = None,
        spec: SpecLike = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        autocast: Callable[[], ContextManager] = nullcontext,
) -> int:
    """Re-estimate BatchNorm running statistics of the full net (or of a subnet) from data.

    Running stats are reset and re-computed as the equal-weight average of batch statistics over about
    `num_images` images (train-mode forward, no gradients), as the ST authors do before evaluation.
    BN layers that the subnet does not run keep their previous statistics. `batches` yields tensors or
    (input, target) pairs, moved to `device` and cast to `dtype` (default: the model's floating-point dtype, so a
    `--model-dtype bfloat16` model gets bfloat16 inputs); `autocast` is the training's mixed-precision context.
    Returns the number of images used.
    """
    # A torch.compile wrapper shares the weights and buffers: run the plain module, since the cumulative-average
    # mode (momentum None) reads a buffer as a Python number and would recompile the graph BN layer by BN layer.
    model = getattr(model, '_orig_mod', model)
    bns = _tracking_bns(model)
    if not bns:
        return 0
    saved = [(m.momentum, {k: v.clone() for k, v in m._buffers.items() if v is not None}) for m in bns]
    was_training = model.training
    first = next(model.parameters())
    device = first.device if device is None else device
    dtype = dtype or (first.dtype if first.is_floating_point() else None)
    seen, completed = 0, False
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
        model.train()
        ctx = subnet(model, layout, spec) if layout is not None else nullcontext()
        with ctx:
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x.to(device=device, dtype=dtype)
                with autocast():
                    model(x)
                seen += x.shape[0]
                if seen >= num_images:
                    break
        completed = True
    finally:
        model.train(was_training)
        for m, (momentum, buffers) in zip(bns, saved):
            m.momentum = momentum
            # Restore on failure, without data, and for BN layers the subnet did not run.
            if not completed or seen == 0 or int(m.num_batches_tracked) == 0:
                for k, v in buffers.items():
                    m._buffers[k].copy_(v)
    return seen
