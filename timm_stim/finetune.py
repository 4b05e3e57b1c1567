"""Make a trained model elastic: Stimulative Training as a short fine-tune (train_stim.py --finetune).

Most timm users start from weights they already have. ``--finetune SOURCE`` takes them from any source timm_stim
reads: a train_stim.py / timm run folder or checkpoint file, an export folder, ``local-dir:PATH``, ``hf-hub:NAME``,
or a timm pretrained tag (``resnet50.a1_in1k``); a bare ``--finetune`` takes what ``--pretrained``,
``--initial-checkpoint``, ``--pretrained-path`` or ``--model hf-hub:/local-dir:`` already name. The mode then

* builds the source's architecture with its weights (a new classifier only when ``--num-classes`` differs),
* fills every fine-tune setting the user did not give from :data:`FINETUNE_DEFAULTS` (measured:
  docs/results/finetune_digits.md) and logs each one,
* measures the source model's own subnets before training and the same subnets after (as trained and with BN
  re-estimated), so the run shows the gain (:func:`subnet_table`), and
* ends with ``--export-subnets pareto:3`` unless another spec is given.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import ModelSource, check_model_name, resolve_model_source
from .cli import UsageError, one_line

__all__ = ['FINETUNE_DEFAULTS', 'Finetune', 'prepare_finetune']

_logger = logging.getLogger(__name__)

# Settings of the fine-tune mode, each applied only when neither the command line nor -c sets the flag.
# Measured on the digits (docs/results/finetune_digits.md); the numbers behind each choice are in the README's
# "Make your trained model elastic" section.
FINETUNE_DEFAULTS: Dict[str, Any] = dict(
    stim='st',                   # ST's uniform depth sampling: the largest subnet gain per fine-tune epoch measured
    stim_main_logits='raw',      # timm's loss on the full network (ST++'s standardised one: 64 px / 3 ep collapse)
    stim_min_scale=1.0,          # smaller subnet inputs off: the trained model keeps its input size
    stim_bn='freeze',            # subnet passes leave the BN running statistics to the full network
    warmup_epochs=0,             # the weights are trained already: no warm-up from zero
    loafing_eval=16,             # subnets measured before and after (the same set)
    export_subnets='pareto:3',   # the deployable family at the end
)
FINETUNE_LR_FACTOR = 0.3         # lr = this x the lr the recipe would train from scratch with
FINETUNE_EPOCH_FRACTION = 0.2    # epochs = this x the source run's epochs, when its args.yaml says how many
FINETUNE_EPOCHS_UNKNOWN = 5      # epochs when the source does not say (timm tags, bare checkpoints, Hub models)
BN_RECAL_IMAGES = 500            # training images per subnet BN re-estimation in the before/after tables


@dataclass
class Finetune:
    """What --finetune resolved: the source, its weights (None when timm loads them), and the settings chosen."""
    source: str
    label: str
    state_dict: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)
    source_classes: Optional[int] = None
    chosen: List[Tuple[str, Any, str]] = field(default_factory=list)  # (flag, value, why)
    before: Optional[List[Dict[str, Any]]] = field(default=None, repr=False)  # the source's subnets (loafing rows)

    def describe(self) -> str:
        """One log line per choice, for the run's log and the model card."""
        return '; '.join(f"--{k.replace('_', '-')} {v} ({why})" for k, v, why in self.chosen)


def _given(args, dest: str) -> bool:
    return dest in getattr(args, 'explicit_keys', ())


def _source_from_flags(args) -> Finetune:
    """Bare --finetune: the trained model is what --pretrained / --initial-checkpoint / --pretrained-path /
    --model hf-hub:|local-dir: name; none of them is bad input."""
    if args.initial_checkpoint or args.pretrained_path or args.pretrained \
            or args.model.startswith(('hf-hub:', 'local-dir:')):
        where = args.initial_checkpoint or args.pretrained_path or args.model
        if args.model.startswith(('hf-hub:', 'local-dir:')):
            args.pretrained = True
        return Finetune(source=where, label=os.path.basename(str(where).rstrip('/')) or str(where))
    raise UsageError('--finetune needs a trained model: --finetune RUN_FOLDER|CHECKPOINT|EXPORT_FOLDER|local-dir:PATH|'
                     'hf-hub:NAME|TIMM_NAME.TAG, or --pretrained, --initial-checkpoint or --pretrained-path')


def _resolve(args, text: str) -> Tuple[Finetune, Optional[ModelSource]]:
    """--finetune SOURCE -> the model flags it implies (architecture, kwargs, classes, data config)."""
    if text.startswith(('hf-hub:', 'local-dir:')) or not os.path.exists(text):
        if not text.startswith(('hf-hub:', 'local-dir:')):  # a timm name, e.g. resnet50.a1_in1k: timm's weights
            try:
                check_model_name(text)
            except ValueError as e:
                raise UsageError(f'--finetune {text}: not a file or folder, and {one_line(e)}') from None
        args.model, args.pretrained = text, True
        return Finetune(source=text, label=text.split(':', 1)[-1].rstrip('/').split('/')[-1]), None
    try:  # a bare checkpoint names no architecture: the user's --model (and --num-classes) does
        resolved = resolve_model_source(text, model_name=args.model if _given(args, 'model') else None,
                                        num_classes=args.num_classes if _given(args, 'num_classes') else None)
    except (ValueError, OSError) as e:
        raise UsageError(f'--finetune {text}: {one_line(e)}') from None
    if resolved.state_dict is None:  # an export folder: timm reads it (local-dir:)
        args.model, args.pretrained = resolved.model_name, True
        return Finetune(source=text, label=resolved.label), resolved
    args.model = resolved.model_name
    args.model_kwargs = {**resolved.model_kwargs, **(args.model_kwargs or {})}
    if not _given(args, 'num_classes'):
        args.num_classes = resolved.num_classes
    for key, value in resolved.data_config.items():  # the preprocessing it was trained with
        if key in ('mean', 'std', 'crop_pct', 'interpolation') and not _given(args, key) and value is not None:
            setattr(args, key, list(value) if isinstance(value, (list, tuple)) else value)
    return Finetune(source=text, label=resolved.label, state_dict=resolved.state_dict,
                    source_classes=resolved.num_classes), resolved


def prepare_finetune(args) -> Optional[Finetune]:
    """--finetune: resolve the source (reading files only) and fill the fine-tune settings the user left open.

    Runs in set-up, before the model is built; raises UsageError for a source that cannot be used.
    """
    if args.finetune is None:
        return None
    finetune, resolved = _resolve(args, args.finetune) if args.finetune else (_source_from_flags(args), None)
    source_args = resolved.train_args if resolved is not None else {}
    for dest, value in FINETUNE_DEFAULTS.items():
        if not _given(args, dest):
            setattr(args, dest, value)
            finetune.chosen.append((dest, value, 'fine-tune default'))
    if not _given(args, 'epochs'):
        epochs = source_args.get('epochs')
        if isinstance(epochs, int) and epochs > 0:
            args.epochs = max(1, math.ceil(FINETUNE_EPOCH_FRACTION * epochs))
            why = f'{FINETUNE_EPOCH_FRACTION:g} x the source run\'s {epochs}'
        else:
            args.epochs, why = FINETUNE_EPOCHS_UNKNOWN, 'the source does not say how long it trained'
        finetune.chosen.append(('epochs', args.epochs, why))
    if not _given(args, 'lr') and not _given(args, 'lr_base'):  # a recipe's lr, else --lr-base (batch-scaled)
        dest = 'lr' if args.lr else 'lr_base'
        setattr(args, dest, getattr(args, dest) * FINETUNE_LR_FACTOR)
        finetune.chosen.append((dest, getattr(args, dest), f'{FINETUNE_LR_FACTOR:g} x the from-scratch value'))
    return finetune


def subnet_table(before: List[Dict[str, Any]], after: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The loafing summary rows of the same subnets before and after the fine-tune, labelled for one table
    (timm_stim.loafing_report: the 'vs first' columns then show the gain)."""
    from .loafing_report import summarize
    rows = [dict(r, model='before fine-tune') for r in before] + [dict(r, model='after fine-tune') for r in after]
    return summarize(rows)


def measure_subnets(model: torch.nn.Module, args, data_config: Dict[str, Any], device, output_dir: str,
                    label: str) -> List[Dict[str, Any]]:
    """The full net and --loafing-eval random ST-space subnets of `model` on the validation split, as they are and
    with BN statistics re-estimated per subnet (BN_RECAL_IMAGES training images, eval transforms), written to
    `output_dir`; the same subnets for the same --seed, before and after. No random stream of the run moves."""
    from .data import create_eval_loader
    from .loafing import loafing_eval
    from .train_setup import preserved_rng
    batch = args.validation_batch_size or args.batch_size
    with preserved_rng():
        val = create_eval_loader(args.dataset, args.data_dir, args.val_split, data_config, batch_size=batch,
                                 workers=args.workers, device=device)
        train = create_eval_loader(args.dataset, args.data_dir, args.train_split, data_config, batch_size=batch,
                                   workers=args.workers, num_samples=BN_RECAL_IMAGES, seed=args.seed, device=device)
        results, _ = loafing_eval(model, val, subnets=f'random:{args.loafing_eval}', space='st', train_loader=train,
                                  bn_recal_images=BN_RECAL_IMAGES, output_dir=output_dir, label=label, seed=args.seed,
                                  input_size=data_config['input_size'], device=device)
    return results
