"""The durable state of a train_stim.py run: checkpoints, summary rows, resume and RNG states.

Everything a run writes to its folder or reads back on ``--resume`` goes through here, under four rules:

* a file appears whole or not at all (fsync, then one ``os.replace``), so a crash leaves the old or the new file;
* nothing non-finite is ever saved: a diverged run raises :class:`TrainingDiverged` and leaves every file as it was;
* a checkpoint is untrusted input: read by ``timm_stim.checkpoint`` (weights only), its saver history sanitised;
* so is a run folder from elsewhere: one holding a link the run could write through is refused before anything is
  written (:func:`check_run_folder`), and every file is written as a new file swapped in by name, never in place.
"""
import argparse
import csv
import logging
import math
import os
import random
import shutil
import stat
from datetime import datetime
from typing import IO, Callable, Dict, List, Tuple

import numpy as np
import torch
import yaml
from timm.models import safe_model_name
from timm.utils import CheckpointSaver, update_summary

from .checkpoint import (clean_state_dict, first_non_finite, read_checkpoint_metadata, read_training_checkpoint,
                         sanitize_saver_state)
from .cli import UsageError, one_line
from .train_args import args_record

_logger = logging.getLogger(__name__)

_KEPT = ('training stopped and nothing was saved: the last good checkpoint is kept (last.pth.tar in the output '
         'folder, once an epoch has finished); lower --lr or use --clip-grad')


class TrainingDiverged(Exception):
    """A non-finite loss, metric or weight: printed as `error: <message>`, exit code 1; no checkpoint is written."""


# ------------------------------------------------------------------------------------------------ checkpoints

class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver with every file it publishes appearing atomically, never a non-finite model, and a
    restored history that cannot name a file outside the run folder.

    timm writes tmp.pth.tar and os.replace()s it onto last.pth.tar, but first unlinks last.pth.tar (a moment
    with no last checkpoint), never fsyncs, and makes model_best / checkpoint-N by unlink + hardlink. Here the
    new file is fsynced and each target is swapped in by one os.replace: a crash leaves the old or the new
    complete file. Before anything is written the weights (and EMA) are checked finite; a diverged model raises
    TrainingDiverged and leaves every file as it was.
    """

    def _save(self, save_path, epoch, metric=None):
        if metric is not None and not math.isfinite(metric):
            raise TrainingDiverged(f'non-finite checkpoint metric ({metric}) in epoch {epoch}; {_KEPT}')
        if self.task is not None:
            self.task.check_finite(epoch)
        if os.path.lexists(save_path):  # timm's torch.save(path) would write through whatever holds the name
            os.unlink(save_path)
        super()._save(save_path, epoch, metric)

    def load_state_dict(self, state_dict):
        """Restore the history of a checkpoint from this folder, keeping only what its files confirm."""
        state, dropped = sanitize_saver_state(state_dict, self.checkpoint_dir, self.save_prefix, self.extension,
                                              self.decreasing)
        for item in dropped:
            _logger.warning(f'Resume: ignored the checkpoint\'s {item}')
        self.checkpoint_files, self.best_metric, self.best_epoch = (
            state['checkpoint_files'], state['best_metric'], state['best_epoch'])
        _logger.info(f'Restored checkpoint history ({len(self.checkpoint_files)} files), best metric '
                     f'{self.best_metric} (epoch {self.best_epoch})')

    def load_state_dict_from_checkpoint(self, checkpoint_path):
        """Restore the history; then finish what a crash between last.pth.tar and checkpoint-N / model_best left
        undone for the checkpoint resumed from (its own stored epoch and finite metric decide)."""
        restored = super().load_state_dict_from_checkpoint(checkpoint_path)
        meta = read_checkpoint_metadata(checkpoint_path) or {}
        epoch, metric = meta.get('epoch'), meta.get('metric')
        is_last = os.path.basename(checkpoint_path) == 'last' + self.extension
        if not is_last or not isinstance(epoch, int) or epoch < 0 \
                or not isinstance(metric, float) or not math.isfinite(metric):
            return restored
        save_path = self._checkpoint_path(epoch)
        worst = self.checkpoint_files[-1] if self.checkpoint_files else None
        if not os.path.exists(save_path) and (len(self.checkpoint_files) < self.max_history
                                              or worst[1] is None or self.cmp(metric, worst[1])):
            if len(self.checkpoint_files) >= self.max_history:
                self._cleanup_checkpoints(1)
            self._duplicate(checkpoint_path, save_path)
            self._track_checkpoint(save_path, epoch, metric)  # also model_best, when it is the best
        elif self.best_metric is None or self.cmp(metric, self.best_metric):
            self.best_metric, self.best_epoch = metric, epoch
            self._duplicate(checkpoint_path, os.path.join(self.checkpoint_dir, 'model_best' + self.extension))
        return restored

    def _replace(self, src, dst):
        with open(src, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(src, dst)

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


class CheckpointContents:
    """Given to CheckpointSaver as its `task`: the task's weights and state, plus the run's `train_state`."""

    def __init__(self, task):
        self.task, self.train_state = task, {}

    def check_finite(self, epoch: int) -> None:
        """Raise TrainingDiverged when a weight or buffer of the model or its EMA is NaN or infinite."""
        nets = [('model', self.task.model)]
        if self.task.has_ema():
            nets.append(('EMA', self.task.get_eval_model(ema=True)))
        for what, net in nets:
            bad = first_non_finite(net.state_dict())
            if bad is not None:
                raise TrainingDiverged(f'non-finite {what} weights ({bad}) after epoch {epoch}; {_KEPT}')

    def get_checkpoint_state(self, ema=False, **kwargs):
        state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        if not ema:
            state['train_state'] = self.train_state
        return state


def check_finite_metrics(epoch: int, metrics: dict, what: str) -> None:
    """Stop (exit 1) on a NaN / infinite loss or accuracy: the epoch is neither summarised nor checkpointed."""
    bad = {k: v for k, v in metrics.items() if k in ('loss', 'top1', 'top5') and not math.isfinite(v)}
    if bad:
        listed = ', '.join(f'{k} ({v})' for k, v in bad.items())
        raise TrainingDiverged(f'non-finite {what} {listed} in epoch {epoch}; {_KEPT}')


# ---------------------------------------------------------------------------------------------- run folder

def run_folder_path(args, data_config: dict) -> str:
    """The run folder: --output / --experiment, or timm's date-model-size name. Creates nothing."""
    exp_name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                            safe_model_name(args.model), str(data_config['input_size'][-1])])
    return os.path.join(args.output or os.path.join('.', 'output', 'train'), exp_name)


def check_run_folder(folder: str) -> None:
    """Refuse (UsageError) a run folder from elsewhere that the run could be turned against; reads only.

    The run writes args.yaml, summary rows, checkpoints, recovery files and the loafing / export / Hub folders in
    here. A symbolic link anywhere in the folder (or the folder itself one), a FIFO or device, or a file other than a
    checkpoint that is hard-linked elsewhere, could make one of those writes land outside the folder or hang: the
    folder is refused before anything is written. Checkpoints (``*.pth.tar``) may share an inode: the saver itself
    hard-links last / model_best / checkpoint-N, and only ever replaces them by name.
    """
    fix = 'remove it, or choose a new --experiment (a run never writes through links)'
    if os.path.islink(folder):
        raise UsageError(f'run folder {folder} is a symbolic link (to {os.readlink(folder)}); {fix}')
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise UsageError(f'run folder {folder} is a file, not a folder; choose another --experiment or --output')
    for root, dirs, files in os.walk(folder):  # does not descend into linked folders: they are refused below
        for name in dirs + files:
            path = os.path.join(root, name)
            info, shown = os.lstat(path), os.path.relpath(path, folder)
            if stat.S_ISLNK(info.st_mode):
                raise UsageError(f'run folder {folder} holds a symbolic link ({shown} -> {os.readlink(path)}); {fix}')
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise UsageError(f'run folder {folder} holds {shown}, which is neither a file nor a folder; {fix}')
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1 and not name.endswith('.pth.tar'):
                raise UsageError(f'run folder {folder} holds {shown}, hard-linked to {info.st_nlink - 1} other '
                                 f'path(s) that a write would change too; {fix}')


def make_folders(folder: str) -> None:
    """os.makedirs(folder), but a failure removes the folders this call created: nothing is left behind."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        for path in reversed(missing):
            os.mkdir(path)
    except OSError:
        for path in missing:
            if os.path.isdir(path) and not os.path.islink(path):
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        raise


def new_file(path: str, mode: str = 'w', **kwargs) -> IO:
    """`path` opened as a NEW file (O_CREAT | O_EXCL | O_NOFOLLOW): never an existing file, never through a link.

    Whatever held the name (a stale temp file, a planted link) is unlinked first; unlinking a link removes the
    link, not its target.
    """
    if os.path.lexists(path):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0)
    return os.fdopen(os.open(path, flags, 0o644), mode, **kwargs)


def replace_file(path: str, write: Callable[[IO], None], mode: str = 'w', **kwargs) -> None:
    """Write `path` whole: `write(f)` fills a new file beside it, fsynced, then one os.replace swaps it in by name
    (a link or hard link that held the name is replaced; what it pointed to is untouched)."""
    tmp = path + '.tmp'
    with new_file(tmp, mode, **kwargs) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_run_folder(args, output_dir: str, model, optimizer, loss_scaler, contents: CheckpointContents,
                      decreasing: bool) -> AtomicCheckpointSaver:
    """Rank 0, after every input check: the run folder with args.yaml, its checkpoint saver, --log-wandb.

    The folder (run_folder_path) is checked first (check_run_folder), so a folder from elsewhere holding links is
    refused before anything is written; an unwritable --output is bad input too. Resuming from a checkpoint in this
    folder continues its ranking of the best checkpoints. Returns the saver.
    """
    check_run_folder(output_dir)
    try:
        make_folders(output_dir)
    except OSError as e:  # e.g. a read-only or virtual file system, a name too long: nothing left behind
        raise UsageError(f'cannot create the run folder {output_dir}: {e.strerror or e}; choose a writable '
                         f'--output and a shorter --experiment') from None
    replace_file(os.path.join(output_dir, 'args.yaml'),
                 lambda f: yaml.safe_dump(args_record(args), f, default_flow_style=False, sort_keys=False))
    saver = AtomicCheckpointSaver(model, optimizer, args=argparse.Namespace(**args_record(args)),
                                  amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                  decreasing=decreasing, max_history=args.checkpoint_hist, task=contents)
    if args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), output_dir):
        saver.load_state_dict_from_checkpoint(args.resume)
    _logger.info(f'Output folder: {output_dir}')
    if args.log_wandb:  # summary rows are logged to this run too
        import wandb
        wandb.init(project=args.wandb_project, name=os.path.basename(output_dir), config=args_record(args),
                   tags=args.wandb_tags, resume='must' if args.wandb_resume_id else None,
                   id=args.wandb_resume_id or None)
    return saver


def write_summary_row(filename: str, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float,
                      log_wandb: bool = False) -> None:
    """Append the epoch's summary.csv row (timm's format), durably, before the epoch's checkpoint is published.

    The file is rewritten as a new file and swapped in by name (never appended to in place, so a link planted in
    its place cannot carry the row elsewhere). Rows of this epoch or later (left by a run killed after its row and
    before its checkpoint, then resumed) are dropped, so a resumed run neither loses nor repeats a row.
    """
    header, keep = None, []
    if os.path.isfile(filename):
        with open(filename, newline='') as f:
            reader = csv.reader(f)
            header = next(reader, None)
            keep = [r for r in reader if r and r[0].lstrip('-').isdigit() and int(r[0]) < epoch]

    tmp = filename + '.tmp'
    with new_file(tmp, newline='') as f:
        csv.writer(f).writerows([header] + keep if header else [])
    # timm's row format (and wandb logging), appended to the new file, which then replaces the old one
    update_summary(epoch, train_metrics, eval_metrics, filename=tmp, lr=lr, write_header=not header,
                   log_wandb=log_wandb)
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(tmp, filename)


# -------------------------------------------------------------------------------------------------- resume

def read_checkpoint(path: str) -> dict:
    """A training checkpoint read safely by timm_stim.checkpoint; an unusable file is bad input (exit 2)."""
    try:
        return read_training_checkpoint(path)
    except (ValueError, OSError) as e:
        raise UsageError(one_line(e)) from None


def resume(args, task, optimizer, loss_scaler) -> Tuple[int, dict]:
    """Restore weights, subnet samplers, EMA, optimizer and scaler from --resume, writing nothing.

    Returns (epoch to start at, the checkpoint's train_state with every rank's RNG states).
    """
    ckpt = read_checkpoint(args.resume)
    state_dict = clean_state_dict(ckpt['state_dict'])
    expected = task.model.state_dict()
    bad = ([f'missing {k}' for k in expected if k not in state_dict] +
           [f'unexpected {k}' for k in state_dict if k not in expected] +
           [f'shape of {k}' for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape])
    if bad:
        saved = getattr(ckpt.get('args'), 'model', ckpt.get('arch', '?'))
        raise UsageError(f'checkpoint {args.resume} (model {saved}) does not match --model {args.model} with '
                         f'{args.num_classes} classes: {len(bad)} differences, e.g. {bad[0]}')
    try:
        task.load_checkpoint_state(state_dict, ckpt.get('task_state'))
        if task.has_ema() and ckpt.get('state_dict_ema') is not None:
            task.load_checkpoint_state(ckpt['state_dict_ema'], ema=True)
        if not args.no_resume_opt:
            optimizer.load_state_dict(ckpt['optimizer'])
            if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
                loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f'cannot resume from {args.resume}: {str(e)[:300]}') from None
    _logger.info(f"Resumed from {args.resume} (epoch {ckpt.get('epoch')})")
    return ckpt.get('epoch', -1) + 1, ckpt.get('train_state') or {}


def rng_states(args) -> List[Dict]:
    """torch / CUDA / numpy / python RNG states of every rank (gathered on all ranks)."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]))
    if torch.device(args.device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state()
    states = [state] * args.world_size
    if args.distributed:
        torch.distributed.all_gather_object(states, state)
    return states


def restore_rng_states(states: list, args) -> None:
    """Put back this rank's RNG states, so a resumed run draws exactly what the uninterrupted run would."""
    if not states or len(states) != args.world_size:
        _logger.warning('Checkpoint has no RNG states for this world size: data order and augmentation will differ')
        return
    state = states[args.rank]
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.device(args.device).type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'])

