"""The smaller-input branch of ST++: random subnet input sizes, resizing, and a set-up check."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'SizeSampler', 'SmallerInputsError', 'resize_batch', 'size_multiple', 'check_smaller_inputs',
    'smaller_input_kwargs',
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
        self.generator.set_state(state['generator'])

    def __repr__(self) -> str:
        return f'SizeSampler(S={self.full_size}, sizes={self.sizes[0]}..{self.sizes[-1]} ({len(self.sizes)}))'


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
        except TypeError:
            continue
        except Exception:
            continue
    return {}


@torch.no_grad()
def check_smaller_inputs(model: nn.Module, sizes: Sequence[int], full_size: int, in_chans: int = 3) -> None:
    """Dry-forward the smallest and largest sizes once at set-up; raise SmallerInputsError if they fail."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    probe = sorted({min(sizes), max(s for s in sizes if s < full_size) if any(s < full_size for s in sizes)
                    else min(sizes)})
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        for s in probe:
            try:
                out = model(torch.zeros(1, in_chans, s, s, device=param.device, dtype=param.dtype))
            except Exception as e:
                raise SmallerInputsError(
                    f'{name} cannot take {s}x{s} inputs for the smaller-input branch '
                    f'({type(e).__name__}: {str(e).splitlines()[0][:120]}); models that support it must be '
                    f'created with smaller_input_kwargs(name) (dynamic_img_size=True for ViT/EVA/Swin), others '
                    f'(BEiT, CaiT, PiT, LeViT, ConViT) cannot: turn smaller inputs off with --stim-min-scale 1 or '
                    f'allow full-size subnets with --stim-size-fallback.') from None
            if not torch.is_tensor(out):
                raise SmallerInputsError(f'{name} returned {type(out).__name__} for {s}x{s} inputs, not logits.')
    finally:
        model.train(was_training)
