"""train_stim.py's epoch loop vs a step loop over the same on-device batches (what the script adds per step)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict

import torch.nn as nn

from timm_stim import StimulativeTask

from .measure import sync
from .steps import build_config, make_step


def run_script_loop(bench, rounds: int = 6) -> Dict[str, Any]:
    """train_stim.py's epoch loop vs the benchmark's own step loop over the same on-device batches.

    `train_stim.train_one_epoch` (forward, backward, update, EMA/scheduler hooks, on-device loss sums, log
    lines every 50 updates) with --script-loop-config: 'none' (what `train_stim.py --stim none` runs) against
    what a timm user writes (ClassificationTask forward, backward, optimizer step, zero_grad); an ST config
    (e.g. st++lean, M = --script-loop-subnets, compiled with --script-loop-compile) against this benchmark's
    step of the same config, so the ratio is train_stim.py's img/s vs the step benchmark's. Both go through a
    list of --script-loop-batches copies of the benchmark batch (no data loading: the same for both);
    separate models with the same initial weights and draws; interleaved rounds, per-step time = round time /
    batches.
    """
    import train_stim
    a = bench.args
    config, m, compiled = a.script_loop_config, a.script_loop_subnets, a.script_loop_compile
    batches = [(bench.x, bench.y)] * (a.script_loop_batches or max(5, a.repeats))
    targs = train_stim.parse_args(['--stim', 'none', '--model', a.model, '--log-interval', '50']
                                  + (['--channels-last'] if a.channels_last else []))
    targs.world_size, targs.rank, targs.distributed = 1, 0, False
    crit = nn.CrossEntropyLoss()
    if config == 'none':
        script_model = bench.new_model()
        script_task = StimulativeTask(script_model, crit, None, device=bench.device, verbose=False)
        if compiled:
            script_task.compile(backend=a.compile_backend, mode=a.compile_mode)
        script_opt = bench.new_optimizer(script_model)
        minimal_forward, _, minimal_opt, _ = build_config(bench, 'plain', 0, compiled)
    else:
        script_task, script_model, script_opt, _ = build_config(bench, config, m, compiled)
        minimal_forward, _, minimal_opt, _ = build_config(bench, config, m, compiled)
    minimal_step = make_step(bench, minimal_forward, minimal_opt, [])

    def script_epoch():
        train_stim.train_one_epoch(0, script_task, batches, script_opt, targs, bench.device,
                                   amp_autocast=bench.autocast)

    def minimal_epoch():
        for _ in batches:
            minimal_step()

    progress_bar, train_stim._progress_bar = train_stim._progress_bar, lambda *args, **kwargs: None  # timing only
    try:
        epochs = {'script': script_epoch, 'minimal': minimal_epoch}
        # warm-up: each side's compile and allocator growth. cuDNN autotuning of every ST++ size ran before, on
        # CUDA (step_cost.py's pre-warm), so the side that meets a size first does not pay it alone
        for fn in epochs.values():
            fn()
        per_step = {k: [] for k in epochs}
        for r in range(rounds):
            for k in (('script', 'minimal') if r % 2 == 0 else ('minimal', 'script')):
                sync(bench.device)
                c0, t0 = time.process_time(), time.perf_counter()
                epochs[k]()
                sync(bench.device)
                t = (time.process_time() - c0) if bench.clock == 'cpu' else (time.perf_counter() - t0)
                per_step[k].append(1e3 * t / len(batches))
    finally:
        train_stim._progress_bar = progress_bar
    med = {k: statistics.median(v) for k, v in per_step.items()}
    out = {'script_ms': med['script'], 'minimal_ms': med['minimal'], 'ratio': med['script'] / med['minimal'],
           'min_ratio': min(per_step['script']) / min(per_step['minimal']), 'per_round_ms': per_step,
           'batches_per_round': len(batches), 'rounds': rounds, 'clock': bench.clock, 'config': config,
           'subnets': m if config != 'none' else 0, 'compiled': compiled,
           'script_img_s': 1e3 * a.batch_size / med['script'], 'minimal_img_s': 1e3 * a.batch_size / med['minimal']}
    bench.cleanup()
    return out
