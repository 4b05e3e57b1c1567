#!/usr/bin/env python3
"""Cost of one training step: plain training vs ST vs ST++ (vs ST++ memory-lean), in one process.

For every config and every M in --subnets it measures the median step time (forward + backward +
optimizer step) and the peak memory, and compares the time with the FLOP-ideal ratio

    ideal = 1 + mean over timed steps of sum_k FLOPs(subnet_k at size_k) / FLOPs(full net at full size)

where the subnets and sizes are the ones the fixed-seed Stimulator actually drew during the timed steps and
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (forward FLOPs of a meta-device copy of the
model; the same ratio holds for forward + backward). Resizing, losses and optimizer are not in the ideal.

It also checks that `train_stim.py --stim none`'s per-step path (StimulativeTask(model, criterion,
stimulator=None)) costs the same as a hand-written `criterion(model(x), y).backward(); opt.step()` loop
and as timm's ClassificationTask: the three are interleaved (rotating order) in the same process.

Memory: CUDA: torch.cuda.max_memory_allocated over the timed steps (reset per config). CPU: PyTorch has
no CPU allocator statistics, so two extra steps per config run under torch.profiler(profile_memory=True);
the peak of the running sum of CPU tensor allocations during a step is added to the bytes alive before the
step (parameters, optimizer state, input); gradients are allocated inside the step (zero_grad sets them to
None). That counts tensors only (no allocator caching / fragmentation); 'n/a' if the profiler API fails.

Timing: 'meas/id' = median step time ratio / ideal; 'mean m/i' = mean step time ratio / ideal (the ideal is a
mean over the timed steps, and total training time is a sum of steps, so with draws of very different cost, as
ST++ M=1, the mean-based figure is the one to trust; both are in the JSON with every step's time).

--compile: plain = whole-model torch.compile (ClassificationTask.compile / StimulativeTask.compile without
stimulator / torch.compile(model)); ST/ST++ = StimulativeTask.compile(scope=...) for each --compile-scope:
'full' (whole-model compile of the full pass, subnets eager) and 'subnets' (the same compiled model also runs
every subnet pass: one static graph per (subnet, input size); needs --stim-sizes buckets, refused otherwise and
reported as an error row). Before its warm-up, a 'subnets' row pre-compiles every (subnet, size) pair the
stimulator can draw (steps whose draws are forced to the enumerated pairs), so timed steps never compile.
Compiled rows report first-step time, compile overhead (pre-compile + warm-up time minus those steps at steady
state; 'compile_vs_plain' divides it by the compiled plain row's), steady-state time, dynamo graph counts per
step and the graph bound task.subnet_graph_bound(); with --graph-steps N an extra compiled ST++ M=1 run (scope
'subnets', needs --stim-sizes) of N sampled steps records torch._dynamo.utils.counters['stats']['unique_graphs']
after every step and compares the final count with 1 + distinct (subnet, size) pairs met and with the bound.

Examples:
    python benchmarks/step_cost.py --model resnet50 --batch-size 256 --img-size 224 --device cuda \\
        --amp-dtype bfloat16 --channels-last --subnets 1 6 --repeats 30 --warmup 10 --compile --json out.json
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --model resnet18 --img-size 64 --batch-size 16 \\
        --device cpu --repeats 5 --warmup 2 --subnets 1 6

Layout: this file is the command line and the order of the measurements; benchmarks/stepbench/ holds the parts
(measure: clocks, memory, dynamo counters, FLOPs; bench: the shared context; steps: one step per config;
config_rows, overhead, script_loop, graph_check: the measurements; report: relative figures and tables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from stepbench.bench import Bench  # noqa: E402
from stepbench.config_rows import run_config  # noqa: E402
from stepbench.graph_check import run_graph_check  # noqa: E402
from stepbench.measure import OOM  # noqa: E402
from stepbench.overhead import run_dispatch_overhead, run_overhead  # noqa: E402
from stepbench.report import add_relative, format_row, print_table  # noqa: E402
from stepbench.script_loop import run_script_loop  # noqa: E402
from stepbench.steps import CONFIG_HELP, CONFIGS  # noqa: E402

__all__ = ['Bench', 'CONFIGS', 'CONFIG_HELP', 'add_relative', 'format_row', 'main', 'parse_args', 'print_table',
           'run']


def run(bench: Bench) -> Dict[str, Any]:
    """Every measurement the arguments ask for, in order; writes partial results after each row."""
    a = bench.args
    modes = ([True] if a.compile_only else [False, True]) if a.compile else [False]
    rows: List[Dict[str, Any]] = []
    graph_check = dispatch = script_loop = None
    if a.script_loop and a.script_loop_config != 'none':
        bench.log(f'train_stim.py epoch loop vs the step loop: {a.script_loop_config} M={a.script_loop_subnets}'
                  f' compiled={a.script_loop_compile}')
        if a.script_loop_config.startswith('st++') and bench.device.type == 'cuda' \
                and torch.backends.cudnn.benchmark:
            bench.prewarm_sizes()  # every ST++ size autotuned before either side runs: neither pays it in the loop
        script_loop = run_script_loop(bench, a.script_loop_rounds)
    for compiled in modes:
        if any(c in a.configs for c in ('plain', 'none', 'hand')):
            if not compiled and 'none' in a.configs:
                dispatch = run_dispatch_overhead(bench)
                if a.script_loop and a.script_loop_config == 'none':
                    bench.log('train_stim.py --stim none epoch loop vs a minimal timm loop')
                    script_loop = run_script_loop(bench, a.script_loop_rounds)
            bench.log(f'plain / none / hand (interleaved), compiled={compiled}')
            rows.extend(run_overhead(bench, compiled))
            write_partial(bench, rows, graph_check)
        for config in [c for c in CONFIGS if c in a.configs and c not in ('plain', 'none', 'hand')]:
            if config.startswith('st++') and bench.device.type == 'cuda' and torch.backends.cudnn.benchmark:
                bench.prewarm_sizes()  # once, after the plain / ST rows are saved
            for scope in (a.compile_scope if compiled else ['full']):
                for m in a.subnets:
                    bench.log(f'{config} M={m} compiled={compiled}' + (f' scope={scope}' if compiled else ''))
                    try:
                        rows.append(run_config(bench, config, m, compiled, scope))
                    except OOM as e:
                        rows.append({'config': config, 'subnets': m, 'compiled': compiled,
                                     'error': f'OOM: {e}'[:300]})
                        bench.cleanup()
                    bench.log('  ' + format_row(rows[-1]))
                    write_partial(bench, rows, graph_check)
        if compiled and a.graph_steps > 0:
            bench.log(f'graph check: compiled ST++ M=1, {a.graph_steps} steps')
            graph_check = run_graph_check(bench)
    add_relative(rows)
    return {'rows': rows, 'graph_check': graph_check, 'dispatch_overhead': dispatch, 'script_loop': script_loop}


def write_partial(bench: Bench, rows: List[Dict[str, Any]], graph_check: Optional[Dict[str, Any]]) -> None:
    """Write what is measured so far (a per-config timeout then still leaves results)."""
    if not bench.args.json:
        return
    add_relative(rows)
    partial = {'meta': dict(bench.meta_base(), partial=True), 'rows': rows, 'graph_check': graph_check}
    os.makedirs(os.path.dirname(os.path.abspath(bench.args.json)), exist_ok=True)
    with open(bench.args.json, 'w') as f:
        json.dump(partial, f, indent=1, default=str)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet50')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp-dtype', default='none', choices=['none', 'float32', 'bfloat16', 'float16'],
                   help='autocast dtype for forward (float16 without a GradScaler: timing only)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--subnets', type=int, nargs='+', default=[1, 6], help='values of M')
    p.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=CONFIGS)
    p.add_argument('--repeats', type=int, default=30, help='timed steps per config')
    p.add_argument('--warmup', type=int, default=10, help='untimed steps per config (compile happens here)')
    p.add_argument('--min-scale', type=float, default=0.43)
    p.add_argument('--stim-sizes', type=int, nargs='*', default=None,
                   help='fixed ST++ subnet sizes (buckets) instead of the uniform range')
    p.add_argument('--compile', action='store_true', help='also run compiled versions of every config')
    p.add_argument('--compile-only', action='store_true', help='with --compile: skip the eager rows')
    p.add_argument('--compile-backend', default='inductor')
    p.add_argument('--compile-mode', default=None)
    p.add_argument('--compile-scope', nargs='+', default=['full', 'subnets'], choices=['full', 'subnets'],
                   help="compiled ST/ST++ rows: StimulativeTask.compile(scope=...) for each: 'full' = whole-model "
                        "compile of the full pass, subnets eager; 'subnets' = the compiled model runs the subnet "
                        "passes too (one graph per (subnet, size): needs --stim-sizes)")
    p.add_argument('--no-compile-cache', action='store_true',
                   help="disable inductor's on-disk FX graph / AOT autograd caches (cold compile times)")
    p.add_argument('--graph-steps', type=int, default=50,
                   help='with --compile: compiled ST++ M=1 steps for the graph-count check (0: off)')
    p.add_argument('--no-reset-dynamo', dest='reset_dynamo', action='store_false',
                   help='keep dynamo caches between configs (default: torch._dynamo.reset() after each)')
    p.add_argument('--memory-steps', type=int, default=3,
                   help='CPU: profiled (untimed) steps per config for memory; the peak is the max over them')
    p.add_argument('--no-worst-case-memory', dest='worst_case_memory', action='store_false',
                   help='skip the extra step with every subnet = full net at full size (M=1 and memory-lean rows)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--clock', default='cpu', choices=['cpu', 'wall'],
                   help='CPU device: time steps by process CPU time (default; robust when other jobs share the '
                        'cores) or wall time. Both are recorded. CUDA always uses events / wall time.')
    p.add_argument('--no-cudnn-benchmark', dest='cudnn_benchmark', action='store_false',
                   help='CUDA: leave cudnn.benchmark off (default on, as timm train.py; ST++ sizes are then '
                        'pre-warmed once before timing)')
    p.add_argument('--prewarm-max-s', type=float, default=90.0,
                   help='CUDA + cudnn.benchmark: before the first ST++ config, run the full net once at every ST++ '
                        'size (at most this many seconds) so autotuning is not timed; 0: off')
    p.add_argument('--no-script-loop', dest='script_loop', action='store_false',
                   help="skip the train_stim.py --stim none epoch loop vs minimal timm loop comparison")
    p.add_argument('--script-loop-rounds', type=int, default=6,
                   help='interleaved rounds (of --script-loop-batches batches each) of that comparison')
    p.add_argument('--script-loop-batches', type=int, default=None, help='batches per round (default: --repeats)')
    p.add_argument('--script-loop-config', default='none', choices=CONFIGS[:1] + CONFIGS[3:],
                   help="'none': train_stim.py --stim none vs a minimal timm loop (runs with the 'none' config); "
                        "an ST config: train_stim.py's loop vs this benchmark's step loop of that config (runs first)")
    p.add_argument('--script-loop-subnets', type=int, default=6, help='M of an ST --script-loop-config')
    p.add_argument('--script-loop-compile', action='store_true',
                   help="compile both sides of the comparison (StimulativeTask.compile(scope='full'))")
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='write results here')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_compile_cache:
        try:
            import torch._inductor.config as inductor_config
            inductor_config.fx_graph_cache = False
            import torch._functorch.config as functorch_config
            functorch_config.enable_autograd_cache = False
        except (ImportError, AttributeError):
            pass
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit('--device cuda but CUDA is not available; use --device cpu')
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    load_start = os.getloadavg() if hasattr(os, 'getloadavg') else None
    bench = Bench(args)
    result = run(bench)
    meta = dict(bench.meta_base(), loadavg_start=load_start, total_s=time.time() - t0,
                loadavg_end=os.getloadavg() if hasattr(os, 'getloadavg') else None)
    result = {'meta': meta, **result}
    print(f"# {meta['device']} | torch {meta['torch']} timm {meta['timm']} | {meta['date']}")
    print(f"# {meta['command']}")
    print(f"# {args.model} batch {args.batch_size} at {args.img_size}px, amp {args.amp_dtype}, "
          f"channels_last {args.channels_last}, {args.repeats} timed / {args.warmup} warm-up steps, "
          f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}")
    print_table(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == '__main__':
    main()
