"""benchmarks/step_cost.py runs end to end on CPU (tiny settings) and reports consistent numbers.

The GPU benchmark is one prepared run on a lent machine; a code path that first runs there (a bad import,
a renamed API) costs that run. This exercises every config, both compile scopes (dynamo capture only), the
memory-lean comparison, the script-loop comparison and the cudnn pre-warm on a tiny resnet18.
"""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import step_cost  # noqa: E402

TINY = ['--model', 'resnet18', '--batch-size', '4', '--img-size', '32', '--device', 'cpu', '--num-classes', '10',
        '--memory-steps', '1', '--script-loop-rounds', '2']


@pytest.mark.slow
def test_step_cost_every_config(tmp_path, capsys):
    out = tmp_path / 'r.json'
    step_cost.main(TINY + ['--repeats', '2', '--warmup', '1', '--subnets', '1', '2', '--compile',
                           '--configs', 'plain', 'none', 'hand', 'st++', 'st++lean',
                           '--compile-backend', 'eager', '--graph-steps', '2', '--stim-sizes', '16', '24', '32',
                           '--json', str(out)])
    result = json.loads(out.read_text())
    rows = {(r['config'], r['subnets'], r['compiled'], r.get('compile_scope')): r for r in result['rows']}
    assert not [r for r in result['rows'] if 'error' in r]
    for config in ('st++', 'st++lean'):
        for m in (1, 2):
            r = rows[(config, m, False, None)]
            assert r['ideal_ratio'] > 1 and r['median_ms'] > 0 and len(r['times_ms']) == 2
            assert r['measured_over_ideal'] == pytest.approx(r['ratio_vs_plain'] / r['ideal_ratio'])
    assert rows[('st++', 1, True, 'full')]['graphs_per_step'][-1] == 1  # one graph: the full pass
    assert rows[('st++', 1, True, 'blocks')]['graphs_per_step'][-1] > 8  # at least one per compiled block
    assert rows[('st++lean', 2, False, None)]['memory_vs_stpp_m1'] > 0
    assert result['script_loop']['ratio'] > 0 and result['dispatch_overhead']['hand_us'] > 0
    assert result['graph_check']['compiled_blocks'] == 8
    text = capsys.readouterr().out
    for marker in ('[loop]', '[dispatch]', 'cmp-full', 'cmp-block', 'mean m/i'):
        assert marker in text, marker


def test_prewarm_runs_every_size():
    """The cudnn pre-warm (GPU runs only) runs the model once per ST++ size; here on CPU for the code path."""
    bench = step_cost.Bench(step_cost.parse_args(TINY + ['--stim-sizes', '16', '24', '32']))
    seen = []
    create = bench.new_model

    def recording_model():  # the real model, with a hook recording the input sizes it actually ran at
        model = create()
        model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
        return model

    bench.new_model = recording_model
    bench.prewarm_sizes()
    assert seen == [(16, 16), (24, 24), (32, 32)]
    assert bench.prewarm_sizes_done == (3, 3)
