"""Step benchmark results: figures relative to the plain row, one-line rows and the printed tables."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional


def add_relative(rows: List[Dict[str, Any]]) -> None:
    """ratio / memory vs the plain row of the same compile mode."""
    for compiled in (False, True):
        base = next((r for r in rows if r.get('config') == 'plain' and r['compiled'] == compiled and 'error' not in r),
                    None)
        if base is None:
            base = next((r for r in rows if r.get('config') == 'hand' and r['compiled'] == compiled), None)
        for r in rows:
            if r['compiled'] != compiled or 'error' in r or base is None:
                continue
            r['ratio_vs_plain'] = r['median_ms'] / base['median_ms']
            if compiled and r is not base and r.get('compile_overhead_s') and base.get('compile_overhead_s'):
                r['compile_vs_plain'] = r['compile_overhead_s'] / base['compile_overhead_s']
            r['measured_over_ideal'] = r['ratio_vs_plain'] / r['ideal_ratio']
            if r.get('mean_ms') and base.get('mean_ms'):  # total time: the ideal is a mean over steps too
                r['measured_over_ideal_mean'] = r['mean_ms'] / base['mean_ms'] / r['ideal_ratio']
            key = 'peak_mib' if (r.get('peak_mib') and base.get('peak_mib')) else 'step_peak_mib'
            if r.get(key) and base.get(key):
                r['memory_vs_plain'] = r[key] / base[key]
                r['memory_vs_plain_basis'] = key
    # memory-lean target: ST++ lean with the largest M vs ST++ (not lean) with M=1, same compile mode
    for r in rows:
        if r.get('config') == 'st++lean' and 'error' not in r:
            ref = next((q for q in rows if q.get('config') == 'st++' and q.get('subnets') == 1
                        and q['compiled'] == r['compiled'] and 'error' not in q), None)
            if ref and r.get('peak_mib') and ref.get('peak_mib'):
                r['memory_vs_stpp_m1'] = r['peak_mib'] / ref['peak_mib']
            if ref and r.get('peak_worst_mib') and ref.get('peak_worst_mib'):
                r['memory_worst_vs_stpp_m1'] = r['peak_worst_mib'] / ref['peak_worst_mib']


def _fmt(v, spec):
    return 'n/a' if v is None else format(v, spec)


def _mode(r: Dict[str, Any]) -> str:
    if not r.get('compiled'):
        return 'eager'
    return {'full': 'cmp-full', 'subnets': 'cmp-subn'}.get(r.get('compile_scope'), 'compiled')


def format_row(r: Dict[str, Any]) -> str:
    if 'error' in r:
        return f"{r['config']:<9} {'C' if r['compiled'] else 'E'} M={r['subnets']}: {r['error']}"
    return (f"{_mode(r):<9} {r['config']:<9} {r['subnets']:>2} "
            f"{r['median_ms']:>10.2f} {_fmt(r.get('ratio_vs_plain'), '>7.3f')} {r['ideal_ratio']:>7.3f} "
            f"{_fmt(r.get('measured_over_ideal'), '>8.3f')} {_fmt(r.get('measured_over_ideal_mean'), '>8.3f')} "
            f"{_fmt(r.get('peak_mib'), '>10.1f')} "
            f"{_fmt(r.get('step_peak_mib'), '>10.1f')} {_fmt(r.get('memory_vs_plain'), '>7.2f')} "
            f"{_fmt(r.get('peak_worst_mib'), '>10.1f') if r.get('peak_worst_mib') else format('-', '>10')}"
            + (f" {r['wall_median_ms']:>10.2f}" if r.get('wall_median_ms') is not None else ''))


def print_table(result: Dict[str, Any], out=None) -> None:
    """The rows table, then one line per comparison the result holds."""
    out = out or sys.stdout
    hdr = (f"{'mode':<9} {'config':<9} {'M':>2} {'ms/step':>10} {'ratio':>7} {'ideal':>7} {'meas/id':>8} "
           f"{'mean m/i':>8} {'peak MiB':>10} {'step MiB':>10} {'mem/pl':>7} {'worst MiB':>10}")
    clock = next((r.get('clock') for r in result['rows'] if r.get('clock')), 'wall')
    if clock == 'cpu':
        hdr += f" {'wall ms':>10}"
        print('# ms/step = median process CPU time per step (ratios use it); wall ms = median wall time', file=out)
    print(hdr, file=out)
    print('-' * len(hdr), file=out)
    for r in result['rows']:
        print(format_row(r), file=out)
    rows = result['rows']
    _print_stim_none(rows, out)
    _print_compile(rows, out)
    _print_dispatch(result.get('dispatch_overhead'), rows, out)
    _print_script_loop(result.get('script_loop'), out)
    _print_memory_lean(rows, out)
    _print_graph_check(result.get('graph_check'), out)


def _print_stim_none(rows: List[Dict[str, Any]], out) -> None:
    for compiled in (False, True):
        by = {r['config']: r for r in rows
              if r['compiled'] == compiled and r.get('subnets', 0) == 0 and 'error' not in r}
        if 'none' in by and 'hand' in by:
            print(f"[{'compiled' if compiled else 'eager'}] --stim none vs hand loop: "
                  f"{by['none']['median_ms'] / by['hand']['median_ms']:.4f}x "
                  f"(min {by['none']['min_ms'] / by['hand']['min_ms']:.4f}x)"
                  + (f"; vs ClassificationTask: {by['none']['median_ms'] / by['plain']['median_ms']:.4f}x"
                     if 'plain' in by else ''), file=out)


def _print_compile(rows: List[Dict[str, Any]], out) -> None:
    for r in rows:
        if r.get('compiled') and 'compile_overhead_s' in r and r.get('compile_overhead_s') is not None:
            print(f"[{_mode(r)}] {r['config']} M={r['subnets']}: first step {r['warmup_first_step_s']:.2f} s, "
                  f"compile overhead {r['compile_overhead_s']:.2f} s, graphs in warm-up "
                  f"{r.get('dynamo_warmup', {}).get('unique_graphs', 'n/a')}, new graphs in timed steps "
                  f"{r.get('dynamo_timed', {}).get('unique_graphs', 'n/a')}, "
                  + (f"pre-compiled {r['precompile_pairs']} (subnet, size) pairs in {r['precompile_s']:.2f} s, "
                     if r.get('precompile_pairs') else '')
                  + (f"graphs {r['graphs_total']} (bound {r['graph_bound']}), " if r.get('graph_bound') else '')
                  + (f"compile vs plain {r['compile_vs_plain']:.2f}x, " if r.get('compile_vs_plain') else '')
                  + f"recompile-limit hits {r.get('recompile_limit_hits', 'n/a')}", file=out)


def _print_dispatch(d: Optional[Dict[str, Any]], rows: List[Dict[str, Any]], out) -> None:
    plain = next((r for r in rows if r.get('config') == 'plain' and not r['compiled'] and 'error' not in r), None)
    if d:
        print(f"[dispatch] tiny model step: hand loop {d['hand_us']:.1f} us, StimulativeTask(stimulator=None) "
              f"{d['none_us']:.1f} us: +{d['overhead_us']:.1f} us per step"
              + (f" = {100 * d['overhead_us'] / (1e3 * plain['median_ms']):.4f}% of this model's plain step"
                 if plain else ''), file=out)


def _print_script_loop(sl: Optional[Dict[str, Any]], out) -> None:
    if sl:
        config = sl.get('config', 'none')
        what = ('train_stim.py --stim none epoch loop', 'minimal timm loop') if config == 'none' else (
            f"train_stim.py epoch loop ({config} M={sl['subnets']}{', compiled' if sl.get('compiled') else ''})",
            'step benchmark loop')
        print(f"[loop] {what[0]} {sl['script_ms']:.2f} ms/step vs {what[1]} "
              f"{sl['minimal_ms']:.2f} ms/step: {sl['ratio']:.4f}x (min {sl['min_ratio']:.4f}x; "
              f"{sl['rounds']} interleaved rounds of {sl['batches_per_round']} batches)", file=out)


def _print_memory_lean(rows: List[Dict[str, Any]], out) -> None:
    for r in rows:
        if r.get('config') == 'st++lean' and r.get('subnets', 0) > 1 and 'error' not in r:
            print(f"[{'compiled' if r['compiled'] else 'eager'}] memory-lean M={r['subnets']} peak vs ST++ M=1 "
                  f"(not lean): sampled draws {_fmt(r.get('memory_vs_stpp_m1'), '.3f')}x, worst-case draws "
                  f"(all subnets = full net at full size) {_fmt(r.get('memory_worst_vs_stpp_m1'), '.3f')}x", file=out)


def _print_graph_check(gc_: Optional[Dict[str, Any]], out) -> None:
    if gc_ and gc_.get('skipped'):
        print(f"[graph check] skipped: {gc_['skipped']}", file=out)
    elif gc_:
        print(f"[graph check] compiled ST++ M=1 (scope subnets), {gc_['steps']} steps, {gc_['distinct_sizes']} "
              f"distinct sizes, {gc_['pairs_met']} (subnet, size) pairs met: {gc_['final_graphs']} graphs "
              f"(1 full pass + pairs = {1 + gc_['pairs_met']}; bound {gc_['graph_bound']}), last new graph at step "
              f"{gc_['last_new_graph_step']}, recompile-limit hits {gc_['recompile_limit_hits']}", file=out)
