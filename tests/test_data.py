""" Tests for timm_stim.data (digits dataset, loader integration, data config validation). """
import os

import numpy as np
import pytest
import torch
from PIL import Image

from timm.data import create_loader

from timm_stim import data as stim_data
from timm_stim.data import DIGITS_INFO, DataConfigError, DigitsDataset, create_dataset_or_digits, digits_split_indices

N_TRAIN, N_VAL = 1438, 359


def test_split_sizes_disjoint_and_complete():
    tr, va = digits_split_indices('train'), digits_split_indices('validation')
    assert (len(tr), len(va)) == (N_TRAIN, N_VAL)
    assert len(DigitsDataset('train')) == N_TRAIN and len(DigitsDataset('validation')) == N_VAL
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(N_TRAIN + N_VAL))
    np.testing.assert_array_equal(digits_split_indices('val'), va)
    assert DigitsDataset('val').split == 'validation'


def test_split_stratified():
    tr, va = DigitsDataset('train'), DigitsDataset('val')
    ctr, cva = np.bincount(tr.targets, minlength=10), np.bincount(va.targets, minlength=10)
    assert (ctr > 0).all() and (cva > 0).all()
    np.testing.assert_array_equal(cva, np.round(0.2 * (ctr + cva)).astype(int))
    assert tr.classes == [str(i) for i in range(10)]


def test_invalid_split():
    with pytest.raises(ValueError, match="valid: 'train'.*'validation'"):
        DigitsDataset('test_set')


@pytest.mark.parametrize('img_size', [32, 20])
def test_images_rgb_and_sized(img_size):
    ds = DigitsDataset('train', img_size=img_size)
    img, target = ds[0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (img_size, img_size)
    assert isinstance(target, int) and 0 <= target < 10
    a = np.asarray(img)
    assert (a[..., 0] == a[..., 1]).all() and a.max() > 200  # gray replicated, full 0..255 range


def test_deterministic_across_constructions():
    a = DigitsDataset('validation')
    imgs_a = np.stack([np.asarray(a[i][0]) for i in range(0, len(a), 37)])
    # drop the in-process caches so the second construction really recomputes split and images
    stim_data._load_digits.cache_clear()
    stim_data.digits_split_indices.cache_clear()
    stim_data._upsampled.cache_clear()
    b = DigitsDataset('validation')
    imgs_b = np.stack([np.asarray(b[i][0]) for i in range(0, len(b), 37)])
    assert a.targets == b.targets
    np.testing.assert_array_equal(imgs_a, imgs_b)


def test_transform_attribute_is_used():
    ds = DigitsDataset('train', transform=lambda im: im.size)
    assert ds[3][0] == (32, 32)


def test_digits_info_mean_std():
    ds = DigitsDataset('train', img_size=DIGITS_INFO['img_size'])
    x = np.stack([np.asarray(img) for img, _ in ds]).astype(np.float64) / 255.
    for c in range(3):
        assert abs(x[..., c].mean() - DIGITS_INFO['mean'][c]) < 1e-3
        assert abs(x[..., c].std() - DIGITS_INFO['std'][c]) < 1e-3
    assert DIGITS_INFO['num_classes'] == 10 and DIGITS_INFO['input_size'] == (3, 32, 32)


def _loader(split, is_training, use_prefetcher, batch_size=64):
    return create_loader(
        DigitsDataset(split), input_size=DIGITS_INFO['input_size'], batch_size=batch_size,
        is_training=is_training, scale=(0.5, 1.0), hflip=0., color_jitter=None,
        interpolation='bilinear', mean=DIGITS_INFO['mean'], std=DIGITS_INFO['std'],
        crop_pct=DIGITS_INFO['crop_pct'], num_workers=0, device=torch.device('cpu'),
        use_prefetcher=use_prefetcher)


@pytest.mark.parametrize('use_prefetcher', [True, False])
def test_train_loader_batches(use_prefetcher):
    loader = _loader('train', True, use_prefetcher)
    assert len(loader) == N_TRAIN // 64  # drop_last in training
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    assert abs(x.mean().item()) < 1.  # roughly normalized


def test_eval_loader_keeps_whole_image():
    # crop_pct=1.0 eval transform is the identity on 32px digits (no center-crop zoom)
    ds = DigitsDataset('validation')
    x, y = next(iter(_loader('validation', False, True, batch_size=8)))
    mean, std = DIGITS_INFO['mean'][0], DIGITS_INFO['std'][0]
    expect = torch.from_numpy(np.stack([np.asarray(ds[i][0]) for i in range(8)])).permute(0, 3, 1, 2) / 255.
    torch.testing.assert_close(x * std + mean, expect.float(), atol=1e-4, rtol=0)
    assert y.tolist() == ds.targets[:8]


# ---- create_dataset_or_digits ----

@pytest.mark.parametrize('name,root', [('', None), ('', ''), ('digits', None), ('DIGITS', '/does/not/matter')])
def test_factory_digits(name, root):
    ds = create_dataset_or_digits(name, root, split='validation', is_training=False)
    assert isinstance(ds, DigitsDataset) and len(ds) == N_VAL


def test_factory_missing_dir(tmp_path):
    with pytest.raises(DataConfigError, match='does not exist'):
        create_dataset_or_digits('', str(tmp_path / 'nope'), split='train', is_training=True)
    with pytest.raises(DataConfigError, match='No data dir'):
        create_dataset_or_digits('folder', None, split='train', is_training=True)


def _write_png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (4, 4)).save(path)


def test_factory_empty_folder(tmp_path):
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('x')
    _write_png(str(tmp_path / 'validation' / 'cat' / 'a.png'))  # other split has images
    with pytest.raises(DataConfigError, match=r"No image files .* split 'train'"):
        create_dataset_or_digits('', str(tmp_path), split='train', is_training=True)
    with pytest.raises(DataConfigError, match='No image files'):
        create_dataset_or_digits('folder', str(tmp_path / 'train'), split='train', is_training=True)
    with pytest.raises(DataConfigError, match='No image files'):
        create_dataset_or_digits('torch/folder', str(tmp_path), split='train', is_training=True)


def test_factory_folder_ok(tmp_path):
    for cls in ('a', 'b'):
        for i in range(2):
            _write_png(str(tmp_path / 'validation' / cls / f'{i}.png'))
    # 'val' resolves to the 'validation' sub-folder via timm's split synonyms
    ds = create_dataset_or_digits('', str(tmp_path), split='val', is_training=False)
    assert len(ds) == 4 and ds.reader.class_to_idx == {'a': 0, 'b': 1}
    # root itself is used when there is no split sub-folder
    ds = create_dataset_or_digits('', str(tmp_path / 'validation'), split='train', is_training=True)
    assert len(ds) == 4


def test_factory_torch_without_download(tmp_path):
    with pytest.raises(DataConfigError, match='--dataset-download'):
        create_dataset_or_digits('torch/cifar10', str(tmp_path), split='train', is_training=True)
    with pytest.raises(DataConfigError, match='--dataset-download'):
        create_dataset_or_digits('torch/mnist', str(tmp_path / 'missing'), split='train', is_training=True)
    with pytest.raises(DataConfigError, match='--dataset-download'):
        create_dataset_or_digits('torch/mnist', None, split='train', is_training=True, download=False)
    with pytest.raises(DataConfigError, match='Unknown torchvision dataset'):
        create_dataset_or_digits('torch/nosuchset', str(tmp_path), split='train', is_training=True)


def test_factory_passes_timm_args(tmp_path, monkeypatch):
    import timm.data
    calls = []
    monkeypatch.setattr(timm.data, 'create_dataset', lambda name, **kw: calls.append((name, kw)) or 'ds')
    out = create_dataset_or_digits(
        'torch/cifar10', str(tmp_path / 'dl'), split='train', is_training=True, download=True, batch_size=32)
    assert out == 'ds'
    assert calls == [('torch/cifar10', dict(
        root=str(tmp_path / 'dl'), split='train', is_training=True, download=True, batch_size=32))]


def test_fixed_subset_cuts_map_style_datasets_only_when_smaller():
    """--train-num-samples / --val-num-samples: a fixed (seeded) subset of a map-style dataset, else unchanged."""
    from timm_stim.data import DigitsDataset, FixedSubset, fixed_subset
    full = DigitsDataset('validation')
    cut = fixed_subset(full, 64, seed=0)
    assert isinstance(cut, FixedSubset) and len(cut) == 64
    assert cut.indices == fixed_subset(full, 64, seed=0).indices != fixed_subset(full, 64, seed=1).indices
    assert fixed_subset(full, len(full) + 1) is full and fixed_subset(full, None) is full
