"""KL / KL- subnet losses, logit standardization, and the main criterion on standardized logits."""
import math

import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

from timm_stim import (
    StimLoss, create_stim_config, create_stim_loss, create_stimulator, kl_distill_loss, resize_batch,
    standardize_logits, stimulative_forward, subnet,
)


def _logits(n=6, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


def hand_kl(student, teacher, t=1.0):
    """T^2 * mean_b sum_c p_t (log p_t - log p_s), written out without F.kl_div."""
    p_t = torch.softmax(teacher / t, dim=-1)
    log_p_t = torch.log_softmax(teacher / t, dim=-1)
    log_p_s = torch.log_softmax(student / t, dim=-1)
    return (p_t * (log_p_t - log_p_s)).sum(-1).mean() * t * t


def hand_phi(v, a=1.0):
    c = v.shape[-1]
    mean = v.sum(-1, keepdim=True) / c
    var = ((v - mean) ** 2).sum(-1, keepdim=True) / c  # population variance
    return a * (v - mean) / torch.sqrt(var + 1e-7)


def test_standardize_matches_formula():
    v = _logits(seed=1)
    torch.testing.assert_close(standardize_logits(v), hand_phi(v))
    torch.testing.assert_close(standardize_logits(v, amplitude=2.5), hand_phi(v, 2.5))
    phi = standardize_logits(v)
    torch.testing.assert_close(phi.mean(-1), torch.zeros(6), atol=1e-6, rtol=0)
    assert torch.equal(phi.argmax(-1), v.argmax(-1))


@pytest.mark.parametrize('c', [10, 37])
@pytest.mark.parametrize('a', [1.0, 2.5])
def test_standardized_norm(c, a):
    phi = standardize_logits(_logits(n=5, c=c, seed=c), amplitude=a)
    torch.testing.assert_close(phi.norm(dim=-1), torch.full((5,), a * math.sqrt(c)), rtol=1e-5, atol=0)


@pytest.mark.parametrize('side', ['student', 'teacher'])
def test_kl_minus_invariance(side):
    loss = StimLoss('kl-')
    s, t = _logits(seed=2), _logits(seed=3)
    base = loss(s, t)
    assert base > 0.01
    for shift, scale in [(5.0, 1.0), (-3.0, 1.0), (0.0, 3.0), (0.0, 0.5), (7.0, 2.0)]:
        if side == 'student':
            out = loss(s * scale + shift, t)
        else:
            out = loss(s, t * scale + shift)
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
    # per-row constants too
    row_shift = torch.randn(6, 1) * 4
    torch.testing.assert_close(loss(s + row_shift, t), base, rtol=1e-5, atol=1e-6)
    # the plain KL is NOT scale invariant (checks the test itself can fail)
    plain = StimLoss('kl')
    assert not torch.allclose(plain(s * 3.0, t), plain(s, t), rtol=1e-3)


@pytest.mark.parametrize('kind', ['kl', 'kl-'])
def test_zero_when_equal(kind):
    z = _logits(seed=4)
    loss = StimLoss(kind, temperature=2.0)
    assert abs(float(loss(z.clone(), z))) < 1e-6
    assert float(loss(z + 1.0, z)) == pytest.approx(0.0, abs=1e-6)  # softmax is shift invariant


@pytest.mark.parametrize('t', [1.0, 2.0, 0.5])
def test_kl_matches_hand_formula(t):
    s, z = _logits(seed=5), _logits(seed=6)
    expected = hand_kl(s, z, t)
    torch.testing.assert_close(kl_distill_loss(s, z, t), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(StimLoss('kl', temperature=t)(s, z), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(StimLoss('kl-', temperature=t)(s, z), hand_kl(hand_phi(s), hand_phi(z), t),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(StimLoss('kl-', temperature=t, amplitude=3.0)(s, z),
                               hand_kl(hand_phi(s, 3.0), hand_phi(z, 3.0), t), rtol=1e-5, atol=1e-6)


def test_temperature_squared_scaling():
    s, z = _logits(seed=7), _logits(seed=8)
    unscaled = hand_kl(s, z, 2.0) / 4.0
    torch.testing.assert_close(kl_distill_loss(s, z, 2.0), 4.0 * unscaled, rtol=1e-5, atol=1e-6)


def test_loss_is_batch_mean():
    s, z = _logits(n=8, seed=9), _logits(n=8, seed=10)
    loss = StimLoss('kl-')
    per_half = (loss(s[:4], z[:4]) + loss(s[4:], z[4:])) / 2
    torch.testing.assert_close(loss(s, z), per_half, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', ['kl', 'kl-'])
def test_gradient_reaches_only_student(kind):
    s = _logits(seed=11).requires_grad_(True)
    z = _logits(seed=12).requires_grad_(True)
    out = StimLoss(kind, temperature=2.0)(s, z)
    assert out.requires_grad
    out.backward()
    assert z.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the gradient w.r.t. the student is the analytic one: T * (p_s - p_t) / B for the plain KL
    if kind == 'kl':
        expected = 2.0 * (torch.softmax(s.detach() / 2, -1) - torch.softmax(z.detach() / 2, -1)) / 6
        torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_half_precision_inputs_computed_in_float32():
    s, z = _logits(seed=13), _logits(seed=14)
    out = kl_distill_loss(s.to(torch.bfloat16), z.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hand_kl(s.bfloat16().float(), z.bfloat16().float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(kind='mse'), "unknown stim loss 'mse'"),
    (dict(kind='KL'), 'unknown stim loss'),
    (dict(temperature=0.0), 'temperature and amplitude must be > 0'),
    (dict(temperature=-1.0), 'must be > 0'),
    (dict(kind='kl-', amplitude=0.0), 'must be > 0'),
])
def test_invalid_loss_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_stim_loss(**kwargs)


# --------------------------------------------------------------------------------------------------------
# main criterion on standardized logits, with mixup soft targets

def _mixed_targets(target, num_classes, lam, smoothing=0.1):
    off = smoothing / num_classes
    y1 = torch.full((target.shape[0], num_classes), off).scatter_(1, target[:, None], 1 - smoothing + off)
    y2 = y1.flip(0)
    return y1 * lam + y2 * (1 - lam)


@pytest.mark.parametrize('standardize', [True, False])
def test_stimulative_forward_standardized_main_with_soft_targets(standardize):
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10).train()
    cfg = create_stim_config('st++', num_subnets=2, standardize_main=standardize, weight=0.7, seed=3)
    assert cfg.loss == 'kl-'
    stim = create_stimulator(model, cfg, full_size=32)
    x = torch.randn(4, 3, 32, 32)
    target = _mixed_targets(torch.tensor([1, 3, 5, 7]), 10, lam=0.6)
    criterion = SoftTargetCrossEntropy()
    draws = stim.sample()
    ref_model = timm.create_model('resnet18', num_classes=10)
    ref_model.load_state_dict(model.state_dict())
    ref_model.train()

    out = stimulative_forward(model, x, target, criterion, stim, draws=draws)
    assert out['draws'] == draws

    # by hand, with the same draws: main criterion on phi(z), stim loss KL- per subnet at its size
    z = ref_model(x)
    main_in = hand_phi(z) if standardize else z
    main = (-target * torch.log_softmax(main_in, -1)).sum(-1).mean()
    stim_total = 0.0
    for spec, size in draws:
        with subnet(ref_model, stim.layout, spec):
            u = ref_model(resize_batch(x, size))
        stim_total = stim_total + hand_kl(hand_phi(u), hand_phi(z.detach()))
    torch.testing.assert_close(out['output'], z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out['main_loss'], main.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['stim_loss'], stim_total.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out['loss'], main + 0.7 * stim_total, rtol=1e-4, atol=1e-6)
    # the criterion really saw different logits in the two settings
    other = (-target * torch.log_softmax(z if standardize else hand_phi(z), -1)).sum(-1).mean()
    assert not torch.allclose(other, main, rtol=1e-3)


def test_st_preset_does_not_standardize_main():
    cfg = create_stim_config('st')
    assert cfg.loss == 'kl' and cfg.standardize_main is False and cfg.min_scale == 1.0
    cfg = create_stim_config('st++')
    assert cfg.loss == 'kl-' and cfg.standardize_main is True and cfg.min_scale is None  # set by the training size
    cfg = create_stim_config('st++', loss='kl')
    assert cfg.standardize_main is False


def test_stpp_smaller_inputs_default_by_resolution(caplog):
    """The ST++ preset's smaller inputs: the authors' [0.43 S, S] from 64 px up, off below (they hurt at 32 px:
    docs/results/stpp_lowres.md); an explicit --stim-min-scale always wins."""
    import timm
    from timm_stim import create_stimulator
    from timm_stim.stimulator import default_min_scale
    assert default_min_scale(224) == 0.43 and default_min_scale(64) == 0.43 and default_min_scale(32) == 1.0
    model = timm.create_model('resnet18', num_classes=10)
    with caplog.at_level('INFO'):
        low = create_stimulator(model, create_stim_config('st++'), full_size=32)
    assert low.config.min_scale == 1.0 and not low.size_sampler.enabled
    assert 'smaller subnet inputs off at 32 px' in caplog.text
    high = create_stimulator(model, create_stim_config('st++'), full_size=64)
    assert high.config.min_scale == 0.43 and high.size_sampler.sizes[0] == 27
    forced = create_stimulator(model, create_stim_config('st++', min_scale=0.43), full_size=32)
    assert forced.size_sampler.enabled and forced.size_sampler.sizes[0] == 13


@pytest.mark.parametrize('flag, epochs, standardized', [
    (None, 200, True), (None, 199, False), (None, 10, False), ('raw', 300, False), ('standardized', 10, True)])
def test_main_logits_flag_sets_the_st_plus_plus_main_loss(flag, epochs, standardized, caplog):
    """--stim-main-logits raw keeps ST++'s KL- subnet loss but puts the main loss on raw logits (recorded in args);
    unset, the schedule decides: the authors' standardised main loss from their 200 epochs up, raw below."""
    import train_stim
    from timm_stim.train_setup import create_stim_options
    args = train_stim.parse_args(['--stim', 'st++', '--epochs', str(epochs)]
                                 + (['--stim-main-logits', flag] if flag else []))
    with caplog.at_level('INFO'):
        config = create_stim_options(args)
    assert config.loss == 'kl-' and config.standardize_main is standardized
    assert args.stim_main_logits == ('standardized' if standardized else 'raw')
    assert ('-epoch schedule' in caplog.text) == (flag is None)  # the run says which it chose, and why


def test_a_resumed_run_keeps_the_main_loss_it_was_started_with(tmp_path):
    """A run started with standardized main logits (an older default, or a long schedule) resumes with them on a
    short schedule too: the default is decided once, and read back from the checkpoint's args."""
    import argparse
    import train_stim
    from timm_stim.train_setup import create_stim_options
    path = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': {}, 'args': argparse.Namespace(stim_main_logits='standardized')}, path)
    args = train_stim.parse_args(['--stim', 'st++', '--epochs', '10', '--resume', str(path)])
    assert create_stim_options(args).standardize_main is True and args.stim_main_logits == 'standardized'
    args = train_stim.parse_args(['--stim', 'st++', '--epochs', '10', '--resume', str(path),
                                  '--stim-main-logits', 'raw'])  # the flag still wins
    assert create_stim_options(args).standardize_main is False


def test_standardize_logits_runs_in_float32_for_half_precision_inputs():
    """Nearly flat bf16 logits: the 1/std factor is computed in float32, so the result is finite and equals the
    float32 computation of the same values."""
    logits = (torch.full((4, 3), 5.0) + torch.tensor([0.0, 1e-3, -1e-3])).to(torch.bfloat16)
    out = standardize_logits(logits)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, standardize_logits(logits.float()))
