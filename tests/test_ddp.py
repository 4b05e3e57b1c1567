"""Two-process DDP (gloo, CPU): StimulativeTask gradients equal a single-process run on the full batch.

The model is a small ViT (LayerNorm only, no BatchNorm): with BN, batch statistics of a batch of 8 and of two
halves of 4 differ, so DDP and a single process would compute different functions. A ViT has no buffers at
all, so DDP's buffer broadcast (broadcast_buffers=True, the default) has nothing to do and is left on.
Every loss term is a per-sample mean (CE, batch-mean KL on per-sample standardized logits), so the mean over
8 equals the average of the two half-batch means, which is what DDP's gradient averaging computes.

The memory-lean run checks that gradients written to `.grad` by `torch.autograd.grad` inside the DDP forward
are all-reduced exactly once, by the single backward of the full network's loss.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import os
    import sys

    import torch
    torch.set_num_threads(1)

    GLOBAL_BATCH = 8
    CFG = dict(space='st', num_subnets=2, weight=1.0, per_rank=False, seed=5)


    def build(memory_lean):
        import timm
        import torch.nn as nn
        from timm_stim import StimulativeTask, create_stim_config, create_stimulator, smaller_input_kwargs
        name = 'vit_tiny_patch16_224'
        torch.manual_seed(0)
        model = timm.create_model(name, img_size=32, patch_size=8, depth=8, embed_dim=64, num_heads=2,
                                  num_classes=10, **smaller_input_kwargs(name))
        stim = create_stimulator(model, create_stim_config('st++', memory_lean=memory_lean, **CFG))
        return model, StimulativeTask(model, nn.CrossEntropyLoss(), stim, verbose=False)


    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


    def run(task, model, x, y):
        task.train()
        out = task(x, y)
        out['loss'].backward()
        return {
            'draws': [(tuple(s.keep), int(sz)) for s, sz in out['draws']],
            'loss': out['loss'].detach(),
            'grads': {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            'num_params': sum(1 for _ in model.parameters()),
        }


    def main():
        import torch.distributed as dist
        rank, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
        try:
            x, y = data()
            half = GLOBAL_BATCH // 2
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
            for lean in (False, True):
                model, task = build(lean)
                task.prepare_distributed(find_unused_parameters=False)
                res = run(task, model, x, y)
                torch.save(res, os.path.join(out_dir, f'rank{rank}_lean{int(lean)}.pt'))
                dist.barrier()
        finally:
            dist.destroy_process_group()


    if __name__ == '__main__':
        main()
''')


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_two_ranks(worker: Path, rank_args) -> None:
    """Run `python worker RANK PORT *rank_args(RANK)` as a 2-process gloo group (one thread each, the repo
    importable) and assert both ranks exit 0, showing a failing rank's log."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1',
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), port, *map(str, rank_args(r))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f'rank {r} failed:\n{log[-4000:]}'


def _load_worker(path):
    spec = importlib.util.spec_from_file_location('stim_ddp_worker', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def ddp_results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip('torch.distributed is not available')
    tmp = tmp_path_factory.mktemp('ddp')
    worker = tmp / 'stim_ddp_worker.py'
    worker.write_text(WORKER)
    run_two_ranks(worker, lambda r: [tmp])
    out = {(r, lean): torch.load(tmp / f'rank{r}_lean{lean}.pt') for r in range(2) for lean in (0, 1)}
    return out, _load_worker(worker)


@pytest.mark.slow
@pytest.mark.parametrize('lean', [0, 1])
def test_ddp_matches_single_process(ddp_results, lean):
    results, worker = ddp_results
    r0, r1 = results[(0, lean)], results[(1, lean)]
    # per_rank=False: the same subnets and sizes on both ranks, and they do drop blocks
    assert r0['draws'] == r1['draws']
    assert any(not all(keep) for keep, _ in r0['draws'])

    # single-process reference on the full batch of 8 with the same draws
    model, task = worker.build(bool(lean))
    x, y = worker.data()
    ref = worker.run(task, model, x, y)
    assert ref['draws'] == r0['draws']
    # the loss of the full batch is the mean of the two half-batch losses
    torch.testing.assert_close((r0['loss'] + r1['loss']) / 2, ref['loss'], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(r0['loss'], r1['loss'])

    # every parameter got a gradient (find_unused_parameters=False works) ...
    assert len(ref['grads']) == ref['num_params'] == len(r0['grads']) == len(r1['grads'])
    for k, g in ref['grads'].items():
        # ... DDP averaged them: both ranks hold the same gradient, equal to the full-batch one
        assert torch.equal(r0['grads'][k], r1['grads'][k]), k
        torch.testing.assert_close(r0['grads'][k], g, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_ddp_lean_equals_non_lean(ddp_results):
    results, _ = ddp_results
    a, b = results[(0, 0)], results[(0, 1)]
    assert a['draws'] == b['draws']
    for k in a['grads']:
        torch.testing.assert_close(b['grads'][k], a['grads'][k], rtol=1e-4, atol=1e-5, msg=k)
