"""Reading trained weights and rebuilding models: the one place every entry point loads a checkpoint from.

train_stim.py (--resume, the final weights), ``python -m timm_stim.hub``, ``python -m timm_stim.loafing`` and the
Python API all go through these functions, so a checkpoint is read, checked and turned into a model one way.

Checkpoints, run folders and downloaded files are untrusted: checkpoints are loaded with ``weights_only=True`` (only
tensors, containers, numbers and timm's argparse args), ``args.yaml`` with ``yaml.safe_load``; nothing here writes a
file. A model source is one of:

* a timm / train_stim.py output folder (``args.yaml`` + ``model_best.pth.tar`` / ``last.pth.tar``): the folder alone
  is enough, the architecture, classifier size and ``--model-kwargs`` come from its ``args.yaml``;
* a checkpoint file (``.pth.tar``, ``.pth``, ``.safetensors``), with ``args.yaml`` next to it or ``--model``;
* a plain timm model folder (``config.json`` + weights, what ``timm_stim.model_folder`` writes), ``local-dir:PATH`` or
  ``hf-hub:owner/name``, read by timm itself.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import yaml

import timm
from timm.models import is_model, split_model_name_tag

from .cli import one_line

__all__ = [
    'CHECKPOINT_NAMES', 'CONFIG_NAME', 'DATA_CONFIG_KEYS', 'WEIGHTS_NAME', 'ModelSource', 'check_model_name',
    'clean_state_dict', 'create_model_from_source', 'data_config_from_args', 'find_run_checkpoint',
    'first_non_finite', 'is_export_folder', 'load_checkpoint_into', 'load_state_dict_strict',
    'model_kwargs_from_args', 'read_checkpoint', 'read_checkpoint_metadata', 'read_run_args',
    'read_training_checkpoint', 'resolve_model_source', 'sanitize_saver_state', 'select_state_dict',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
ARGS_NAME = 'args.yaml'
# checkpoint files of a timm output folder, by --checkpoint choice; 'best' falls back to the others (no eval runs)
CHECKPOINT_NAMES = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}
_FALLBACK_CHECKPOINTS = ('last.pth.tar', 'checkpoint.pth.tar')
# preprocessing keys of a timm data config, as train.py args, pretrained_cfg and config.json name them
DATA_CONFIG_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
# train.py args that are timm.create_model kwargs (drop rates do not matter for inference)
_CREATE_ARGS = ('in_chans', 'global_pool', 'bn_momentum', 'bn_eps')
_STRIPPED_PREFIXES = ('module.', '_orig_mod.')  # DDP and torch.compile wrappers
_ZIP_MAGIC = b'PK\x03\x04'
_REFUSED_GLOBAL_RE = re.compile(r'GLOBAL ([\w.]+)')


# --------------------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: Union[str, Path]) -> Any:
    """Contents of a checkpoint file, loaded without running code from it (timm's args Namespace allowed).

    Raises FileNotFoundError for a missing file and ValueError with a one-line reason for anything else: a folder,
    a file that is not a PyTorch checkpoint, a pickle the safe loader refuses, a truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if path.is_dir():
        raise ValueError(f'checkpoint {path} is a directory, not a file; pass the checkpoint file inside it '
                         f'(e.g. {path / CHECKPOINT_NAMES["last"]})')
    if path.suffix == '.safetensors':
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:
            raise ValueError(f'cannot read checkpoint {path}: not a valid safetensors file ({one_line(e)[:200]})') \
                from None
    with path.open('rb') as f:
        head = f.read(4)
    if not head.startswith((_ZIP_MAGIC, b'\x80')):  # torch.save writes a zip archive, legacy files a pickle
        shown = head.decode('ascii', 'replace') if head else 'an empty file'
        raise ValueError(f'cannot read checkpoint {path}: not a PyTorch checkpoint (starts with {shown!r}, '
                         'neither a zip archive nor a pickle); pass a .pth / .pth.tar / .safetensors file')
    # timm's train script stores its argparse.Namespace args in checkpoints: allow it, nothing else
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    allow_args = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
    try:
        with allow_args:
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL_RE.search(str(e))
        if refused:
            raise ValueError(
                f'cannot read checkpoint {path}: it holds a {refused.group(1)} object, which the safe loader '
                '(torch.load weights_only=True) refuses to unpickle; save only tensors, e.g. '
                'torch.save({"state_dict": model.state_dict()}, path)') from None
        raise ValueError(f'cannot read checkpoint {path}: truncated or corrupt pickle') from None
    except Exception as e:
        raise ValueError(f'cannot read checkpoint {path}: truncated or corrupt ({one_line(e)[:160]})') from None


def read_checkpoint_metadata(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """A checkpoint's entries with its tensors memory-mapped (cheap for big files); None when it cannot be read."""
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    try:
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            contents = torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return None
    return contents if isinstance(contents, dict) else None


def read_training_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A timm / train_stim.py training checkpoint (a dict with 'state_dict'), e.g. for --resume."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise ValueError(f'{path} is not a train_stim / timm training checkpoint (no state_dict)')
    return checkpoint


def select_state_dict(
        checkpoint: Any,
        use_ema: bool = False,
        path: Union[str, Path] = 'checkpoint',
) -> Tuple[Dict[str, torch.Tensor], str]:
    """The model weights of a checkpoint and the key they came from ('' for a bare state dict)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict of weights')
    for key in ('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], key
    if use_ema:
        raise ValueError(f'--use-ema: checkpoint {path} has no EMA weights (state_dict_ema / model_ema)')
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, ''
    raise ValueError(
        f'checkpoint {path} has no model weights: expected a state dict or a dict with '
        f"'state_dict' / 'model' (found keys: {', '.join(map(str, list(checkpoint)[:8]))})")


def first_non_finite(tensors: Dict[str, Any]) -> Optional[str]:
    """Name of the first floating-point tensor holding a NaN or an infinity, None when all are finite.

    One max-abs (`torch._foreach_norm(ord=inf)`, NaN-propagating, no overflow) per device and dtype, then one host
    sync per group: cheap enough to run before every checkpoint, never per training step.
    """
    groups: Dict[Tuple[Any, Any], List[Tuple[str, torch.Tensor]]] = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and value.numel():
            groups.setdefault((value.device, value.dtype), []).append((name, value.detach()))
    for group in groups.values():
        try:
            peaks = torch.stack(torch._foreach_norm([t for _, t in group], ord=math.inf))
        except (RuntimeError, TypeError, AttributeError):  # a dtype or device without the fused kernel
            peaks = torch.stack([t.abs().max() for _, t in group])
        finite = torch.isfinite(peaks)
        if not bool(finite.all()):
            return group[int((~finite).nonzero()[0])][0]
    return None


def clean_state_dict(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Keys without the DDP (``module.``) and torch.compile (``_orig_mod.``) wrapper prefixes."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_STRIPPED_PREFIXES):
            key = key.split('.', 1)[1]
        cleaned[key] = value
    return cleaned


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, Any], path: Union[str, Path]) -> None:
    """Load ``state_dict`` into ``model``; a mismatch is one ValueError naming the first differing keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        def _few(items: List[str]) -> str:
            return ', '.join(items[:3]) + (f' (+{len(items) - 3} more)' if len(items) > 3 else '')
        problems = [f'{name}: {_few(items)}' for name, items in (
            ('missing', missing), ('unexpected', unexpected), ('shape mismatch', mis_shaped)) if items]
        raise ValueError(
            f'checkpoint {path} does not match {type(model).__name__}: ' + '; '.join(problems)
            + '; check --model, --num-classes and --model-kwargs match the training run')
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_into(model: nn.Module, checkpoint_path: Union[str, Path], use_ema: bool = False) -> str:
    """Load a train checkpoint (or a bare state dict / .safetensors file) into ``model`` with strict key matching.

    Returns the checkpoint key the weights came from ('' for a bare state dict).
    """
    state_dict, key = select_state_dict(read_checkpoint(checkpoint_path), use_ema, checkpoint_path)
    load_state_dict_strict(model, clean_state_dict(state_dict), checkpoint_path)
    return key


# ------------------------------------------------------------------------------------------------------ run folders


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sanitize_saver_state(
        state: Any,
        checkpoint_dir: Union[str, Path],
        prefix: str = 'checkpoint',
        extension: str = '.pth.tar',
        decreasing: bool = False,
) -> Tuple[Dict[str, Any], List[str]]:
    """timm CheckpointSaver bookkeeping (`checkpoint['saver']`) made safe to restore into `checkpoint_dir`.

    A checkpoint is untrusted: its history names files the saver later deletes, and its best metric decides whether
    model_best is written. Kept are only history entries that are plain `<prefix>-<epoch><extension>` names of
    regular files in `checkpoint_dir`, each with the metric stored in that file itself (the claimed one must match
    and be finite or None); the best metric and epoch are those stored in the folder's model_best file. Returns
    ({checkpoint_files: [(path, metric)], best_metric, best_epoch}, one warning per dropped item).
    """
    folder = Path(checkpoint_dir)
    pattern = re.compile(rf'^{re.escape(prefix)}-(\d{{1,9}}){re.escape(extension)}$')
    dropped: List[str] = []
    state = state if isinstance(state, dict) else {}
    claimed = state.get('checkpoint_files')
    entries = list(claimed) if isinstance(claimed, (list, tuple)) else []
    if claimed is not None and not isinstance(claimed, (list, tuple)):
        dropped.append(f'checkpoint history {type(claimed).__name__} (not a list)')
    pending = state.get('pending')
    if isinstance(pending, (list, tuple)) and len(pending) == 2 and isinstance(pending[0], int) \
            and not isinstance(pending[0], bool) and 0 <= pending[0] < 10 ** 9:
        entries.append((f'{prefix}-{pending[0]}{extension}', pending[1]))  # the checkpoint the state came with
    elif pending not in (None, (None, None), [None, None]):
        dropped.append(f'pending entry {pending!r:.80}')
    kept: List[Tuple[str, Optional[float]]] = []
    for entry in entries:
        name, metric = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (entry, None)
        match = pattern.match(name) if isinstance(name, str) else None
        path = folder / name if match else None
        if path is None or path.is_symlink() or not path.is_file():
            dropped.append(f'history entry {name!r:.80} (not a {prefix}-N{extension} file in {folder})')
            continue
        stored = (read_checkpoint_metadata(path) or {}).get('metric')
        if not (metric is None or _finite_number(metric)) or metric != stored:
            dropped.append(f'history entry {name} (metric {metric!r:.40} is not the finite metric stored in it)')
            continue
        if str(path) not in [p for p, _ in kept]:
            kept.append((str(path), metric))
    ranked = sorted([k for k in kept if k[1] is not None], key=lambda k: k[1], reverse=not decreasing)
    best = read_checkpoint_metadata(folder / f'model_best{extension}') or {}
    best_metric, best_epoch = best.get('metric'), best.get('epoch')
    if not _finite_number(best_metric) or not isinstance(best_epoch, int):
        best_metric, best_epoch = None, None
    if state.get('best_metric') != best_metric:
        dropped.append(f"best metric {state.get('best_metric')!r:.40} (model_best holds {best_metric})")
    return dict(checkpoint_files=ranked + [k for k in kept if k[1] is None], best_metric=best_metric,
                best_epoch=best_epoch), dropped



def read_run_args(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """Training args of a timm output folder (its ``args.yaml``, safely parsed); {} when there is none."""
    args_file = Path(run_dir) / ARGS_NAME
    if not args_file.is_file():
        return {}
    try:
        loaded = yaml.safe_load(args_file.read_text(encoding='utf-8'))
    except yaml.YAMLError as e:
        raise ValueError(f'cannot read {args_file}: {one_line(e)[:200]}') from None
    return loaded if isinstance(loaded, dict) else {}


def data_config_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """Preprocessing recorded in training args (timm train.py names); img_size only when there is no input_size."""
    config = {k: args[k] for k in DATA_CONFIG_KEYS if args.get(k) not in (None, '')}
    if 'input_size' not in config and args.get('img_size'):
        config['img_size'] = args['img_size']
    return config


def model_kwargs_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """timm.create_model kwargs a training run used: its --model-kwargs plus train.py's creation args."""
    kwargs = {k: args[k] for k in _CREATE_ARGS if args.get(k) is not None}
    extra = args.get('model_kwargs')
    if isinstance(extra, dict):
        kwargs.update(extra)
    return kwargs


def find_run_checkpoint(folder: Union[str, Path], which: str = 'best') -> Path:
    """The ``which`` checkpoint of an output folder ('best', 'last' or a file name); 'best' falls back to the last
    one, for runs without evaluation."""
    folder = Path(folder)
    names = [CHECKPOINT_NAMES.get(which, which)] + (list(_FALLBACK_CHECKPOINTS) if which == 'best' else [])
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        present = ', '.join(sorted(p.name for p in folder.glob('*.pth.tar'))) or 'none'
        raise FileNotFoundError(
            f'{folder}: no {names[0]} (checkpoints there: {present}) and no timm model folder '
            f'({CONFIG_NAME} + {WEIGHTS_NAME}); choose one with --checkpoint best|last|FILE')
    return found


def is_export_folder(path: Union[str, Path]) -> bool:
    """True for a plain timm model folder (config.json + model.safetensors or pytorch_model.bin), which timm's
    ``local-dir:`` loader reads and ``timm_stim.model_folder`` writes."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (
        (path / WEIGHTS_NAME).is_file() or (path / 'pytorch_model.bin').is_file())


def check_model_name(name: str) -> str:
    """``name`` if timm knows the architecture, else ValueError with close matches."""
    if not is_model(split_model_name_tag(name)[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ''
        raise ValueError(
            f"unknown timm model '{name}'{hint}; list names with "
            "`python -c \"import timm; print(timm.list_models('*pattern*'))\"`")
    return name


# ---------------------------------------------------------------------------------------------------- model sources


@dataclass
class ModelSource:
    """A resolved model source: what to build and where its weights and training record come from."""
    source: str
    kind: str  # 'train_dir', 'checkpoint', 'local_dir' or 'hub'
    label: str
    model_name: str
    num_classes: Optional[int] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    weights: str = 'pretrained'  # checkpoint key of the weights, 'state_dict' for a bare state dict
    train_args: Dict[str, Any] = field(default_factory=dict)
    data_config: Dict[str, Any] = field(default_factory=dict)
    state_dict: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)

    def info(self) -> Dict[str, Any]:
        """JSON-friendly description (no weights), e.g. for loafing.json."""
        return dict(kind=self.kind, checkpoint=str(self.checkpoint) if self.checkpoint else None,
                    weights=self.weights, model_name=self.model_name, train_args=self.train_args,
                    data_config=self.data_config, label=self.label, source=self.source,
                    num_classes=self.num_classes, model_kwargs=self.model_kwargs)


def _train_args(checkpoint: Any, folder: Path) -> Dict[str, Any]:
    """Training args: the folder's args.yaml, overridden by the args stored in the checkpoint."""
    args = read_run_args(folder)
    stored = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(stored, argparse.Namespace):
        stored = vars(stored)
    if isinstance(stored, dict):
        args.update(stored)
    return args


def _head_classes(model_name: str, state_dict: Dict[str, torch.Tensor], model_kwargs: Dict[str, Any]) -> Optional[int]:
    """Classifier size read off the checkpoint's head weight (the head's name comes from timm's pretrained_cfg)."""
    with torch.device('meta'):
        probe = timm.create_model(model_name, pretrained=False, **model_kwargs)
    head = probe.pretrained_cfg.get('classifier')
    for name in head if isinstance(head, (tuple, list)) else [head] if head else []:
        weight = state_dict.get(f'{name}.weight')
        if isinstance(weight, torch.Tensor) and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def _default_label(path: Path) -> str:
    if path.is_file() and path.name in (*CHECKPOINT_NAMES.values(), *_FALLBACK_CHECKPOINTS):
        return path.parent.name
    return path.name if path.is_dir() else path.stem.replace('.pth', '')


def _timm_folder_source(text: str, num_classes: Optional[int], model_kwargs: Dict[str, Any]) -> ModelSource:
    """hf-hub:/local-dir: sources: timm reads the architecture, classes and preprocessing from config.json."""
    kind = 'hub' if text.startswith('hf-hub:') else 'local_dir'
    return ModelSource(source=text, kind=kind, label=text.split(':', 1)[1].rstrip('/').split('/')[-1],
                       model_name=text, num_classes=num_classes, model_kwargs=dict(model_kwargs))


def resolve_model_source(
        source: Union[str, Path],
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint: str = 'best',
        use_ema: bool = False,
) -> ModelSource:
    """Check a model source and work out how to build it, before any model is created.

    Args:
        source: 'hf-hub:owner/name', 'local-dir:/path', a timm model folder (config.json + weights), a training
            output folder (args.yaml + checkpoints; its hf_export/ is used when it has no checkpoint), or a
            checkpoint file.
        model_name: timm architecture; default from the run's args, else the checkpoint's 'arch'.
        num_classes: classifier size; default from the run's args, else read off the checkpoint's head.
        model_kwargs: extra timm.create_model kwargs, overriding the run's.
        checkpoint: checkpoint of a training folder: 'best' (default), 'last' or a file name.
        use_ema: take the checkpoint's EMA weights.
    """
    model_kwargs = dict(model_kwargs or {})
    text = str(source)
    path = Path(text)
    if text.startswith(('hf-hub:', 'local-dir:')):
        return _timm_folder_source(text, num_classes, model_kwargs)
    if path.is_dir() and not any(path.glob('*.pth.tar')):
        export = next((p for p in (path, path / 'hf_export') if is_export_folder(p)), None)
        if export is not None:
            resolved = _timm_folder_source(f'local-dir:{export}', num_classes, model_kwargs)
            resolved.label = path.name
            return resolved
    if path.is_dir():
        ckpt_path = find_run_checkpoint(path, checkpoint)
    elif path.is_file():
        ckpt_path = path
    else:
        raise FileNotFoundError(f'model source {text!r} does not exist (expected a file, a folder, hf-hub:NAME or '
                                'local-dir:PATH)')
    contents = read_checkpoint(ckpt_path)
    train_args = _train_args(contents, ckpt_path.parent)
    # timm's CheckpointSaver stores 'arch' = args.model, or the lower-cased class name ('resnet') without args
    arch = contents.get('arch') if isinstance(contents, dict) else None
    name = model_name or train_args.get('model') or (arch if isinstance(arch, str) and is_model(arch) else None)
    if not name:
        raise ValueError(f'{ckpt_path}: --model is required, the checkpoint names no architecture (no args.yaml '
                         'next to it, no "arch" or "args" in it); pass --model NAME (and --num-classes)')
    check_model_name(name)
    state_dict, key = select_state_dict(contents, use_ema, ckpt_path)
    state_dict = clean_state_dict(state_dict)
    kwargs = {**model_kwargs_from_args(train_args), **model_kwargs}
    classes = num_classes or train_args.get('num_classes') or _head_classes(name, state_dict, kwargs)
    return ModelSource(
        source=text, kind='train_dir' if path.is_dir() else 'checkpoint', label=_default_label(path),
        model_name=name, num_classes=classes, model_kwargs=kwargs, checkpoint=ckpt_path,
        weights=key or 'state_dict', train_args=train_args, data_config=data_config_from_args(train_args),
        state_dict=state_dict)


def _data_config_from_model(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {k: cfg[k] for k in DATA_CONFIG_KEYS if cfg.get(k) is not None}


def create_model_from_source(
        source: Union[str, Path, ModelSource],
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint: str = 'best',
        use_ema: bool = False,
        device: Optional[Union[str, torch.device]] = None,
) -> Tuple[nn.Module, ModelSource]:
    """Build a trained plain timm model (eval mode) from any model source; see ``resolve_model_source``.

    Returns the model and its resolved source (architecture, classes, kwargs, training args, data config).
    """
    resolved = source if isinstance(source, ModelSource) else resolve_model_source(
        source, model_name, num_classes, model_kwargs, checkpoint, use_ema)
    if resolved.checkpoint is None:
        kwargs = dict(resolved.model_kwargs, **({'num_classes': resolved.num_classes} if resolved.num_classes else {}))
        try:  # timm reads config.json and the weights (weights_only for pickles, or safetensors)
            model = timm.create_model(resolved.model_name, pretrained=True, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, OSError, TypeError, KeyError) as e:
            refused = _REFUSED_GLOBAL_RE.search(str(e))
            why = (f'its weights hold a {refused.group(1)} object, which the safe loader refuses to unpickle'
                   if refused else f'{type(e).__name__}: {one_line(e)[:200]}')
            raise ValueError(f'cannot load {resolved.source}: {why}; export it again with timm_stim.model_folder '
                             '(safetensors weights)') from None
        resolved.model_name = model.pretrained_cfg.get('architecture') or resolved.model_name
        resolved.data_config = _data_config_from_model(model)
    else:
        try:
            model = timm.create_model(
                resolved.model_name, pretrained=False, num_classes=resolved.num_classes, **resolved.model_kwargs)
        except TypeError as e:
            raise ValueError(f'cannot create {resolved.model_name} with {resolved.model_kwargs}: {e}') from None
        load_state_dict_strict(model, resolved.state_dict, resolved.checkpoint)
        resolved.state_dict = None  # the model holds the weights now
    resolved.num_classes = getattr(model, 'num_classes', resolved.num_classes)
    if device is not None:
        model.to(device)
    return model.eval(), resolved
