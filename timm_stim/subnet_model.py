"""Turn a subnetwork of a timm model into a smaller plain timm model.

A subnet (`timm_stim.skip.subnet`) skips residual blocks in place. For deployment the skipped blocks should not
exist at all: `create_subnet_model` builds the same architecture with fewer blocks through timm's own constructor
argument (ResNet `layers`, ViT/DeiT/EVA/BEiT `depth`, ConvNeXt/Swin/MetaFormer `depths`, ...), copies the weights of
the blocks that run, renumbered, and checks that every tensor is accounted for and that the logits are those of the
in-place subnet. The result is an ordinary timm model: `timm.create_model(name, **model_args)` rebuilds it.

The depth argument is not looked up in a table of families. Blocks live in indexed containers (`layer2.3`,
`blocks.7`, `stages.2.blocks.5`); a constructor parameter whose name speaks of depth, layers, blocks or repeats
is tried with the kept block count in total or per container, and accepted when the model it builds has exactly
the renumbered state-dict keys and shapes the subnet calls for.

    layout = find_residual_blocks(model)
    small = create_subnet_model(model, layout, (1, 1, 2, 1), input_size=(3, 64, 64))
    small.model      # plain timm ResNet with layers=(1, 1, 2, 1)
    small.model_args # {'num_classes': 10, 'layers': (1, 1, 2, 1)}: what config.json records
"""
from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm

from .blocks import BlockLayout, SubnetSpec
from .skip import SpecLike, resolve_spec, subnet
from .cli import one_line

__all__ = [
    'SUPPORTED_FAMILIES', 'SubnetExportError', 'UnsupportedFamilyError', 'SubnetModel', 'DepthArgument',
    'find_depth_argument', 'create_subnet_model',
]

SUPPORTED_FAMILIES = (
    'families whose constructor takes the block count in total or per stage, e.g. ResNet/ResNeXt/SE-ResNet/ResNetV2 '
    '(layers), ViT/DeiT/EVA/BEiT/CaiT (depth), ConvNeXt/Swin (depths)')
# Constructor parameters that may hold block counts: the name speaks of depth, layers, blocks, repeats or stages.
_DEPTH_PARAM = re.compile(r'depth|layers|blocks|repeat|^stages$', re.IGNORECASE)
# create_model kwargs that are about loading or running, not the architecture; drop rates do nothing in eval mode.
_RUNTIME_ARGS = {
    'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args', 'checkpoint_path', 'cache_dir',
    'device', 'dtype', 'scriptable', 'exportable', 'no_jit'}
_DROP_RATE = re.compile(r'(^|_)drop(_path|_block)?_rate$')
DepthValue = Union[int, Tuple[int, ...]]


class SubnetExportError(RuntimeError):
    """Building the smaller model failed: weights do not line up, or its logits differ from the subnet's."""


class UnsupportedFamilyError(ValueError):
    """No constructor argument of the model's family can express the subnet's depth."""


@dataclass(frozen=True)
class DepthArgument:
    """The constructor kwarg that sets block counts, and its value for one subnet."""
    name: str
    value: DepthValue


@dataclass
class SubnetModel:
    """A subnet built as a smaller plain timm model.

    `model_args` are the `timm.create_model` kwargs that rebuild it (the parent's creation kwargs plus the depth
    argument); `key_map` maps each of its state-dict keys to the parent's key the tensor was copied from.
    """
    model: nn.Module
    model_name: str
    model_args: Dict[str, Any]
    depth_argument: DepthArgument
    spec: SubnetSpec
    depths: Tuple[int, ...]
    key_map: Dict[str, str] = field(repr=False)
    max_logit_diff: Optional[float] = None  # largest logit difference to the in-place subnet (over scale), if checked


# ------------------------------------------------------------------------------------------------ key renumbering


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None)
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    if not arch or not timm.is_model(arch):
        raise UnsupportedFamilyError(
            f'{type(model).__name__} is not a model built by timm.create_model (no registered architecture in its '
            f'pretrained_cfg); build it with timm.create_model and unwrap any training wrapper')
    return arch


def _block_containers(model: nn.Module, layout: BlockLayout) -> List[str]:
    """Paths of the indexed containers holding the layout's blocks, in execution order."""
    containers: List[str] = []
    for path in layout.paths:
        parent, _, index = path.rpartition('.')
        if not index.isdigit():
            raise UnsupportedFamilyError(
                f'{_architecture(model)}: block {path!r} is not an indexed member of a container, so no block count '
                f'argument can drop it; supported are {SUPPORTED_FAMILIES}')
        if parent not in containers:
            containers.append(parent)
    return containers


def _renumbering(model: nn.Module, containers: Sequence[str], dropped: set) -> Dict[str, str]:
    """New path of every surviving indexed child of the block containers (`layer2.3` -> `layer2.1`)."""
    renamed = {}
    for container in containers:
        children = [name for name in model.get_submodule(container)._modules if name.isdigit()]
        survivors = [name for name in children if f'{container}.{name}' not in dropped]
        renamed.update({f'{container}.{old}': f'{container}.{new}' for new, old in enumerate(survivors)})
    return renamed


def _rename_key(key: str, renamed: Dict[str, str]) -> str:
    parts = key.split('.')
    for i in range(1, len(parts)):
        prefix = '.'.join(parts[:i])
        if prefix in renamed:
            return '.'.join([renamed[prefix], *parts[i:]])
    return key


def _subnet_key_map(
        model: nn.Module, layout: BlockLayout, spec: SubnetSpec, containers: Sequence[str],
) -> Dict[str, str]:
    """New state-dict key -> parent key, for every tensor the subnet keeps (those of dropped blocks are left out)."""
    dropped = {path for path, keep in zip(layout.paths, spec.keep) if not keep}
    renamed = _renumbering(model, containers, dropped)
    key_map = {}
    for key in model.state_dict():
        if any(key.startswith(path + '.') for path in dropped):
            continue
        key_map[_rename_key(key, renamed)] = key
    return key_map


# -------------------------------------------------------------------------------------------- depth argument search


def _creation_args(model: nn.Module, model_args: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The kwargs the parent was created with (recorded by timm.create_model), less loading and runtime options."""
    args = {**getattr(model, '_model_args', {}), **(model_args or {})}
    args = {k: v for k, v in args.items() if k not in _RUNTIME_ARGS and not _DROP_RATE.search(k) and v is not None}
    if getattr(model, 'num_classes', None) is not None:
        args['num_classes'] = model.num_classes
    return args


def _is_count(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _depth_candidates(model: nn.Module, recorded: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """Constructor parameters that may set block counts, with their default (or recorded) value. A constructor
    that forwards **kwargs to its base class (DeiT's distilled ViT) also takes the base class's parameters."""
    params: Dict[str, inspect.Parameter] = {}
    for cls in type(model).__mro__:
        if cls is nn.Module or '__init__' not in vars(cls):
            continue
        try:
            own = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            break
        params.update({k: v for k, v in own.items() if k not in params})
        if not any(p.kind == p.VAR_KEYWORD for p in own.values()):
            break
    candidates = []
    for name, param in params.items():
        if not _DEPTH_PARAM.search(name) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = recorded.get(name, param.default)
        if value is param.empty or _is_count(value):
            candidates.append((name, value))
    return candidates


def _value_forms(counts: Sequence[int], current: Any, per_stage: Sequence[int] = ()) -> List[DepthValue]:
    """The subnet's block counts as the parameter takes them: one total for a flat model, else one per container,
    or one per stage of the layout when all stages share one container (Hiera's `stages`)."""
    per_container = tuple(int(c) for c in counts)
    if isinstance(current, int) and not isinstance(current, bool):
        # a flat count: of all blocks, or of one container when others are counted by other parameters (CaiT)
        return list(dict.fromkeys([sum(per_container), *per_container]))
    if isinstance(current, (tuple, list)):
        if len(current) == len(per_container):
            return [per_container]
        return [tuple(int(c) for c in per_stage)] if per_stage and len(current) == len(per_stage) else []
    return [per_container] + ([per_container[0]] if len(per_container) == 1 else [])


def _build(model_name: str, kwargs: Dict[str, Any], meta: bool) -> nn.Module:
    if meta:
        with torch.device('meta'):
            return timm.create_model(model_name, pretrained=False, **kwargs)
    return timm.create_model(model_name, pretrained=False, **kwargs)


def _shapes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def find_depth_argument(
        model: nn.Module,
        layout: BlockLayout,
        spec: SpecLike,
        model_args: Optional[Dict[str, Any]] = None,
) -> Tuple[DepthArgument, Dict[str, str]]:
    """The constructor kwarg (and its value) that builds `model`'s architecture with only the blocks `spec` keeps.

    Each candidate parameter is tried on the meta device (no memory, no weights) and accepted when the model it
    builds has exactly the state-dict keys and shapes of the renumbered subnet. Returns it and the key map (new key
    -> parent key). Raises UnsupportedFamilyError, naming the supported families, when no parameter fits.
    """
    model_name = _architecture(model)
    spec = resolve_spec(layout, spec)
    containers = _block_containers(model, layout)
    key_map = _subnet_key_map(model, layout, spec, containers)
    parent = model.state_dict()
    expected = {new: tuple(parent[old].shape) for new, old in key_map.items()}
    counts = [sum(k for p, k in zip(layout.paths, spec.keep) if p.rpartition('.')[0] == c) for c in containers]
    base = _creation_args(model, model_args)
    tried = []
    for name, current in _depth_candidates(model, base):
        forms = _value_forms(counts, current, layout.depths(spec))
        if not forms:
            tried.append(f'{name} (takes {len(current)} values, the blocks sit in {len(containers)} containers)')
        for value in forms:
            tried.append(f'{name}={value}')
            try:
                probe = _build(model_name, {**base, name: value}, meta=True)
            except Exception as e:  # e.g. the entrypoint fixes this argument itself
                tried[-1] += f' (fails: {one_line(e)[:80]})'
                continue
            if _shapes(probe.state_dict()) == expected:
                return DepthArgument(name, value), key_map
            tried[-1] += ' (builds other blocks)'
    detail = f"tried {', '.join(tried)}" if tried else 'its constructor has no block-count parameter'
    raise UnsupportedFamilyError(
        f'cannot export subnets of {model_name} ({type(model).__name__}): no constructor argument sets its block '
        f'counts ({detail}); supported are {SUPPORTED_FAMILIES}')


# ------------------------------------------------------------------------------------------------------- building


def _device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device('cpu'), torch.float32
    return param.device, param.dtype


@torch.no_grad()
def _max_logit_difference(
        parent: nn.Module, layout: BlockLayout, spec: SubnetSpec, small: nn.Module, input_size: Sequence[int],
) -> float:
    """Largest absolute logit difference between the in-place subnet and the smaller model on a fixed input,
    over the logits' scale (at least 1)."""
    device, dtype = _device_dtype(parent)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    was_training = parent.training
    try:
        parent.eval()
        with subnet(parent, layout, spec):
            expected = parent(x)
    finally:
        parent.train(was_training)
    scale = max(1.0, float(expected.abs().max()))
    return float((small.eval()(x) - expected).abs().max()) / scale


def create_subnet_model(
        model: nn.Module,
        layout: BlockLayout,
        spec: SpecLike,
        model_args: Optional[Dict[str, Any]] = None,
        input_size: Optional[Sequence[int]] = None,
        atol: float = 1e-4,
) -> SubnetModel:
    """Build the subnet `spec` of `model` as a smaller plain timm model with the same weights.

    Args:
        model: a timm model (from timm.create_model; its creation kwargs are read from it).
        layout: its residual-block layout (`find_residual_blocks`, pseudo-staged layouts are fine).
        spec: SubnetSpec, per-stage depth vector (prefix rule) or per-block keep-mask.
        model_args: creation kwargs of `model` that timm did not record (they override the recorded ones).
        input_size: (C, H, W) of a check forward; when given, the smaller model's logits must equal the in-place
            subnet's within `atol` (relative to the logits' scale), else SubnetExportError.
        atol: tolerance of that check.

    The smaller model gets a copy of `model`'s pretrained_cfg (preprocessing), is on `model`'s device and dtype,
    and is in eval mode. `model` itself is not changed.
    """
    spec = resolve_spec(layout, spec)
    model_name = _architecture(model)
    depth_argument, key_map = find_depth_argument(model, layout, spec, model_args)
    args = {**_creation_args(model, model_args), depth_argument.name: depth_argument.value}
    small = _build(model_name, args, meta=False)
    parent = model.state_dict()
    target = small.state_dict()
    if set(target) != set(key_map):
        missing, extra = sorted(set(key_map) - set(target)), sorted(set(target) - set(key_map))
        raise SubnetExportError(f'{model_name} with {depth_argument.name}={depth_argument.value}: state dict differs '
                                f'from the subnet (missing {missing[:3]}, unexpected {extra[:3]})')
    device, dtype = _device_dtype(model)
    small.load_state_dict({new: parent[old].detach().clone() for new, old in key_map.items()}, strict=True)
    small.to(device=device, dtype=dtype)
    cfg = copy.deepcopy(getattr(model, 'pretrained_cfg', None) or {})
    if cfg:
        small.pretrained_cfg = cfg
        small.default_cfg = cfg
    small.eval()
    result = SubnetModel(
        model=small, model_name=model_name, model_args=args, depth_argument=depth_argument, spec=spec,
        depths=layout.depths(spec), key_map=key_map)
    if input_size is not None:
        diff = _max_logit_difference(model, layout, spec, small, input_size)
        result.max_logit_diff = diff
        if not diff <= atol:
            try:
                prefix = layout.spec_from_depths(result.depths) == spec
            except ValueError:  # depths no depth vector may ask for: a keep-mask
                prefix = False
            hint = ('the architecture runs code tied to a block index that this depth changes (e.g. Twins applies '
                    'its position encoding after the first block of a stage, so an empty stage drops it); keep at '
                    'least one block in every stage') if prefix else (
                    'a block behaves differently at its new index (e.g. Swin alternates shifted windows by index); '
                    'use a prefix depth vector (--depths) instead of this keep-mask')
            raise SubnetExportError(
                f'{model_name} with {depth_argument.name}={depth_argument.value}: logits differ from the in-place '
                f'subnet by up to {diff:.3g}: {hint}')
    return result
