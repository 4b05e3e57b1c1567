#!/usr/bin/env python3
"""Does train_stim.py's training loop synchronise host and device per step? Runs the real script and reports.

    python benchmarks/sync_check.py [--warmup-steps 3] [--cuda-mode warn|error] [--json out.json] -- <train_stim args>
    torchrun --nproc_per_node=1 benchmarks/sync_check.py --cuda-mode error -- --data-dir /data --amp ...

`train_stim.main(<train_stim args>)` runs in this process; only `train_stim.train_one_epoch` is wrapped, so that
its loader yields through a marker that knows which step (epoch, batch) is running. A step is *watched* when it
is past the first --warmup-steps steps of the run (compilation, cudnn autotuning, allocator growth) and is not a
log step (update index a multiple of --log-interval, or the epoch's last batch: the loss average and the
non-finite check read the device once there, by design). Everything outside the loop body (data loading,
validation, checkpoints) is not counted.

CUDA: `torch.cuda.set_sync_debug_mode` is switched on for every step after the warm-up: 'warn' records every
synchronising call (its Python stack) and lets training go on; 'error' makes a watched step's first sync raise,
which stops the run and is reported with its stack (training then runs without train_stim.main's catch-all,
so the exception keeps the line). Log steps always run in 'warn' mode (recorded, expected).

CPU (no device, no real sync): a TorchDispatchMode counts what would sync on a GPU: aten._local_scalar_dense
(`.item()`, `float(t)`, `bool(t)`, `if t:`), data-dependent shapes (nonzero, masked_select, unique, boolean
indexing), `Tensor.tolist()` / `.numpy()` / `.cpu()` and tensors made from Python data (`torch.tensor(x)`,
`torch.as_tensor(x)`: on a GPU a copy from pageable host memory, which waits). Tensors drawn from an explicit
torch.Generator (the subnet sampler's CPU RNG) and their descendants stay on the host in a GPU run too and are not
counted. `--cuda-mode error` on CPU stops at the counter's first event in a watched step, as on CUDA.
Run the CPU check without --torchcompile (a dispatch mode and dynamo do not mix).

Exit code: train_stim's own if it failed, else 1 if a watched step synchronised, else 0. Per-step counts and
every sync's location (innermost frame, and the innermost frame in train_stim.py / timm_stim) go to --json.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import traceback
import warnings
import weakref
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import train_stim  # noqa: E402
from timm_stim.cli import report_error  # noqa: E402
from timm_stim.data import DataConfigError  # noqa: E402

aten = torch.ops.aten
SCALAR_OPS = {aten._local_scalar_dense.default}
DATA_DEPENDENT_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                      aten.unique_dim.default, aten.unique_consecutive.default}
# a tensor made from Python data (torch.tensor, torch.as_tensor of a number or list): on a GPU, a copy from pageable
# host memory that waits for the device
HOST_DATA_OPS = {aten.lift_fresh.default}
HOST_METHODS = ('tolist', 'numpy', 'cpu')


def _where(frames) -> Dict[str, str]:
    """Innermost frame outside torch, and the innermost frame in the project's code (train_stim.py, timm_stim/)."""
    frames = [f for f in frames if not f.filename.endswith(os.path.basename(__file__))]
    outside_torch = [f for f in frames if f'{os.sep}torch{os.sep}' not in f.filename]
    inner = (outside_torch or frames or [None])[-1]
    own = next((f for f in reversed(frames) if f.filename.startswith(REPO) and 'site-packages' not in f.filename
                and f'{os.sep}benchmarks{os.sep}' not in f.filename), None)
    fmt = lambda f: f'{os.path.relpath(f.filename, REPO) if f.filename.startswith(REPO) else f.filename}:' \
                    f'{f.lineno} {f.name}' if f else None
    return {'innermost': fmt(inner), 'project': fmt(own), 'code': (own.line or '').strip() if own else None}


class StepRecorder:
    """Which step runs now, which are watched, and the syncs seen per step."""

    def __init__(self, warmup_steps: int, cuda_mode: Optional[str]):
        self.warmup_steps = warmup_steps
        self.cuda_mode = cuda_mode
        self.global_step = 0
        self.current: Optional[Dict[str, Any]] = None
        self.steps: List[Dict[str, Any]] = []
        self.mode = None if cuda_mode else HostSyncCounter(self)
        self.stop_on_sync = False  # CPU: raise at the first would-be sync of a watched step

    def begin(self, epoch: int, batch_idx: int, num_batches: int, log_interval: int, accum: int) -> None:
        last = batch_idx == num_batches - 1
        update_done = last or (batch_idx + 1) % accum == 0
        log_step = update_done and (last or ((batch_idx + 1) // accum - 1) % log_interval == 0)
        watched = self.global_step >= self.warmup_steps and not log_step
        self.current = {'epoch': epoch, 'batch': batch_idx, 'step': self.global_step, 'log_step': log_step,
                        'warmup': self.global_step < self.warmup_steps, 'watched': watched, 'syncs': 0,
                        'events': []}
        self.steps.append(self.current)
        self.global_step += 1
        if self.cuda_mode and not self.current['warmup']:
            torch.cuda.set_sync_debug_mode(self.cuda_mode if watched else 'warn')
        elif self.mode is not None:
            self.mode.__enter__()

    def end(self) -> None:
        if self.current is None:
            return
        if self.cuda_mode:
            torch.cuda.set_sync_debug_mode('default')
        elif self.mode is not None:
            self.mode.__exit__(None, None, None)
        self.current = None

    def record(self, kind: str, frames) -> None:
        if self.current is not None:
            self.current['syncs'] += 1
            self.current['events'].append(dict(kind=kind, **_where(frames)))
            if self.stop_on_sync and self.current['watched']:  # CPU stand-in for CUDA's 'error' mode
                raise WatchedStepSynchronized(f'{kind}: would synchronize host and device in a watched step')


class WatchedStepSynchronized(RuntimeError):
    """The CPU counter's --cuda-mode error: raised at the op, so the traceback names the line."""


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that would make the host wait for the device on a GPU (CPU stand-in for the CUDA check)."""

    def __init__(self, recorder: StepRecorder):
        super().__init__()
        self.recorder = recorder
        self.host: Dict[int, weakref.ref] = {}  # id -> tensor that lives on the host in a GPU run too (RNG draws)

    def _is_host(self, t) -> bool:
        ref = self.host.get(id(t))  # by identity: a WeakSet would compare tensors with ==, itself an op
        return ref is not None and ref() is t

    def _mark_host(self, t: torch.Tensor) -> None:
        key = id(t)
        self.host[key] = weakref.ref(t, lambda _, key=key: self.host.pop(key, None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        host_inputs = kwargs.get('generator') is not None or (tensors and all(self._is_host(t) for t in tensors))
        if not host_inputs and (func in SCALAR_OPS or func in DATA_DEPENDENT_OPS or func in HOST_DATA_OPS
                                or _bool_index(func, args)):
            self.recorder.record(str(func.overloadpacket.__name__), traceback.extract_stack())
        out = func(*args, **kwargs)
        if host_inputs:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self._mark_host(t)
        return out

    def __enter__(self):
        self._patched = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}
        for name, method in self._patched.items():
            setattr(torch.Tensor, name, self._watch(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._patched.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _watch(self, name, method):
        def watched(tensor, *args, **kwargs):
            if not self._is_host(tensor):
                self.recorder.record(f'Tensor.{name}', traceback.extract_stack())
            return method(tensor, *args, **kwargs)
        return watched


def _bool_index(func, args) -> bool:
    """t[mask] with a boolean mask: a nonzero inside, whose output size the host must read."""
    return func is aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) or [])


class MarkedLoader:
    """The epoch's loader, telling the recorder where each step starts and ends (attributes pass through)."""

    def __init__(self, loader, recorder: StepRecorder, epoch: int, log_interval: int, accum: int):
        object.__setattr__(self, '_loader', loader)
        object.__setattr__(self, '_marks', (recorder, epoch, log_interval, accum))

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __setattr__(self, name, value):
        setattr(self._loader, name, value)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        recorder, epoch, log_interval, accum = self._marks
        num_batches = len(self._loader)
        for batch_idx, batch in enumerate(self._loader):  # the loader's own work is outside the step
            recorder.begin(epoch, batch_idx, num_batches, log_interval, accum)
            try:
                yield batch
            finally:
                recorder.end()


def _warning_hook(recorder: StepRecorder, previous):
    def show(message, category, filename, lineno, file=None, line=None):
        if 'synchroniz' in str(message):
            recorder.record('cuda sync', traceback.extract_stack()[:-1])
        else:
            previous(message, category, filename, lineno, file, line)
    return show


def _train(argv: List[str]) -> int:
    """train_stim.main without its catch-all: a RuntimeError of a watched step (CUDA's sync 'error' mode, the CPU
    counter's) reaches the caller with its traceback, i.e. the line that synchronised; bad input exits 2 as there."""
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    try:
        args = train_stim.parse_args(argv)
        train_stim.check_args(args)
        return train_stim.train(args)
    except (train_stim.UsageError, DataConfigError) as e:
        return report_error(e, 2)


def run_checked(train_argv: List[str], warmup_steps: int, cuda_mode: Optional[str],
                stop_on_sync: bool = False) -> Dict[str, Any]:
    """train_stim's training (main, or with `stop_on_sync` / cuda_mode 'error' the uncaught path) with the epoch loop
    wrapped; returns the per-step record. `stop_on_sync` makes the CPU counter raise at a watched step's first sync."""
    recorder = StepRecorder(warmup_steps, cuda_mode)
    recorder.stop_on_sync = stop_on_sync and not cuda_mode
    original = train_stim.train_one_epoch

    def marked_epoch(epoch, task, loader, optimizer, args, *rest, **kwargs):
        loader = MarkedLoader(loader, recorder, epoch, args.log_interval, args.grad_accum_steps)
        try:
            return original(epoch, task, loader, optimizer, args, *rest, **kwargs)
        finally:
            recorder.end()

    train_stim.train_one_epoch = marked_epoch
    previous_show = warnings.showwarning
    error = None
    stopping = cuda_mode == 'error' or recorder.stop_on_sync
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('always')
            warnings.showwarning = _warning_hook(recorder, previous_show)
            try:
                code = _train(train_argv) if stopping else train_stim.main(train_argv)
            except RuntimeError as e:  # the first sync of a watched step raised: report where, stop the run
                if not (stopping and recorder.steps and 'synchroniz' in str(e)):
                    raise
                code = 1
                error = f'{type(e).__name__}: {str(e).splitlines()[0]}'
                if not isinstance(e, WatchedStepSynchronized):  # CUDA: the event is the exception itself
                    step = recorder.steps[-1]
                    step['syncs'] += 1
                    step['events'].append(dict(kind='cuda sync (error)',
                                               **_where(traceback.extract_tb(e.__traceback__))))
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
    finally:
        train_stim.train_one_epoch = original
        warnings.showwarning = previous_show
        if cuda_mode:
            torch.cuda.set_sync_debug_mode('default')
    return summarize(recorder.steps, code, error)


def summarize(steps: List[Dict[str, Any]], code: int, error: Optional[str]) -> Dict[str, Any]:
    watched = [s for s in steps if s['watched']]
    locations = collections.Counter(
        f"{e['kind']} at {e['project'] or e['innermost']}" + (f" [{e['innermost']}]" if e['project'] else '')
        for s in watched for e in s['events'])
    log_locations = collections.Counter(f"{e['kind']} at {e['project'] or e['innermost']}"
                                        for s in steps if s['log_step'] and not s['warmup'] for e in s['events'])
    return {
        'train_exit_code': code, 'error': error,
        'steps': len(steps), 'watched_steps': len(watched),
        'watched_syncs': sum(s['syncs'] for s in watched),
        'syncs_per_watched_step': [s['syncs'] for s in watched],
        'log_steps': [{'epoch': s['epoch'], 'batch': s['batch'], 'syncs': s['syncs']}
                      for s in steps if s['log_step']],
        'watched_locations': dict(locations.most_common()), 'log_step_locations': dict(log_locations.most_common()),
        'per_step': [{k: s[k] for k in ('epoch', 'batch', 'step', 'log_step', 'warmup', 'watched', 'syncs')}
                     for s in steps],
        'first_events': [dict(e, epoch=s['epoch'], batch=s['batch']) for s in watched for e in s['events']][:20],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage='%(prog)s [options] -- <train_stim.py arguments>')
    p.add_argument('--warmup-steps', type=int, default=3, help='steps of the run not watched (compile, autotuning)')
    p.add_argument('--cuda-mode', default='warn', choices=['warn', 'error'],
                   help="CUDA: torch.cuda.set_sync_debug_mode for the watched steps ('error': the first sync stops "
                        "the run, reported with its line); on CPU 'error' stops at the counter's first")
    p.add_argument('--json', default=None, help='write the report here')
    p.add_argument('train_args', nargs=argparse.REMAINDER, help='after --: the arguments of train_stim.py')
    args = p.parse_args(argv)
    if args.train_args[:1] == ['--']:
        args.train_args = args.train_args[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    train_args = args.train_args
    device = next((train_args[i + 1] for i, a in enumerate(train_args[:-1]) if a == '--device'), None)
    cuda = torch.cuda.is_available() and (device is None or device.startswith('cuda'))
    report = run_checked(train_args, args.warmup_steps, args.cuda_mode if cuda else None,
                         stop_on_sync=args.cuda_mode == 'error')
    method = (f'torch.cuda.set_sync_debug_mode({args.cuda_mode!r})' if cuda
              else 'TorchDispatchMode: _local_scalar_dense, data-dependent shapes, tolist/numpy/cpu, tensors made '
                   'from Python data' + (' (error: stop at the first)' if args.cuda_mode == 'error' else ''))
    report.update(device='cuda' if cuda else 'cpu', method=method, warmup_steps=args.warmup_steps,
                  train_args=train_args, torch=torch.__version__)
    rank = int(os.environ.get('RANK', 0))
    if rank == 0:
        print(f"[sync check] {report['method']}: train_stim exit {report['train_exit_code']}, "
              f"{report['watched_syncs']} syncs in {report['watched_steps']} watched steps "
              f"(per step: {report['syncs_per_watched_step']}); log steps: "
              f"{[s['syncs'] for s in report['log_steps']]}")
        for where, n in report['watched_locations'].items():
            print(f'  {n:>4}x {where}')
        for event in report['first_events'][:3]:  # the line itself, e.g. `loss.item()`
            print(f"  line: {event['project'] or event['innermost']}: {event['code'] or '?'}")
        if report['error']:
            print(f"  stopped by: {report['error']}")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1)
    if report['train_exit_code']:
        return report['train_exit_code']
    return 1 if report['watched_syncs'] else 0


if __name__ == '__main__':
    sys.exit(main())
