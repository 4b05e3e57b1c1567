"""One training step per benchmark config: the forward callable, its model, optimizer and stimulator."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from timm_stim import StimulativeTask, create_stim_config, create_stimulator

CONFIGS = ('plain', 'none', 'hand', 'st', 'st++', 'st++lean')
CONFIG_HELP = {
    'plain': "timm ClassificationTask: task(x, y)['loss'].backward(); opt.step()",
    'none': 'StimulativeTask(model, criterion, stimulator=None) (train_stim.py --stim none)',
    'hand': 'hand-written loop: criterion(model(x), y).backward(); opt.step()',
    'st': "ST: space 'st', loss 'kl', full-size subnets",
    'st++': "ST++: space 'st++', loss 'kl-', subnet sizes uniform in [0.43 S, S]",
    'st++lean': 'ST++ with memory_lean=True (per-subnet autograd.grad, one graph alive at a time)',
}


def build_config(bench, config: str, m: int, compiled: bool, scope: str = 'full'):
    """(forward callable, model, optimizer, stimulator) for one config on a fresh same-weight model."""
    args = bench.args
    model = bench.new_model()
    crit = nn.CrossEntropyLoss()
    stim = None
    if config == 'plain':
        try:
            from timm.task import ClassificationTask
            task = ClassificationTask(model, criterion=crit, device=bench.device, verbose=False)
            if compiled:
                task.compile(backend=args.compile_backend, mode=args.compile_mode)
            forward = task
        except (ImportError, TypeError):  # timm without timm.task (or another signature): an equivalent
            fwd_model = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode) \
                if compiled else model
            forward = lambda x, y: {'loss': crit(fwd_model(x), y)}
    elif config == 'hand':
        fwd_model = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode) \
            if compiled else model
        forward = lambda x, y: crit(fwd_model(x), y)
    elif config == 'none':
        task = StimulativeTask(model, crit, None, device=bench.device, verbose=False)
        if compiled:
            task.compile(backend=args.compile_backend, mode=args.compile_mode)
        forward = task
    else:
        preset = 'st' if config == 'st' else 'st++'
        overrides = dict(num_subnets=m, seed=args.seed, memory_lean=config == 'st++lean')
        if preset == 'st++':
            overrides['min_scale'] = args.min_scale
            if args.stim_sizes:
                overrides['sizes'] = list(args.stim_sizes)
        stim = create_stimulator(model, create_stim_config(preset, **overrides), full_size=args.img_size)
        task = StimulativeTask(model, crit, stim, device=bench.device, verbose=False)
        if compiled:
            task.compile(backend=args.compile_backend, mode=args.compile_mode, scope=scope)
        forward = task
    return forward, model, bench.new_optimizer(model), stim


def make_step(bench, forward: Callable, opt: torch.optim.Optimizer, draws_log: list) -> Callable[[], None]:
    """One step on the benchmark batch: forward (under autocast), backward, update; logs the task's draws."""
    x, y = bench.x, bench.y

    def step():
        with bench.autocast():
            out = forward(x, y)
        loss = out['loss'] if isinstance(out, dict) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if isinstance(out, dict) and out.get('draws'):
            draws_log.append(list(out['draws']))
    return step
