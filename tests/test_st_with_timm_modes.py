"""ST/ST++ combined with timm's other training modes, end to end on the built-in digits (CPU, tiny settings).

timm's scheduled-resolution loader (--train-img-sizes), its NaFlex loader (--naflex-loader) and logit knowledge
distillation (--kd-model-name) each run with subnet training; the --stim none runs of the same modes are checked
number for number against timm's train.py in test_timm_parity.py. Also timm's per-interval `Test:` lines.
"""
import logging
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_train_stim import FAST, load_ckpt, read_summary, run_train  # noqa: E402


@pytest.mark.slow
def test_stpp_with_scheduled_resolutions_draws_subnet_sizes_per_batch_size(tmp_path):
    out = tmp_path / 'out'
    res = run_train('--model', 'resnet18', '--stim', 'st++', '--stim-min-scale', '0.5', '--epochs', '1',
                    '--train-img-sizes', '24', '32', '--train-batch-sizes', '48', '32',
                    '--variable-batch-loss-scale', 'linear', '--output', out, '--experiment', 'run', *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'Scheduled training resolutions [24, 32] with batch sizes (48, 32)' in res.stdout
    row = read_summary(out / 'run')[0]
    # subnet inputs come from [12, 24] for 24 px batches and [16, 32] for 32 px ones: the mean lies in between
    assert 12 <= float(row['train_stim_size']) < 32
    state = load_ckpt(out / 'run' / 'last.pth.tar')['task_state']['stimulator']
    assert {int(s) for s in state['size_samplers']} == {24, 32}


@pytest.mark.slow
def test_st_with_naflex_loader_trains_a_naflex_vit(tmp_path):
    out = tmp_path / 'out'
    res = run_train('--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=64', 'depth=4',
                    'num_heads=2', '--stim', 'st', '--opt', 'adamw', '--lr', '1e-3', '--epochs', '1',
                    '--naflex-loader', '--naflex-train-seq-lens', '4', '16', '--naflex-max-seq-len', '4',
                    '--output', out, '--experiment', 'run', *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'NaFlex loader: sequence lengths [4, 16]' in res.stdout
    row = read_summary(out / 'run')[0]
    assert float(row['train_stim_loss']) > 0 and float(row['train_depth_frac']) < 1
    assert float(row['eval_top1']) >= 0
    # the weights load into a plain timm NaFlex ViT
    model = timm.create_model('naflexvit_base_patch16_gap', embed_dim=64, depth=4, num_heads=2, num_classes=10)
    model.load_state_dict(load_ckpt(out / 'run' / 'last.pth.tar')['state_dict'])


@pytest.mark.slow
def test_stpp_with_logit_distillation_from_a_local_teacher(tmp_path):
    torch.manual_seed(0)
    save_for_hf(timm.create_model('resnet10t', num_classes=10), str(tmp_path / 'teacher'),
                model_config=dict(num_classes=10))
    out = tmp_path / 'out'
    res = run_train('--model', 'resnet18', '--stim', 'st++', '--epochs', '1', '--kd-model-name',
                    f'local-dir:{tmp_path / "teacher"}', '--task-loss-weight', '0.5', '--output', out,
                    '--experiment', 'run', *FAST)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'Knowledge distillation (logit)' in res.stdout and 'task_weight=0.5, distill_weight=0.5' in res.stdout
    row = read_summary(out / 'run')[0]
    assert float(row['train_stim_loss']) > 0
    # the checkpoint holds the student only, not the teacher
    keys = load_ckpt(out / 'run' / 'last.pth.tar')['state_dict']
    assert set(keys) == set(timm.create_model('resnet18', num_classes=10).state_dict())


def test_validation_logs_timm_test_lines(tmp_path, caplog):
    import train_stim
    caplog.set_level(logging.INFO)
    out = tmp_path / 'out'
    code = train_stim.main(['--model', 'resnet10t', '--stim', 'none', '--epochs', '1', '--train-num-samples', '64',
                            '--val-num-samples', '80', '-b', '32', '--workers', '0', '--log-interval', '2',
                            '--output', str(out), '--experiment', 'run'])
    assert code == 0
    lines = [line for line in caplog.messages if line.startswith('Test: [')]
    # 80 images in batches of 32: batches 0, 1, 2; logged at 0 (interval 2) and at the last, 2
    assert [line.split(']')[0] for line in lines] == ['Test: [   0/2', 'Test: [   2/2']
    final = float(lines[-1].split('Acc@1:')[1].split('(')[1].split(')')[0])
    assert abs(final - float(read_summary(out / 'run')[0]['eval_top1'])) < 1e-3
