"""The CUDA paths, checked on CPU (issue 22): what a GPU run must not be the first to find.

--sync-bn with timm's converter (fused BatchNormAct keeps its activation), timm's CUDA speed flags, the
1-process DDP group the GPU script uses (here under gloo), memory-lean gradients in the parameter's layout,
no host-to-device copy per step for the AMP multiplier, the distillation teacher outside DDP, and BatchNorm
re-estimation of a `--model-dtype bfloat16` model.
"""
import copy
import json
import os
import socket
import sys
from contextlib import contextmanager

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import sync_check  # noqa: E402
import train_stim  # noqa: E402
from timm_stim import StimulativeTask, create_stim_config, recalibrate_bn  # noqa: E402
from timm_stim.stimulator import Stimulator, _accumulate_grads  # noqa: E402
from timm_stim.train_setup import SINGLE_RANK_DDP_ENV, init_runtime, prepare_model  # noqa: E402

DIGITS = ['--model', 'resnet18', '--train-num-samples', '64', '--val-num-samples', '32', '-b', '16', '--workers', '0',
          '--log-interval', '2', '--device', 'cpu', '--epochs', '1']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_group():
    """A gloo process group of one in this process (destroyed after, so no other test sees it)."""
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture
def torchrun_env(monkeypatch):
    """What `torchrun --nproc_per_node=1` puts in the environment, plus the 1-process DDP switch."""
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), RANK='0', LOCAL_RANK='0',
                           WORLD_SIZE='1', **{SINGLE_RANK_DDP_ENV: '1'}).items():
        monkeypatch.setenv(key, value)
    yield
    if torch.distributed.is_initialized():  # a failed run left its group behind
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ --sync-bn

def test_sync_bn_keeps_the_fused_activation():
    """timm's converter: every BatchNormAct2d becomes a SyncBatchNormAct with its activation, and the converted
    model computes what the original does (eval mode runs on CPU without a collective)."""
    model = timm.create_model('test_efficientnet', num_classes=10).eval()
    reference = copy.deepcopy(model)
    acts = [type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert nn.SiLU in acts
    args = train_stim.parse_args(['--sync-bn', '--device', 'cpu'])
    args.distributed = True
    converted = prepare_model(model, args, torch.device('cpu'))
    synced = [m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(synced) == len(acts) and all(isinstance(m, SyncBatchNormAct) for m in synced)
    assert [type(m.act) for m in synced] == acts
    assert args.dist_bn == ''
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x))


def test_sync_bn_with_per_rank_subnets_is_refused(capsys):
    code = train_stim.main(['--sync-bn', '--stim-per-rank'] + DIGITS)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ')
    assert '--sync-bn with --stim-per-rank' in err[0]


# ------------------------------------------------------------------------------------------------ CUDA flags

def test_cuda_speed_flags_set_as_timm_does(monkeypatch):
    """With CUDA available, cudnn.benchmark and TF32 matmuls on before the process group (timm's train.py)."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    args = train_stim.parse_args(['--device', 'cpu'])
    try:
        init_runtime(args)  # no CUDA here: left alone
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        init_runtime(args)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------------------------------- 1-process DDP

def test_single_rank_group_needs_torchrun_env(monkeypatch, capsys):
    monkeypatch.setenv(SINGLE_RANK_DDP_ENV, '1')
    for key in ('MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE'):
        monkeypatch.delenv(key, raising=False)
    assert train_stim.main(DIGITS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{SINGLE_RANK_DDP_ENV}=1 needs' in err[0] and 'MASTER_ADDR' in err[0]


@pytest.mark.slow  # one short training run in-process: ~10 s on a loaded 2-core machine
def test_single_rank_ddp_runs_the_ddp_paths(torchrun_env, tmp_path, monkeypatch, caplog):
    """TIMM_STIM_SINGLE_RANK_DDP=1 under torchrun's environment, as gpu_bench.sh's sync section runs it over NCCL:
    a gloo group of one, the task wrapped in DDP, memory-lean subnets through the process-group branch
    (autograd.grad), EMA broadcast, BN re-estimation, the distributed sampler; under the sync check in 'error'
    mode, with no would-be sync in a watched step."""
    tasks, lean_calls = [], []
    distribute = train_stim.compile_and_distribute

    def recording_distribute(task, args, device):
        distribute(task, args, device)
        tasks.append(task)

    monkeypatch.setattr(train_stim, 'compile_and_distribute', recording_distribute)
    grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):  # the DDP branch of _accumulate_grads is the only autograd.grad caller
        lean_calls.append(torch.distributed.is_initialized())
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, 'grad', recording_grad)
    caplog.set_level('INFO')
    report_path = tmp_path / 'sync.json'
    code = sync_check.main(['--warmup-steps', '1', '--cuda-mode', 'error', '--json', str(report_path), '--']
                           + DIGITS + ['--stim', 'st++', '--stim-subnets', '2', '--stim-memory-lean', '--model-ema',
                                       '--stim-bn-recal', '32', '--channels-last', '--output', str(tmp_path),
                                       '--experiment', 'ddp1'])
    report = json.loads(report_path.read_text())
    assert code == 0 and report['train_exit_code'] == 0, caplog.text[-2000:]
    assert report['watched_steps'] == 1 and report['watched_syncs'] == 0  # 4 steps: log at 0, 2 and 3
    assert 'Distributed: 1 processes, this is rank 0' in caplog.text
    assert 'Re-estimated BatchNorm statistics of the EMA' in caplog.text
    assert isinstance(tasks[0].trainable_module, DDP)
    assert lean_calls and all(lean_calls)
    assert not torch.distributed.is_initialized()  # destroyed at the end of the run
    assert (tmp_path / 'ddp1' / 'last.pth.tar').is_file()


# ----------------------------------------------------------------------------------- memory-lean gradients

def test_memory_lean_grads_take_the_parameter_layout():
    """Under a process group, gradients from autograd.grad land in a buffer laid out like the parameter: a
    channels_last weight keeps its strides, and an expanded gradient (d sum / d p) can be added to."""
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    bias = nn.Parameter(torch.zeros(8))
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with one_rank_group():
        for _ in range(2):
            _accumulate_grads(conv(x).sum() + bias.sum(), [conv.weight, conv.bias, bias])
    assert conv.weight.grad.stride() == conv.weight.stride()
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bias.grad, torch.full((8,), 2.0))
    expected = torch.autograd.grad(conv(x).sum(), conv.weight)[0] * 2
    torch.testing.assert_close(conv.weight.grad, expected)


# -------------------------------------------------------------------------- AMP multiplier, no copy per step

def _lean_task(memory_lean: bool) -> StimulativeTask:
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4)
    stimulator = Stimulator(model, create_stim_config('st++', num_subnets=1, memory_lean=memory_lean), full_size=32)
    task = StimulativeTask(model, nn.CrossEntropyLoss(), stimulator, verbose=False)
    task.set_loss_scaler(torch.amp.GradScaler('cpu', init_scale=8.0))
    task.set_grad_multiplier(0.5)
    return task


@pytest.mark.parametrize('memory_lean', [False, True])
def test_no_host_to_device_copy_per_step(memory_lean):
    """With a loss scaler, no step makes a tensor from Python data (on a GPU: a copy that waits) or reads the
    device; the multiplier's device tensor is made once and again only when it changes."""
    task = _lean_task(memory_lean)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    task(x, y)['loss'].backward()  # the first step makes the multiplier's tensor (and the scaler's own state)
    module = task._stim_module()
    first = module._multiplier_cache
    assert (first is not None) == memory_lean
    recorder = sync_check.StepRecorder(warmup_steps=0, cuda_mode=None)
    for step in range(2):
        recorder.begin(epoch=0, batch_idx=step + 1, num_batches=8, log_interval=100, accum=1)
        try:
            task(x, y)['loss'].backward()
        finally:
            recorder.end()
    assert [s['events'] for s in recorder.steps] == [[], []]
    assert module._multiplier_cache is first
    if memory_lean:
        assert float(first[1]) == 0.5
        task.set_grad_multiplier(0.25)
        task(x, y)
        assert float(module._multiplier_cache[1]) == 0.25


def test_sync_counter_sees_a_tensor_made_from_python_data():
    """The counter the test above relies on does count what the old code did every step."""
    recorder = sync_check.StepRecorder(warmup_steps=0, cuda_mode=None)
    recorder.begin(epoch=0, batch_idx=1, num_batches=4, log_interval=10, accum=1)
    try:
        torch.as_tensor(0.5, dtype=torch.float32, device='cpu')
    finally:
        recorder.end()
    assert [e['kind'] for e in recorder.steps[0]['events']] == ['lift_fresh']


# ------------------------------------------------------------------------------------------ teacher and BN

def test_distillation_teacher_stays_outside_ddp(monkeypatch):
    """The teacher's weights and buffers are on DDP's ignore list: not broadcast at wrap, nor every step."""
    from timm.task import DistillationTeacher
    from timm_stim.distill import LogitDistillationLoss
    torch.manual_seed(0)
    student = timm.create_model('resnet18', num_classes=4)
    teacher = DistillationTeacher(timm.create_model('resnet18', num_classes=4), num_classes=4)
    loss = LogitDistillationLoss(teacher, nn.CrossEntropyLoss(), (0.5,) * 3, (0.5,) * 3)
    task = StimulativeTask(student, loss, None, verbose=False)
    with one_rank_group():
        task.prepare_distributed()
        ddp = task.trainable_module
        ignored = set(ddp.parameters_to_ignore)
        teacher_names = {f'criterion.teacher.{n}' for n, _ in teacher.named_parameters()} | \
                        {f'criterion.teacher.{n}' for n, _ in teacher.named_buffers()}
        assert ignored == teacher_names
        synced = {n for n, _ in ddp.module.named_parameters() if n not in ignored}
        assert synced and not any(n.startswith('criterion.teacher.') for n in synced)
        out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
        out['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_recalibrate_bn_of_a_bfloat16_model():
    """--model-dtype bfloat16 --no-prefetcher: float32 batches from the loader are cast to the model's dtype."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4).to(torch.bfloat16)
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    assert recalibrate_bn(model, batches, num_images=8) == 8
    bn = model.bn1
    assert bn.running_mean.dtype == torch.bfloat16 and int(bn.num_batches_tracked) == 2
    assert torch.isfinite(bn.running_var.float()).all() and bn.running_var.float().mean() != 1.0


# ------------------------------------------------------------------------------------ sync check, 'error'

@pytest.mark.slow  # a training run in-process, stopped at its second step: ~4 s on a loaded 2-core machine
def test_sync_check_error_mode_names_the_line(torchrun_env, tmp_path):
    """A per-step read of the device (--recovery-interval 1: the finite check of the running sums) stops the
    'error' run at that read, and the report names train_stim.py's line and its code (gpu_bench.sh's planted
    sync; a clean 'error' run is the test above)."""
    report_path = tmp_path / 'sync.json'
    code = sync_check.main(['--warmup-steps', '1', '--cuda-mode', 'error', '--json', str(report_path), '--']
                           + DIGITS + ['--stim-subnets', '2', '--stim-memory-lean', '--output', str(tmp_path),
                                       '--experiment', 'x', '--recovery-interval', '1'])
    report = json.loads(report_path.read_text())
    assert not torch.distributed.is_initialized()
    assert code == 1 and report['error'].startswith('WatchedStepSynchronized')
    first = report['first_events'][0]
    assert first['project'].startswith('train_stim.py:') and first['project'].endswith('train_one_epoch')
    assert 'recovery_interval' in first['code']  # the statement holding torch.isfinite(sums).all()
