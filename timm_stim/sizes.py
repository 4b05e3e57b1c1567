"""The smaller-input branch of ST++: random subnet input sizes, resizing, and a set-up check."""
from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .blocks import describe_error

_logger = logging.getLogger(__name__)

__all__ = [
    'SizeSampler', 'SmallerInputsError', 'resize_batch', 'size_multiple', 'check_smaller_inputs',
    'smaller_input_kwargs', 'probe_input_sizes', 'probe_input_sizes_once', 'kept_input_sizes', 'describe_kept_sizes',
    'few_sizes_warning',
]


class SmallerInputsError(ValueError):
    """Raised at set-up when a model cannot take the smaller inputs the size sampler would give it."""


def size_multiple(model: nn.Module) -> int:
    """Sizes a model needs its input to be a multiple of: the stride of a non-overlapping patch embedding.

    A patch embedding whose kernel equals its stride, with no padding (ViT, DeiT, EVA, Swin), drops the pixels
    past the last whole patch, so only multiples of its stride are drawn. An overlapping, padded one (PVTv2: kernel
    7, stride 4, padding 3) uses every pixel of every size: its `patch_size` (the kernel) is no requirement, and
    the model gets 1. Without a convolution to read, the `patch_size` attribute is taken at its word.
    """
    patch_embed = getattr(model, 'patch_embed', None)
    patch = getattr(patch_embed, 'patch_size', None)
    if patch is None:
        return 1
    proj = getattr(patch_embed, 'proj', None)
    if isinstance(proj, nn.Conv2d):
        padded = proj.padding != 'valid' if isinstance(proj.padding, str) else any(proj.padding)
        if tuple(proj.kernel_size) != tuple(proj.stride) or padded:
            return 1
        return int(proj.stride[0])
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


class _Unmemoizable(Exception):
    """An argument whose signature cannot be taken: the call runs as it is."""


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _signature(obj: Any, meta_only: bool = False) -> Any:
    """What a call depends on short of tensor values: shapes, strides, dtypes, devices and plain values.

    Raises _Unmemoizable for anything else (and, with `meta_only`, for a tensor off the meta device).
    """
    if isinstance(obj, torch.Tensor):
        if meta_only and obj.device.type != 'meta':
            raise _Unmemoizable
        return 'tensor', tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.dtype, obj.device
    if obj is None or isinstance(obj, _PLAIN):
        return type(obj), obj
    if isinstance(obj, (tuple, list)):
        return type(obj), tuple(_signature(o, meta_only) for o in obj)
    if isinstance(obj, dict):
        return dict, tuple((k, _signature(v, meta_only)) for k, v in obj.items())
    raise _Unmemoizable


class _TensorSpec:
    """Shape, strides, offset, storage size, dtype and device of a tensor: makes a fresh one like it.

    On the meta device that is all a tensor is; a real one is made of zeros (values are not what a probe asks).
    """

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()
        self.dtype, self.device = t.dtype, t.device
        self.numel = t.untyped_storage().nbytes() // max(1, t.element_size())

    def make(self) -> torch.Tensor:
        storage = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        if self.device.type != 'meta':
            storage.zero_()
        return storage.as_strided(self.shape, self.stride, self.offset)


def _freeze(out: Any) -> Any:
    return tree_map(lambda v: _TensorSpec(v) if isinstance(v, torch.Tensor) else v, out)


def _thaw(frozen: Any) -> Any:
    return tree_map(lambda v: v.make() if isinstance(v, _TensorSpec) else v, frozen)


class _MetaOpMemo(TorchDispatchMode):
    """Runs each meta-device operator once per distinct argument signature.

    A meta kernel computes its outputs' metadata from its inputs' metadata alone, so an operator call with the
    signature of an earlier one has that call's outputs (made afresh: a later in-place change of one cannot reach
    the cache). Operators that mutate an argument, take a tensor off the meta device, or return other than
    tensors run as they are.
    """

    def __init__(self):
        super().__init__()
        self.cache: Dict[Any, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            return func(*args, **kwargs)
        try:
            key = (func, _signature(args, meta_only=True), _signature(kwargs, meta_only=True))
            hit = self.cache.get(key)
        except Exception:  # noqa: BLE001 -- _Unmemoizable or an unhashable value: run the call as it is
            return func(*args, **kwargs)
        if hit is not None:
            return _thaw(hit)
        out = func(*args, **kwargs)
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        if all(isinstance(v, torch.Tensor) for v in leaves):
            self.cache[key] = _freeze(out)
        return out


def _memoized(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` answering a call with the signature of an earlier call by that call's outputs (or error)."""
    cache: Dict[Any, Any] = {}
    missing = object()

    def memo_forward(*args: Any, **kwargs: Any) -> Any:
        try:
            key = (_signature(args), _signature(kwargs))
            hit = cache.get(key, missing)
        except Exception:  # noqa: BLE001 -- _Unmemoizable or an unhashable value: run the call as it is
            return forward(*args, **kwargs)
        if isinstance(hit, BaseException):
            raise hit
        if hit is not missing:
            return _thaw(hit)
        try:
            out = forward(*args, **kwargs)
        except Exception as e:
            cache[key] = e
            raise
        cache[key] = _freeze(out)
        return out
    return memo_forward


# nn.Module's own bookkeeping (hooks, parameter and submodule tables) and the memo's patch: not state a forward
# keeps. Buffers stay in: a forward that assigns a buffer keeps state.
_NOT_STATE = frozenset(vars(nn.Module())) - {'_buffers'} | {'forward'}


def _attributes(modules: Sequence[nn.Module]) -> list:
    """Every module's attributes, shallowly (identities; a dict's, list's or set's entries too): what a forward
    that keeps state from one call to the next changes."""
    out = []
    for m in modules:
        for k, v in vars(m).items():
            if k in _NOT_STATE:
                continue
            out.append((k, id(v)))
            if isinstance(v, dict):
                out.append(tuple(map(id, itertools.chain(v, v.values()))))
            elif isinstance(v, (list, set)):
                out.append(tuple(map(id, v)))
    return out


class _StateChanged(Exception):
    """A module changed its attributes from one probed size to the next: a memo of module calls is unsound."""


@contextmanager
def _memoized_modules(model: nn.Module) -> Iterator[None]:
    """Within: every submodule holding parameters runs once per distinct input signature.

    Input sizes that differ at the stem meet again deeper down (sizes 96..224 reach ResNet-50's last stage at 5
    resolutions), so a probe of every size runs each stage only on the shapes that reach it. Sound while module
    calls depend on their arguments only: the probe (`_EachSize` with `watch`) checks that no module's attributes
    change between sizes. Modules without parameters (activations, pooling, Identity) are cheap and run as is.
    """
    patched = []
    for module in model.modules():
        if module is model or isinstance(module, torch.jit.ScriptModule) or next(module.parameters(), None) is None:
            continue
        own = vars(module).get('forward')
        module.forward = _memoized(module.forward)
        patched.append((module, own))
    try:
        yield
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own


class _EachSize(nn.Module):
    """Runs the model on a batch of one at each size, in the order given; {size: reason} for those that raise.

    A module, so that `torch.func.functional_call` swaps the model's tensors for meta ones once per call.
    With `watch`, raises _StateChanged when any module's attributes differ after a size from after the one
    before, across calls too (the very first size may fill caches keyed by device).
    """

    def __init__(self, model: nn.Module, in_chans: int):
        super().__init__()
        self.model, self.in_chans = model, in_chans
        self.state: Optional[list] = None  # the attributes after the last watched size

    def forward(self, sizes: Sequence[int], device: torch.device, dtype: torch.dtype,
                watch: bool = False) -> Dict[int, str]:
        failures: Dict[int, str] = {}
        modules = list(self.model.modules())
        for s in sizes:
            try:
                self.model(torch.zeros(1, self.in_chans, s, s, device=device, dtype=dtype))
            except Exception as e:  # noqa: BLE001 -- any error means this size cannot be used
                failures[s] = describe_error(e)
            if watch:
                now = _attributes(modules)
                if self.state is not None and now != self.state:
                    raise _StateChanged
                self.state = now
        return failures


def _real_failures(model: nn.Module, sizes: Sequence[int], in_chans: int, watch: bool = False) -> Dict[int, str]:
    """{size: reason} from real batch-of-one forwards on the model's device and dtype."""
    param = next(model.parameters())
    return _EachSize(model, in_chans)(sizes, param.device, param.dtype, watch)


def _meta_failures(probe: _EachSize, state: Dict[str, torch.Tensor], sizes: Sequence[int],
                   ops: _MetaOpMemo) -> Dict[int, str]:
    """{size: reason} from forwards of `probe` on the meta device (shapes only) with the model's tensors swapped
    for `state`'s meta ones, each operator once per signature (`ops`), watched. The same `state` in every call:
    the watch sees the buffers' identities."""
    args = (sizes, torch.device('meta'), next(probe.model.parameters()).dtype, True)
    with ops:
        return torch.func.functional_call(probe, state, args)


def _timed(fn: Callable[..., Any], *args: Any) -> Tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


# A meta forward costs what its memos leave to run, a real one what the model computes; neither always wins
# (CrossViT's meta forwards barely memoize and cost 10x its real ones at 240 px; LSTMs are slow on meta). A first
# meta forward slower than _SLOW_META_S is timed against a real one at once; otherwise the meta cost per size is
# taken on the next _WARM_SIZES sizes (the first filled the memos), and when the meta forwards still to run would
# take longer than _COMPARE_ABOVE_S, one real forward is timed against them.
_SLOW_META_S = 0.2
_COMPARE_ABOVE_S = 1.0
_WARM_SIZES = 8  # sizes probed on meta before their cost per size is taken


@torch.no_grad()
def probe_input_sizes(
        model: nn.Module, sizes: Sequence[int], in_chans: int = 3, exhaustive: bool = False) -> Dict[int, str]:
    """Which input sizes the model cannot take: {size: one-line reason}, from one eval-mode forward per size.

    Fast path: shapes are propagated on the meta device (no compute), largest size first, each module with
    parameters running once per distinct input signature and each operator once per distinct argument signature,
    so a size re-runs only what sees a new shape. A real batch-of-one forward of the smallest working size then
    checks the meta answer. If that disagrees, the model cannot run on meta tensors (the largest size fails there),
    or a real forward of the largest size costs less than half a meta one after the memos are warm (LSTMs,
    CrossViT on CPU), every size gets a real forward, memoized by module; if a module changes its attributes from
    one size to the next (state the memo cannot see), every size gets a plain real forward. `exhaustive=True` is
    one plain real forward per size: the reference the fast path is tested against.
    """
    sizes = sorted({int(s) for s in sizes})
    was_training = model.training
    model.eval()
    try:
        if exhaustive:
            return _real_failures(model, sizes, in_chans)
        try:
            with _memoized_modules(model):
                ops, probe, largest_first = _MetaOpMemo(), _EachSize(model, in_chans), sizes[::-1]
                state = {f'model.{n}': t.to('meta')
                         for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
                failures, meta_cost = _timed(_meta_failures, probe, state, largest_first[:1], ops)
                use_meta, done = not failures, 1
                if use_meta and meta_cost <= _SLOW_META_S:  # the first size filled the memos: time a few more
                    warm, warm_cost = _timed(_meta_failures, probe, state, largest_first[1:1 + _WARM_SIZES], ops)
                    failures.update(warm)
                    done += min(_WARM_SIZES, len(sizes) - 1)
                    meta_cost = warm_cost / max(1, done - 1)
                slow = meta_cost > _SLOW_META_S if done == 1 else meta_cost * (len(sizes) - done) > _COMPARE_ABOVE_S
                if use_meta and slow:
                    real_first, real_cost = _timed(_real_failures, model, largest_first[:1], in_chans)
                    # meta must win clearly: a real forward of the largest size costs the most a real one can
                    use_meta = not real_first and meta_cost <= real_cost / 2
                _logger.debug('size probe: meta %.4f s per size, %s', meta_cost, 'meta' if use_meta else 'real')
                if use_meta:
                    failures.update(_meta_failures(probe, state, largest_first[done:], ops))
            kept = [s for s in sizes if s not in failures]
            if not use_meta or _real_failures(model, kept[:1], in_chans):
                # real is cheaper, no meta kernel, a data-dependent forward, or meta disagrees with a real forward
                _logger.debug('size probe: real forwards (meta: %s)', failures.get(sizes[-1], 'slower or wrong'))
                with _memoized_modules(model):
                    failures = _real_failures(model, largest_first, in_chans, watch=True)
        except _StateChanged:
            _logger.debug('size probe: a module keeps state between sizes; plain real forwards')
            failures = _real_failures(model, sizes, in_chans)
    finally:
        model.train(was_training)
    return dict(sorted(failures.items()))


def probe_input_sizes_once(model: nn.Module, sizes: Sequence[int], in_chans: int = 3) -> Dict[int, str]:
    """`probe_input_sizes`, run once under torch.distributed: rank 0 probes and broadcasts its answer.

    Every rank holds the same architecture, so one probe answers for all, and every rank then draws from the same
    sizes. Without a process group of several ranks it is `probe_input_sizes`. An unexpected error of the probe on
    rank 0 is raised on every rank (no rank is left waiting in the broadcast).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return probe_input_sizes(model, sizes, in_chans)
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            answer = [probe_input_sizes(model, sizes, in_chans)]
        except Exception as e:  # noqa: BLE001 -- handed to every rank below
            answer = [RuntimeError(f'the input size probe failed on rank 0: {describe_error(e)}')]
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


# Fewer working sizes below the training size than this, out of a range that lost some, and the smaller-input
# branch is as good as off: say so as a warning (see `few_sizes_warning`).
FEW_SIZES = 3


def _model_name(model: nn.Module) -> str:
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__


def few_sizes_warning(
        model: nn.Module, sizes: Sequence[int], kept: Sequence[int], full_size: int, failures: Dict[int, str]) -> str:
    """A warning when the probe left fewer than FEW_SIZES sizes below `full_size` of a requested range; '' if not.

    Training goes on (subnets still drop blocks), but ST++'s smaller inputs are then in effect off, which the user
    should know and choose: turn them off explicitly, or name sizes the model takes. Nothing is said when every
    requested size was kept (a short --stim-sizes list is the user's choice).
    """
    smaller = [s for s in kept if s < full_size]
    dropped = sorted(s for s in sizes if s in failures and s < full_size)
    if not dropped or not smaller or len(smaller) >= FEW_SIZES:
        return ''
    requested = sorted(s for s in sizes if s < full_size)
    return (f'{_model_name(model)} takes only {len(smaller)} of the {len(requested)} subnet input sizes '
            f'{requested[0]}..{requested[-1]} below the training size {full_size} '
            f'(kept: {", ".join(map(str, smaller))}; the others fail, e.g. {dropped[0]} px: {failures[dropped[0]]}), '
            f'so ST++\'s smaller-input branch is in effect off: subnets train at {", ".join(map(str, kept))} px. '
            f'Choose: --stim-min-scale 1 turns smaller inputs off (and this warning), --stim-sizes draws sizes the '
            f'model takes.')


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
    name = _model_name(model)
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
