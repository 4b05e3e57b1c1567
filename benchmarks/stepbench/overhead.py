"""What StimulativeTask without a stimulator costs: interleaved plain / none / hand rows, and per-step dispatch."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, List

import torch
import torch.nn as nn

from timm_stim import StimulativeTask

from .config_rows import measure_memory
from .measure import diff_stats, dynamo_stats, static_bytes, summarize, sync
from .steps import CONFIG_HELP, build_config, make_step


def run_overhead(bench, compiled: bool) -> List[Dict[str, Any]]:
    """plain (ClassificationTask) vs 'none' (StimulativeTask without stimulator) vs hand loop, interleaved."""
    a = bench.args
    kinds = [c for c in ('plain', 'none', 'hand') if c in a.configs]
    built = {}
    for k in kinds:
        forward, model, opt, _ = build_config(bench, k, 0, compiled)
        built[k] = (make_step(bench, forward, opt, []), model, opt)
    stats0, hits0 = dynamo_stats(), bench.recompile_counter.hits
    warm = {k: bench.timed(built[k][0], a.warmup) for k in kinds}
    stats_warm = dynamo_stats()
    rounds = max(3, a.repeats // 5)
    per_round = max(2, math.ceil(a.repeats / rounds))
    times = {k: [] for k in kinds}
    walls = {k: [] for k in kinds}
    peaks = {}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            if bench.device.type == 'cuda':
                sync(bench.device)
                torch.cuda.reset_peak_memory_stats(bench.device)
                start = torch.cuda.memory_allocated(bench.device)
            times[k].extend(bench.timed(built[k][0], per_round))
            walls[k].extend(bench.wall_log)
            if bench.device.type == 'cuda':
                p = torch.cuda.max_memory_allocated(bench.device)
                old = peaks.get(k, (0, 0))
                peaks[k] = (max(old[0], p), max(old[1], p - start))
    rows = []
    for k in kinds:
        row = {'config': k, 'subnets': 0, 'compiled': compiled, 'description': CONFIG_HELP[k],
               'ideal_ratio': 1.0, 'interleaved_rounds': rounds, 'clock': bench.clock}
        row.update(summarize(times[k]))
        if walls[k] and bench.clock != 'wall':
            row['wall_median_ms'] = 1e3 * statistics.median(walls[k])
        if bench.device.type == 'cuda':
            # other configs' models are resident too: report the step's own peak above its start
            static = static_bytes(built[k][1], built[k][2], [bench.x, bench.y])
            row.update(peak_mib=(static + peaks[k][1]) / 2 ** 20, step_peak_mib=peaks[k][1] / 2 ** 20,
                       static_mib=static / 2 ** 20,
                       memory_method='cuda: own static tensors + (max_memory_allocated - allocated at step '
                                     'start); the three models are resident together while interleaved')
        else:
            row.update(measure_memory(bench, built[k][0], built[k][1], built[k][2]))
        row['warmup_first_step_s'] = warm[k][0] if warm[k] else None
        row['warmup_total_s'] = sum(warm[k])
        row['compile_overhead_s'] = (sum(warm[k]) - len(warm[k]) * row['median_ms'] / 1e3) if compiled else None
        if compiled:  # the three share dynamo caches: the first one warmed up ('plain') pays the compile
            row['dynamo_warmup'] = diff_stats(stats_warm, stats0)
            row['dynamo_timed'] = diff_stats(dynamo_stats(), stats_warm)
            row['recompile_limit_hits'] = bench.recompile_counter.hits - hits0
        rows.append(row)
    del built
    bench.cleanup()
    return rows


def run_dispatch_overhead(bench, rounds: int = 10, block: int = 200) -> Dict[str, Any]:
    """Per-step Python cost of StimulativeTask(stimulator=None) vs the hand loop, on a tiny model.

    On the real model this difference is far below timing noise; a tiny Linear model makes the per-step
    host cost of each path visible (min over interleaved blocks of steps, one sync per block).
    """
    device = bench.device
    torch.manual_seed(0)
    crit = nn.CrossEntropyLoss()
    x = torch.randn(4, 16, device=device)
    y = torch.randint(0, 8, (4,), device=device)
    steps = {}
    for kind in ('hand', 'none'):
        model = nn.Linear(16, 8).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        fwd = (lambda mdl: (lambda a, b: crit(mdl(a), b)))(model) if kind == 'hand' else \
            StimulativeTask(model, crit, None, device=device, verbose=False)

        def step(fwd=fwd, opt=opt):
            out = fwd(x, y)
            loss = out['loss'] if isinstance(out, dict) else out
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[kind] = step
    best = {k: float('inf') for k in steps}
    for r in range(rounds):
        for k in (('hand', 'none') if r % 2 == 0 else ('none', 'hand')):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                steps[k]()
            sync(device)
            best[k] = min(best[k], (time.perf_counter() - t0) / block)
    return {'hand_us': 1e6 * best['hand'], 'none_us': 1e6 * best['none'],
            'overhead_us': 1e6 * (best['none'] - best['hand']), 'model': 'nn.Linear(16, 8), batch 4'}
