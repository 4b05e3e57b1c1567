"""train_stim.py under torchrun: 2 CPU processes (gloo), DDP, rank-0-only outputs."""
import socket
import sys

import pytest
import yaml

from test_train_stim import FAST, load_ckpt, read_summary, run_train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / 'out'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                '--master_addr', '127.0.0.1', '--master_port', str(_free_port())]
    # grad accumulation exercises task.no_sync() on the non-final micro-steps
    res = run_train('--model', 'resnet18', '--stim', 'st++', '--epochs', '1', '--grad-accum-steps', '2',
                    '--output', out, '--experiment', 'ddp', *FAST, launcher=launcher, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'Distributed: 2 processes' in res.stdout
    assert [p.name for p in out.iterdir()] == ['ddp']  # one output folder
    run = out / 'ddp'
    assert len(read_summary(run)) == 1  # rank 1 wrote no second row
    assert res.stdout.count('Eval: 0 ') == 1  # and logged nothing at INFO
    args = yaml.safe_load((run / 'args.yaml').read_text())
    assert args['world_size'] == 2
    ckpt = load_ckpt(run / 'last.pth.tar')
    assert len(ckpt['train_state']['rng']) == 2  # every rank's RNG state, for an exact resume
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])
