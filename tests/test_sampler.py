"""Subnet sampling rules (ST, ST++, K-lists, Bernoulli) and the subnet input-size sampler."""
import collections
import itertools
import math

import pytest
import timm
import torch

from timm_stim import SizeSampler, SubnetSampler, find_residual_blocks, parse_space, space_k_list
from timm_stim.sampler import split_flat_layout

# chi-square critical values at the 0.999 quantile (scipy.stats.chi2.ppf(0.999, df); scipy is not a dependency)
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi2_stat(counts, categories):
    n = sum(counts[c] for c in categories)
    assert n == sum(counts.values()), 'draws outside the expected support'
    expected = n / len(categories)
    return sum((counts[c] - expected) ** 2 / expected for c in categories)


@pytest.fixture(scope='module')
def r50():
    return find_residual_blocks(timm.create_model('resnet50', num_classes=10), input_size=(3, 64, 64))


@pytest.fixture(scope='module')
def vit12():
    return find_residual_blocks(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10))


def depth_set(sampler, specs):
    return {sampler.layout.depths(s) for s in specs}


def test_st_resnet50_support(r50):
    s = SubnetSampler(r50, 'st')
    assert s.k_list == (3, 4, 6, 3)
    support = s.support()
    assert len(support) == 216 == len(set(support))
    depths = depth_set(s, support)
    assert depths == set(itertools.product(range(1, 4), range(1, 5), range(1, 7), range(1, 4)))
    # the prefix rule: each stage keeps its first d_s blocks
    for spec in support:
        for st in range(4):
            idx = r50.stage_indices(st)
            flags = [spec.keep[i] for i in idx]
            assert flags == sorted(flags, reverse=True)
    assert s.expected_kept_fraction() == pytest.approx(1 - 6 / 16)


def test_st_marginals_uniform(r50):
    s = SubnetSampler(r50, 'st', seed=123)
    n_draws = 8000
    draws = [s.layout.depths(s.sample()) for _ in range(n_draws)]
    for st, n_s in enumerate((3, 4, 6, 3)):
        counts = collections.Counter(d[st] for d in draws)
        stat = chi2_stat(counts, range(1, n_s + 1))
        assert stat < CHI2_999[n_s - 1], (st, counts)
        for d in range(1, n_s + 1):
            assert counts[d] / n_draws == pytest.approx(1 / n_s, abs=0.03)
    # stages are independent: the joint of stages 2 and 3 (4*6 cells) is uniform too
    joint = collections.Counter((d[1], d[2]) for d in draws)
    cells = list(itertools.product(range(1, 5), range(1, 7)))
    assert len(joint) == 24
    assert chi2_stat(joint, cells) < 49.728  # chi2.ppf(0.999, 23)
    # every draw is in the support
    assert {tuple(d) for d in draws} <= depth_set(s, s.support())


def test_stpp_resnet50(r50):
    s = SubnetSampler(r50, 'st++', seed=5)
    assert s.k_list == (1, 2, 4, 1)
    support = s.support()
    assert len(support) == 8
    expected = {(3, d2, d3, 3) for d2 in (3, 4) for d3 in (3, 4, 5, 6)}
    assert depth_set(s, support) == expected
    assert s.layout.full_spec() in support
    draws = collections.Counter(s.layout.depths(s.sample()) for _ in range(8000))
    assert set(draws) == expected
    assert chi2_stat(draws, sorted(expected)) < CHI2_999[7]
    assert s.expected_kept_fraction() == pytest.approx(1 - 2 / 16)


@pytest.mark.parametrize('k', ['2,3,5,2', '2,3,6,3', '1,2,5,2', '1,1,3,1', '1,2,4,2', '1,3,5,1', '1,2,4,1'])
def test_k_lists_from_method(r50, k):
    k_list = tuple(int(v) for v in k.split(','))
    s = SubnetSampler(r50, k)
    assert s.k_list == k_list
    support = s.support()
    assert len(support) == math.prod(k_list) == len(set(support))
    n = (3, 4, 6, 3)
    expected = set(itertools.product(*[range(n_s - k_s + 1, n_s + 1) for n_s, k_s in zip(n, k_list)]))
    assert depth_set(s, support) == expected
    draws = {s.layout.depths(s.sample()) for _ in range(300)}
    assert draws <= expected
    # sequence form is the same rule
    assert SubnetSampler(r50, list(k_list)).k_list == k_list


@pytest.mark.parametrize('space,match', [
    ('2,3,5', r'has 3 entries but resnet50 has 4 stages'),
    ('2,3,5,2,1', r'has 5 entries'),
    ('4,2,4,1', r'stage 1 has 3 blocks of which 2 can be skipped, so K_1 must be in 1\.\.3 \(got 4\)'),
    ('1,2,7,1', r'K_3 must be in 1\.\.6 \(got 7\)'),
    ('1,a,4,1', r'K-list of positive integers'),
    ('1,2.5,4,1', r'K-list of positive integers'),
    ('-1,2,4,1', r'K-list of positive integers'),
    ('0,2,4,1', r'every K must be >= 1'),
    ('', r'K-list of positive integers'),
    ('bernoulli:1.5', r'drop probability must be in \(0, 1\)'),
    ('bernoulli:abc', r'drop probability'),
])
def test_invalid_k_lists(r50, space, match):
    with pytest.raises(ValueError, match=match):
        SubnetSampler(r50, space)


def test_parse_space():
    assert parse_space('ST') == 'st'
    assert parse_space(' st++ ') == 'st++'
    assert parse_space('1, 2, 4, 1') == (1, 2, 4, 1)
    assert parse_space('bernoulli') == ('bernoulli', 0.5)
    assert parse_space('bernoulli:0.3') == ('bernoulli', 0.3)
    with pytest.raises(ValueError):
        parse_space([1, 0, 2])


def test_bernoulli_drop_frequency(r50):
    s = SubnetSampler(r50, 'bernoulli:0.3', seed=1)
    assert s.k_list is None and s.drop_prob == 0.3
    n_draws = 4000
    skippable = [i for i, b in enumerate(r50.blocks) if b.skippable]
    fixed = [i for i, b in enumerate(r50.blocks) if not b.skippable]
    drops = torch.zeros(len(r50.blocks))
    for _ in range(n_draws):
        keep = s.sample().keep
        drops += torch.tensor([not k for k in keep], dtype=torch.float)
    freq = drops / n_draws
    assert all(freq[i] == 0 for i in fixed)
    for i in skippable:  # binomial sd at p=0.3, n=4000 is 0.0072
        assert abs(float(freq[i]) - 0.3) < 0.03, (r50.blocks[i].path, float(freq[i]))
    assert len(s.support()) == 2 ** 12
    assert s.expected_kept_fraction() == pytest.approx(1 - 0.3 * 12 / 16)


def test_resume_sequence(r50):
    for space in ('st', 'st++', 'bernoulli:0.4'):
        a = SubnetSampler(r50, space, seed=42)
        _ = [a.sample() for _ in range(50)]
        state = a.state_dict()
        seq_a = [a.sample() for _ in range(50)]
        b = SubnetSampler(r50, space, seed=999)
        b.load_state_dict(state)
        assert [b.sample() for _ in range(50)] == seq_a
        # a fresh sampler without the state does not reproduce it
        fresh = SubnetSampler(r50, space, seed=42)
        assert [fresh.sample() for _ in range(50)] != seq_a
    with pytest.raises(ValueError, match='same --stim-space'):
        SubnetSampler(r50, 'st').load_state_dict(SubnetSampler(r50, 'st++').state_dict())


def test_same_seed_same_sequence(r50):
    a, b = SubnetSampler(r50, 'st', seed=3), SubnetSampler(r50, 'st', seed=3)
    assert [a.sample() for _ in range(30)] == [b.sample() for _ in range(30)]


def test_per_rank(r50):
    r0 = SubnetSampler(r50, 'st', seed=0, rank=0, per_rank=True)
    r1 = SubnetSampler(r50, 'st', seed=0, rank=1, per_rank=True)
    assert [r0.sample() for _ in range(30)] != [r1.sample() for _ in range(30)]
    s0 = SubnetSampler(r50, 'st', seed=0, rank=0, per_rank=False)
    s1 = SubnetSampler(r50, 'st', seed=0, rank=1, per_rank=False)
    assert [s0.sample() for _ in range(30)] == [s1.sample() for _ in range(30)]


def test_flat_vit_pseudo_stages(vit12):
    assert vit12.stage_sizes == (12,)
    one = SubnetSampler(vit12, 'st')  # unstaged: one stage, st = uniform depth 1..12
    assert one.layout.stage_sizes == (12,) and len(one.support()) == 12
    vit12 = split_flat_layout(vit12)
    st = SubnetSampler(vit12, 'st')
    assert st.layout.stage_sizes == (3, 3, 3, 3)
    assert [b.path for b in st.layout.blocks] == [f'blocks.{i}' for i in range(12)]
    assert st.k_list == (3, 3, 3, 3)
    support = st.support()
    assert len(support) == 81
    # every pseudo-stage keeps at least its first block
    for spec in support:
        assert all(spec.keep[i] for i in (0, 3, 6, 9))
    stpp = SubnetSampler(vit12, 'st++')
    assert stpp.k_list == (1, 2, 2, 1)
    support = stpp.support()
    assert len(support) == 4
    dropped = {tuple(i for i, k in enumerate(s.keep) if not k) for s in support}
    assert dropped == {(), (5,), (8,), (5, 8)}
    assert SubnetSampler(vit12, '1,3,3,1').k_list == (1, 3, 3, 1)
    with pytest.raises(ValueError, match='4 stages'):
        SubnetSampler(vit12, '1,2,2')


def test_flat_pseudo_stages_keep_class_attention_stage():
    # discovery leaves CaiT's class-attention blocks out; named explicitly they form a trailing unskippable stage,
    # which is head, not body: the last body stage is the one ST++ keeps whole
    blocks = [f'blocks.{i}' for i in range(24)] + ['blocks_token_only.0', 'blocks_token_only.1']
    model = timm.create_model('cait_xxs24_224', img_size=32, patch_size=8, num_classes=10)
    layout = find_residual_blocks(model, blocks=blocks)
    split = split_flat_layout(layout, 4)
    assert split.stage_sizes == (6, 6, 6, 6, 2) and split.skippable_sizes == (6, 6, 6, 6, 0)
    assert space_k_list(split, 'st') == (6, 6, 6, 6, 1)
    assert space_k_list(split, 'st++') == (1, 4, 4, 1, 1)


def test_stpp_last_stage_is_the_real_last_stage():
    # HGNet-tiny: stages 1/1/2/1, every stage starts with a widening block; the only skippable block is the
    # second of stage 3, a middle stage: ST++ may drop it (K = 1,1,2,1), though the last stage has nothing to skip
    model = timm.create_model('hgnet_tiny', num_classes=10)
    layout = split_flat_layout(find_residual_blocks(model, input_size=(3, 32, 32)))
    assert layout.stage_sizes == (1, 1, 2, 1) and layout.skippable_sizes == (0, 0, 1, 0)
    assert space_k_list(layout, 'st++') == (1, 1, 2, 1)
    sampler = SubnetSampler(layout, 'st++')
    assert {tuple(p for p, k in zip(layout.paths, s.keep) if not k) for s in sampler.support()} == {
        (), ('stages.2.blocks.1',)}


def test_hybrid_transformer_run_is_split_into_pseudo_stages():
    # ViTamin: conv stem stages 2/4 (feature maps), then 8 transformer blocks (tokens): the run of transformer
    # blocks is cut like a ViT's, so ST++ drops transformer blocks too, not only the stem's
    model = timm.create_model('vitamin_small_224', img_size=64, depth=8, num_classes=10)
    layout = split_flat_layout(find_residual_blocks(model, input_size=(3, 64, 64)))
    assert layout.stage_sizes == (2, 4, 2, 2, 2, 2) and layout.skippable_sizes == (1, 3, 2, 2, 2, 2)
    assert space_k_list(layout, 'st++') == (1, 2, 2, 2, 2, 1)
    # a hierarchical token model is not a hybrid: LeViT's three stages (all tokens) stay as they are
    levit = find_residual_blocks(timm.create_model('levit_128s', img_size=64, num_classes=10), input_size=(3, 64, 64))
    assert split_flat_layout(levit).stage_sizes == levit.stage_sizes == (2, 3, 4)


def test_st_on_shallow_flat_model_drops_blocks():
    """ST on a flat 4-block model (beit depth=4): 4 pseudo-stages of one block each leave nothing to drop,
    so the sampler silently only ever returns the full network (bug, see report)."""
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4, num_classes=10)
    layout = find_residual_blocks(model)
    assert layout.skippable_sizes == (4,)
    s = SubnetSampler(split_flat_layout(layout), 'st')
    assert len(s.support()) > 1
    assert any(spec.num_skipped > 0 for spec in (s.sample() for _ in range(50)))


# --------------------------------------------------------------------------------------------------------
# SizeSampler

@pytest.mark.parametrize('full,low', [(224, 96), (200, 86), (32, 13)])
def test_size_sampler_range(full, low):
    assert low == math.floor(0.43 * full)
    s = SizeSampler(full, 0.43, seed=0)
    assert s.sizes == tuple(range(low, full + 1))
    assert s.enabled
    draws = [s.sample() for _ in range(6000)]
    assert min(draws) >= low and max(draws) <= full
    assert all(isinstance(d, int) for d in draws)
    if full == 32:  # uniform over 20 integers
        counts = collections.Counter(draws)
        assert set(counts) == set(range(low, full + 1))
        cells = list(range(low, full + 1))
        assert chi2_stat(counts, cells) < 43.820  # chi2.ppf(0.999, 19)
    else:
        assert min(draws) == low and max(draws) == full
        assert sum(draws) / len(draws) == pytest.approx((low + full) / 2, rel=0.02)


def test_size_sampler_vit_multiples():
    s = SizeSampler(224, 0.43, multiple=16)
    assert s.sizes == (96, 112, 128, 144, 160, 176, 192, 208, 224)
    assert {s.sample() for _ in range(500)} == set(s.sizes)
    s = SizeSampler(200, 0.43, multiple=14)
    assert s.sizes == tuple(range(98, 197, 14))


def test_size_sampler_fixed_sizes():
    s = SizeSampler(224, sizes=[160, 128, 224, 128])
    assert s.sizes == (128, 160, 224)
    assert {s.sample() for _ in range(300)} == {128, 160, 224}
    with pytest.raises(ValueError, match='must be in 1..224'):
        SizeSampler(224, sizes=[256])
    with pytest.raises(ValueError, match='multiples of 16'):
        SizeSampler(224, sizes=[120], multiple=16)


def test_size_sampler_disabled():
    s = SizeSampler(224, 1.0)
    assert s.sizes == (224,) and not s.enabled
    assert {s.sample() for _ in range(20)} == {224}


@pytest.mark.parametrize('scale', [0.0, -0.1, 1.5])
def test_size_sampler_bad_scale(scale):
    with pytest.raises(ValueError, match=r'min scale must be in \(0, 1\]'):
        SizeSampler(224, scale)


def test_size_sampler_no_valid_size():
    with pytest.raises(ValueError, match='multiple of 16'):
        SizeSampler(20, 0.9, multiple=16)


def test_size_sampler_resume():
    a = SizeSampler(224, 0.43, seed=7)
    _ = [a.sample() for _ in range(50)]
    state = a.state_dict()
    seq = [a.sample() for _ in range(50)]
    b = SizeSampler(224, 0.43, seed=0)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(50)] == seq
    fresh = SizeSampler(224, 0.43, seed=7)
    assert [fresh.sample() for _ in range(50)] != seq


def test_size_sampler_resume_checks_sizes():
    state = SizeSampler(64, 0.5, seed=0).state_dict()
    with pytest.raises(ValueError, match=r'saved for subnet sizes 32\.\.64 \(33 sizes\) but this run draws '
                                         r'48\.\.64 \(17 sizes\).*--stim-min-scale'):
        SizeSampler(64, 0.75, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match='saved for subnet sizes'):  # same range, sizes dropped by the set-up probe
        SizeSampler(64, 0.5, sizes=[s for s in range(32, 65) if s % 2 == 0]).load_state_dict(state)


def test_a_space_that_drops_nothing_is_not_suggested_again():
    """resnet10t (one block per stage): 'st' and 'st++' keep every block, so the refusal offers neither."""
    layout = find_residual_blocks(timm.create_model('resnet10t'), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match='never drops a block') as refused:
        SubnetSampler(layout, 'st')
    assert "use --stim-space bernoulli or a K-list" in str(refused.value)
