"""Knowledge distillation (timm's --kd-* flags) inside StimulativeTask.

The losses in timm_stim.distill must give exactly the loss of timm's own distillation tasks on the same student,
teacher and batch (logit, token soft/hard, feature with a projection), keep the teacher frozen and in eval mode,
put a feature projection into the optimizer and the checkpoint's task state, and combine with ST's subnet loss.
"""
import copy
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from timm.task import DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

from timm_stim import StimulativeTask, create_stim_config, create_stimulator
from timm_stim.distill import (FeatureDistillationLoss, LogitDistillationLoss, TokenDistillationLoss,
                               create_distillation_loss, distillation_weights, optimizer_module)


def _kd_args(**overrides):
    args = dict(kd_model_name=None, kd_distill_type='logit', kd_temperature=4.0, task_loss_weight=None,
                distill_loss_weight=None, kd_token_distill_type='soft', kd_student_feature_dim=None,
                kd_teacher_feature_dim=None)
    args.update(overrides)
    return SimpleNamespace(**args)


def _batch(size=32, n=6):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


def _teacher(arch='resnet10t', **kwargs):
    torch.manual_seed(0)
    return DistillationTeacher(timm.create_model(arch, num_classes=10, **kwargs))


def _mean_std(model):
    return model.pretrained_cfg['mean'], model.pretrained_cfg['std']


def test_weight_modes_follow_timm():
    assert distillation_weights(None, None) == (1.0, 1.0)
    assert distillation_weights(0.3, None) == (0.3, pytest.approx(0.7))
    assert distillation_weights(None, 0.5) == (1.0, 0.5)
    assert distillation_weights(0.2, 0.5) == (0.2, 0.5)


def test_logit_loss_equals_timm_task():
    x, y = _batch()
    torch.manual_seed(2)
    student = timm.create_model('resnet10t', num_classes=10)
    teacher = _teacher('resnet18')
    timm_task = LogitDistillationTask(copy.deepcopy(student), teacher, criterion=nn.CrossEntropyLoss(),
                                      task_loss_weight=0.3, temperature=2.0, verbose=False)
    loss = LogitDistillationLoss(teacher, nn.CrossEntropyLoss(), *_mean_std(student), 0.3, 0.7, temperature=2.0)
    ours = StimulativeTask(student, loss, None, verbose=False)
    timm_task.train(), ours.train()
    want, got = timm_task(x, y)['loss'], ours(x, y)['loss']
    assert torch.equal(got, want), (got, want)
    assert not teacher.training  # task.train() leaves the teacher in eval mode
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.mark.parametrize('hard', [False, True])
def test_token_loss_equals_timm_task(hard):
    x, y = _batch()
    torch.manual_seed(2)
    student = timm.create_model('deit_tiny_distilled_patch16_224', num_classes=10, img_size=32, depth=2)
    teacher = _teacher()
    timm_task = TokenDistillationTask(copy.deepcopy(student), teacher, criterion=nn.CrossEntropyLoss(),
                                      distill_type='hard' if hard else 'soft', temperature=3.0, verbose=False)
    args = _kd_args(kd_model_name='unused', kd_distill_type='token', kd_temperature=3.0,
                    kd_token_distill_type='hard' if hard else 'soft')
    student.set_distilled_training(True)
    loss = TokenDistillationLoss(teacher, nn.CrossEntropyLoss(), *_mean_std(student), 1.0, 1.0,
                                 temperature=args.kd_temperature, hard=hard)
    ours = StimulativeTask(student, loss, None, verbose=False)
    timm_task.train(), ours.train()
    assert torch.equal(ours(x, y)['loss'], timm_task(x, y)['loss'])


def test_feature_loss_with_projection_equals_timm_task():
    x, y = _batch()
    torch.manual_seed(2)
    student = timm.create_model('resnet10t', num_classes=10)  # 512 features
    teacher = _teacher('vit_tiny_patch16_224', img_size=32, depth=2)  # 192 features: a projection is needed
    timm_task = FeatureDistillationTask(copy.deepcopy(student), teacher, criterion=nn.CrossEntropyLoss(),
                                        distill_loss_weight=0.5, verbose=False)
    projection = copy.deepcopy(timm_task.trainable_module.projection)
    assert isinstance(projection, nn.Linear) and projection.out_features == 192
    loss = FeatureDistillationLoss(teacher, nn.CrossEntropyLoss(), *_mean_std(student), 1.0, 0.5,
                                   projection=projection)
    ours = StimulativeTask(student, loss, None, verbose=False)
    timm_task.train(), ours.train()
    got = ours(x, y)['loss']
    assert torch.equal(got, timm_task(x, y)['loss'])
    got.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0

    # the optimizer trains the projection too, after the model's parameters (timm's order)
    opt_params = [p for group in torch.optim.SGD(optimizer_module(student, loss).parameters(), lr=0.1).param_groups
                  for p in group['params']]
    assert opt_params[-2:] == [projection.weight, projection.bias]
    # and gradient clipping covers it, as timm's task does (the teacher's frozen weights are not clipped)
    assert ours.get_clip_parameters()[-2:] == [projection.weight, projection.bias]
    assert len(ours.get_clip_parameters()) == len(list(student.parameters())) + 2

    # the checkpoint's task state carries the projection, and a new task restores it
    state = ours.get_task_state()
    assert set(state) == {'distillation'}
    fresh = FeatureDistillationLoss(teacher, nn.CrossEntropyLoss(), *_mean_std(student), 1.0, 0.5,
                                    projection=nn.Linear(512, 192))
    other = StimulativeTask(copy.deepcopy(student), fresh, None, verbose=False)
    other.load_task_state(state)
    assert torch.equal(fresh.projection.weight, projection.weight)


def test_distillation_adds_to_st_main_loss_and_subnets_distil_from_full_net():
    x, y = _batch()
    torch.manual_seed(2)
    student = timm.create_model('resnet18', num_classes=10)
    for m in student.modules():  # timm zero-inits each block's last BN gamma: make blocks non-identity
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    teacher = _teacher()
    loss = LogitDistillationLoss(teacher, nn.CrossEntropyLoss(), *_mean_std(student), 1.0, 1.0, temperature=4.0)
    stim = create_stimulator(student, create_stim_config('st'), full_size=32)
    task = StimulativeTask(student, loss, stim, verbose=False)
    task.train()
    out = task(x, y)
    # main loss = the distillation loss on the full network's logits; total = main + weight * subnet KL
    assert torch.allclose(out['main_loss'], loss(out['output'], y, input=x).detach())
    assert torch.allclose(out['loss'], out['main_loss'] + stim.config.weight * out['stim_loss'])
    assert out['stim_loss'] > 0 and len(out['draws']) == stim.config.num_subnets


def test_create_distillation_loss_builds_timm_teacher_from_local_folder(tmp_path):
    from timm.models import save_for_hf
    torch.manual_seed(0)
    save_for_hf(timm.create_model('resnet10t', num_classes=10), str(tmp_path / 'teacher'),
                model_config=dict(num_classes=10))
    student = timm.create_model('resnet18', num_classes=10)
    loss = create_distillation_loss(_kd_args(kd_model_name=f'local-dir:{tmp_path / "teacher"}',
                                             task_loss_weight=0.25), student, nn.CrossEntropyLoss())
    assert isinstance(loss, LogitDistillationLoss)
    assert (loss.task_weight, loss.distill_weight, loss.temperature) == (0.25, 0.75, 4.0)
    saved = timm.create_model(f'local-dir:{tmp_path / "teacher"}', pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(loss.teacher.model.state_dict().values(),
                                                saved.state_dict().values()))
    with pytest.raises(ValueError, match='distillation head'):
        create_distillation_loss(_kd_args(kd_model_name='unused', kd_distill_type='token'), student,
                                 nn.CrossEntropyLoss())
