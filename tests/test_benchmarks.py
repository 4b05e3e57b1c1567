"""benchmarks/step_cost.py runs end to end on CPU (tiny settings) and reports consistent numbers.

The GPU benchmark is one prepared run on a lent machine; a code path that first runs there (a bad import,
a renamed API) costs that run. This exercises every config, both compile scopes (dynamo capture only), the
memory-lean comparison, the script-loop comparisons and the cudnn pre-warm on a tiny resnet18; then the sync
check (benchmarks/sync_check.py), the train-section checks (benchmarks/train_check.py) and gpu_bench.sh's CPU
branch.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import step_cost  # noqa: E402
import sync_check  # noqa: E402
import train_check  # noqa: E402
import torch  # noqa: E402

TINY = ['--model', 'resnet18', '--batch-size', '4', '--img-size', '32', '--device', 'cpu', '--num-classes', '10',
        '--memory-steps', '1', '--script-loop-rounds', '2']


@pytest.mark.slow
def test_step_cost_every_config(tmp_path, capsys):
    out = tmp_path / 'r.json'
    step_cost.main(TINY + ['--repeats', '2', '--warmup', '1', '--subnets', '1', '2', '--compile',
                           '--configs', 'plain', 'none', 'hand', 'st++', 'st++lean',
                           '--compile-backend', 'eager', '--graph-steps', '3', '--stim-sizes', '16', '24', '32',
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
    for m in (1, 2):  # resnet18 ST++: 4 subnets x 3 sizes, all pre-compiled; none compiled in timed steps
        r = rows[('st++', m, True, 'subnets')]
        assert r['precompile_pairs'] == 12 and r['graph_bound'] == 2 + 12
        assert r['graphs_total'] == 1 + 12 and r['dynamo_timed']['unique_graphs'] == 0
        assert r['compile_vs_plain'] == pytest.approx(
            r['compile_overhead_s'] / rows[('plain', 0, True, None)]['compile_overhead_s'])
    assert rows[('st++lean', 2, False, None)]['memory_vs_stpp_m1'] > 0
    assert result['script_loop']['ratio'] > 0 and result['dispatch_overhead']['hand_us'] > 0
    check = result['graph_check']
    assert check['final_graphs'] == 1 + check['pairs_met'] <= check['graph_bound']
    text = capsys.readouterr().out
    for marker in ('[loop]', '[dispatch]', 'cmp-full', 'cmp-subn', 'mean m/i', '(bound 14)'):
        assert marker in text, marker


@pytest.mark.slow
def test_step_cost_script_loop_of_an_st_config(tmp_path):
    """--script-loop-config st++lean: train_stim's epoch loop vs the step loop, compiled; subnets scope refused
    without size buckets is reported as a row, not a crash."""
    out = tmp_path / 'r.json'
    step_cost.main(TINY + ['--repeats', '2', '--warmup', '1', '--subnets', '2', '--configs', 'plain', 'st++',
                           '--compile', '--compile-only', '--compile-backend', 'eager', '--graph-steps', '0',
                           '--script-loop-config', 'st++lean', '--script-loop-subnets', '2', '--script-loop-compile',
                           '--script-loop-batches', '2', '--json', str(out)])
    result = json.loads(out.read_text())
    loop = result['script_loop']
    assert loop['config'] == 'st++lean' and loop['subnets'] == 2 and loop['compiled']
    assert loop['script_img_s'] == pytest.approx(4e3 / loop['script_ms'])
    assert len(loop['per_round_ms']['script']) == 2
    refused = next(r for r in result['rows'] if r.get('compile_scope') == 'subnets')
    assert refused['error'].startswith('refused:') and '--stim-sizes' in refused['error']


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


# ------------------------------------------------------------------------------------------------ sync check

def _recorded(fn):
    """Run fn inside one watched step of a StepRecorder on CPU; returns the step's events."""
    recorder = sync_check.StepRecorder(warmup_steps=0, cuda_mode=None)
    recorder.begin(epoch=0, batch_idx=1, num_batches=4, log_interval=10, accum=1)
    try:
        fn()
    finally:
        recorder.end()
    assert recorder.steps[0]['watched']
    return [e['kind'] for e in recorder.steps[0]['events']]


def test_host_sync_counter_counts_what_would_sync_on_a_gpu():
    x = torch.randn(8, requires_grad=True)
    loss = (x * 2).sum()
    assert _recorded(lambda: loss.item()) == ['_local_scalar_dense']
    assert _recorded(lambda: bool(loss > 0)) == ['_local_scalar_dense']
    assert _recorded(lambda: loss.detach().tolist()) == ['Tensor.tolist']
    assert _recorded(lambda: x.detach()[x.detach() > 0]) == ['index']  # boolean mask: a nonzero inside
    assert _recorded(lambda: torch.nonzero(x.detach())) == ['nonzero']
    assert _recorded(lambda: loss.backward()) == []  # a backward alone reads nothing back


def test_host_sync_counter_ignores_host_rng_draws():
    """The subnet sampler draws with a CPU torch.Generator: those tensors stay on the host in a GPU run too."""
    g = torch.Generator().manual_seed(0)
    assert _recorded(lambda: int(torch.randint(4, (1,), generator=g))) == []
    assert _recorded(lambda: bool((torch.rand(3, generator=g) < 0.5)[0])) == []
    assert _recorded(lambda: int(torch.randint(4, (1,)))) == ['_local_scalar_dense']  # no generator: counted


def test_log_steps_are_not_watched():
    recorder = sync_check.StepRecorder(warmup_steps=2, cuda_mode=None)
    kinds = []
    for batch in range(7):
        recorder.begin(0, batch, 7, log_interval=3, accum=1)
        recorder.end()
        kinds.append((recorder.steps[-1]['log_step'], recorder.steps[-1]['watched']))
    # log at updates 0, 3, 6 (and the last batch); warm-up: the first two steps
    assert kinds == [(True, False), (False, False), (False, True), (True, False), (False, True), (False, True),
                     (True, False)]


SYNC_TRAIN = ['--model', 'resnet18', '--stim-subnets', '2', '--epochs', '1', '--train-num-samples', '64', '-b', '16',
              '--workers', '0', '--log-interval', '3', '--device', 'cpu', '--experiment', 'x']


@pytest.mark.slow
@pytest.mark.parametrize('extra, expected', [([], False), (['--recovery-interval', '1'], True)])
def test_sync_check_runs_train_stim(tmp_path, extra, expected):
    """train_stim.py's real loop: no would-be sync in a watched step; with --recovery-interval 1 the finite check
    before every recovery checkpoint reads the device every step, and the check names the line."""
    report_path = tmp_path / 'sync.json'
    code = sync_check.main(['--warmup-steps', '1', '--json', str(report_path), '--']
                           + SYNC_TRAIN + ['--output', str(tmp_path)] + extra)
    report = json.loads(report_path.read_text())
    assert report['train_exit_code'] == 0 and code == int(expected)
    assert report['watched_steps'] == 2  # 4 steps: 0 (log, warm-up), 1, 2, 3 (log: update 3 and last batch)
    assert all(s['syncs'] >= 1 for s in report['log_steps'])  # the loss average read at every log step
    if not expected:
        assert report['syncs_per_watched_step'] == [0, 0]
    else:  # the finite check of the running loss sums, then the saver's own checks of what it writes
        assert all(n >= 1 for n in report['syncs_per_watched_step'])
        assert any('train_stim.py' in where and 'train_one_epoch' in where for where in report['watched_locations'])


# ------------------------------------------------------------------------------------------- train section

def test_check_summary_flags_non_finite_losses(tmp_path):
    path = tmp_path / 'summary.csv'
    path.write_text('epoch,train_loss,eval_loss,eval_top1,lr\n0,2.3,2.2,10.0,0.1\n1,nan,2.1,12.0,0.1\n')
    result = train_check.check_summary(str(path))
    assert not result['ok'] and result['non_finite'] == ['train_loss'] and result['epochs'] == 2
    path.write_text('epoch,train_loss,eval_loss,eval_top1,lr\n0,2.3,2.2,10.0,0.1\n')
    assert train_check.check_summary(str(path))['ok']
    assert not train_check.check_summary(str(tmp_path / 'missing.csv'))['ok']


@pytest.mark.slow
def test_train_section_end_to_end(tmp_path):
    """Synthetic folder -> train_stim.py (compiled with dynamo's capture-only backend, TORCH_LOGS=recompiles, EMA,
    mixup) -> train_check: exit 0, finite losses, recompiles counted from the real log, strict load into timm."""
    info = train_check.make_folder(str(tmp_path / 'data'), classes=2, train_per_class=16, val_per_class=4, size=40,
                                   workers=1)
    assert info['written'] == 40 and len(os.listdir(tmp_path / 'data' / 'train' / 'class_1')) == 16
    log = tmp_path / 'run.log'
    cmd = [sys.executable, os.path.join(REPO, 'train_stim.py'), '--data-dir', str(tmp_path / 'data'),
           '--model', 'resnet18', '--num-classes', '2', '-b', '8', '--img-size', '32', '--epochs', '2',
           '--workers', '0', '--log-interval', '1', '--device', 'cpu', '--stim-subnets', '2', '--model-ema',
           '--mixup', '0.2', '--torchcompile', 'eager', '--output', str(tmp_path / 'out'), '--experiment', 'run']
    env = dict(os.environ, TORCH_LOGS='recompiles', OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    with open(log, 'w') as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=600).returncode
    out = tmp_path / 'check.json'
    rc = train_check.main(['check', '--run-dir', str(tmp_path / 'out' / 'run'), '--log', str(log), '--model',
                           'resnet18', '--num-classes', '2', '--exit-code', str(code), '--json', str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and rc == 0 and result['ok'], result
    assert result['summary']['epochs'] == 2 and 'train_stim_loss' in result['summary']['losses']
    assert result['recompiles']['recompiles'] == log.read_text().count('Recompiling function') <= 8
    assert result['checkpoint']['state_dict'] == result['checkpoint']['state_dict_ema'] == 'loaded (strict)'
    assert result['speed']['log_lines'] == 8 and result['speed']['img_s_median'] > 0


@pytest.mark.slow  # two interpreter starts that import torch and timm: ~25 s on a loaded 2-core machine
def test_gpu_bench_cpu_branch_sets_up(tmp_path):
    """The script's CPU branch (variables under set -u, environment record) runs; an unknown section is named."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_bench.sh'), 'nosuch'], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "CPU dry run" in res.stdout
    assert "unknown section nosuch (use sync, resume, train, loop, r50, deit, compile (= compile_r50 compile_deit))" \
        in res.stdout
    assert 'torch' in (tmp_path / 'env.txt').read_text()
