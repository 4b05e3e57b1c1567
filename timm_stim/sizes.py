"""The smaller-input branch of ST++: random subnet input sizes, resizing, and a set-up check."""
from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import describe_error

__all__ = [
    'SizeSampler', 'SmallerInputsError', 'resize_batch', 'size_multiple', 'check_smaller_inputs',
    'smaller_input_kwargs', 'probe_input_sizes', 'kept_input_sizes', 'describe_kept_sizes',
]


class SmallerInputsError(ValueError):
    """Raised at set-up when a model cannot take the smaller inputs the size sampler would give it."""


def size_multiple(model: nn.Module) -> int:
    """Sizes a model needs its input to be a multiple of: the patch size of patch-embedding models."""
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if patch is None:
        return 1
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return int(patch[0])


class SizeSampler:
    """Draws one subnet input size per subnet: uniform on the integers [floor(r*S), S], or from `sizes`.

    Args:
        full_size: training crop size S (height; width is scaled proportionally at resize time).
        min_scale: r in (0, 1]; 1 disables the smaller-input branch.
        sizes: optional fixed list of sizes to draw from uniformly (buckets for torch.compile).
        multiple: restrict sizes to multiples of this (ViT patch size).
        seed: seed of the sampler's own generator.
    """

    def __init__(
            self,
            full_size: int,
            min_scale: float = 0.43,
            sizes: Optional[Sequence[int]] = None,
            multiple: int = 1,
            seed: int = 0,
    ):
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f'stim min scale must be in (0, 1] (got {min_scale}); 1 turns smaller inputs off, '
                             f'the ST++ default is 0.43.')
        self.full_size = int(full_size)
        self.min_scale = float(min_scale)
        self.multiple = max(1, int(multiple))
        if sizes:
            bad = [s for s in sizes if not 0 < int(s) <= self.full_size or int(s) % self.multiple]
            if bad:
                raise ValueError(f'stim sizes {list(sizes)} must be in 1..{self.full_size} (the training size) and '
                                 f'multiples of {self.multiple}; {bad[0]} is not.')
            self.sizes = tuple(sorted({int(s) for s in sizes}))
        else:
            low = math.floor(self.min_scale * self.full_size)
            cands = [s for s in range(low, self.full_size + 1) if s % self.multiple == 0 and s > 0]
            if not cands:
                raise ValueError(f'no input size in [{low}, {self.full_size}] is a multiple of {self.multiple}; '
                                 f'raise --stim-min-scale or use --stim-sizes.')
            self.sizes = tuple(cands)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def enabled(self) -> bool:
        return self.sizes != (self.full_size,)

    def sample(self) -> int:
        if len(self.sizes) == 1:
            return self.sizes[0]
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=self.generator))]

    def state_dict(self) -> Dict[str, Any]:
        return {'sizes': list(self.sizes), 'generator': self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = tuple(int(s) for s in state.get('sizes', self.sizes))
        if saved != self.sizes:
            raise ValueError(
                f'size sampler state was saved for subnet sizes {_describe(saved)} but this run draws '
                f'{_describe(self.sizes)}; resume with the same model, input size, --stim-min-scale and --stim-sizes.')
        self.generator.set_state(state['generator'])

    def __repr__(self) -> str:
        return f'SizeSampler(S={self.full_size}, sizes={self.sizes[0]}..{self.sizes[-1]} ({len(self.sizes)}))'


def _describe(sizes: Sequence[int]) -> str:
    return f'{sizes[0]}..{sizes[-1]} ({len(sizes)} sizes)' if sizes else 'none'


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a (normalized) NCHW batch so its height is `size`; the original, not a chain."""
    h, w = x.shape[-2:]
    if size == h:
        return x
    out_w = max(1, round(w * size / h))
    return F.interpolate(x, size=(size, out_w), mode='bilinear', align_corners=False, antialias=False)


def smaller_input_kwargs(model_name: str) -> Dict[str, Any]:
    """create_model kwargs a model needs to accept other input sizes at run time.

    ViT/DeiT/EVA take `dynamic_img_size=True`, Swin `strict_img_size=False`; convnets need nothing.
    Found by asking timm to build the model on the meta device with each option.
    """
    import timm
    for kwargs in (dict(dynamic_img_size=True), dict(strict_img_size=False)):
        try:
            with torch.device('meta'):
                timm.create_model(model_name, pretrained=False, **kwargs)
            return kwargs
        except Exception:  # TypeError for an unknown kwarg; some constructors fail otherwise on meta
            continue
    return {}


def _meta_forward(model: nn.Module, in_chans: int) -> Callable[[int], None]:
    """A forward that propagates shapes only: the model's parameters and buffers as meta tensors, no compute."""
    state = {n: t.to('meta') for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}

    def forward(size: int) -> None:
        torch.func.functional_call(model, state, (torch.empty(1, in_chans, size, size, device='meta'),))
    return forward


def _real_forward(model: nn.Module, in_chans: int) -> Callable[[int], None]:
    """A real batch-of-one forward, for models whose forward cannot run on meta tensors."""
    param = next(model.parameters())

    def forward(size: int) -> None:
        model(torch.zeros(1, in_chans, size, size, device=param.device, dtype=param.dtype))
    return forward


@torch.no_grad()
def probe_input_sizes(model: nn.Module, sizes: Sequence[int], in_chans: int = 3) -> Dict[int, str]:
    """Which input sizes the model cannot take: {size: one-line reason}, from one eval-mode forward per size.

    Shapes are propagated on the meta device (no compute, no memory for activations); if the model cannot run on
    meta tensors at all (the largest size fails there), or a real forward of the largest size is cheaper (small
    inputs on CPU), batch-of-one real forwards are used. Both give the same answer on every model tried.
    """
    sizes = sorted({int(s) for s in sizes})
    was_training = model.training
    model.eval()
    failures: Dict[int, str] = {}
    try:
        forward = _real_forward(model, in_chans)
        start = time.perf_counter()
        try:
            forward(sizes[-1])
            real_cost = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 -- any error means this size cannot be used
            failures[sizes[-1]], real_cost = describe_error(e), float('inf')
        meta = _meta_forward(model, in_chans)
        start = time.perf_counter()
        try:
            meta(sizes[-1])
            if time.perf_counter() - start < real_cost:
                forward = meta
        except Exception:  # noqa: BLE001 -- no meta kernel or a data-dependent forward: stay with real forwards
            pass
        for s in sizes[:-1]:
            try:
                forward(s)
            except Exception as e:  # noqa: BLE001
                failures[s] = describe_error(e)
    finally:
        model.train(was_training)
    return failures


def check_smaller_inputs(model: nn.Module, sizes: Sequence[int], full_size: int, in_chans: int = 3) -> Tuple[int, ...]:
    """The subnet input sizes (of `sizes`) the model can take, found before training; raise if none below S works.

    Returns the working sizes; the caller draws only those. Raises SmallerInputsError, naming the options that
    change the range, when no size smaller than the training size `full_size` works.
    """
    return kept_input_sizes(model, sizes, full_size, probe_input_sizes(model, sizes, in_chans))


def kept_input_sizes(
        model: nn.Module, sizes: Sequence[int], full_size: int, failures: Dict[int, str]) -> Tuple[int, ...]:
    """The sizes of `sizes` that did not fail in `failures` (from `probe_input_sizes` of these sizes or of a
    superset); raise like `check_smaller_inputs` if none below `full_size` works.

    Split from `check_smaller_inputs` so that one probe over the union of several size ranges serves each range.
    """
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    sizes = sorted(set(int(s) for s in sizes))
    failures = {s: reason for s, reason in failures.items() if s in sizes}
    kept = tuple(s for s in sizes if s not in failures)
    if not any(s < full_size for s in kept):
        smaller = sorted(s for s in failures if s < full_size)
        example = failures[smaller[0]] if smaller else failures.get(full_size, 'no smaller size requested')
        raise SmallerInputsError(
            f'{name} cannot take any of the subnet input sizes {smaller[0]}..{smaller[-1]} below the training size '
            f'{full_size} ({example}); choose other sizes with --stim-min-scale or --stim-sizes, turn smaller '
            f'inputs off with --stim-min-scale 1, or allow full-size subnets with --stim-size-fallback. ViT-style '
            f'models need smaller_input_kwargs(name) at creation (dynamic_img_size=True); BEiT, CaiT, PiT, LeViT '
            f'and ConViT cannot take other sizes at all.' if smaller else
            f'{name} cannot take its training size {full_size} ({example}).')
    return kept


def describe_kept_sizes(requested: Sequence[int], kept: Sequence[int]) -> str:
    """One log line: how many sizes were kept, their range, and which were dropped."""
    dropped = sorted(set(requested) - set(kept))
    text = f'{len(kept)} of {len(set(requested))} kept ({min(kept)}..{max(kept)} px'
    if dropped:
        shown = ', '.join(map(str, dropped[:12])) + (', ...' if len(dropped) > 12 else '')
        text += f', dropped: {shown}'
    return text + ')'
