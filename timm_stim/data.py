""" Data helpers for timm_stim

* `DigitsDataset` - the 8x8 scikit-learn digits (1797 images, 10 classes), upsampled and returned as RGB
  PIL images so that the regular timm transforms / `create_loader` work on it. It is embedded in
  scikit-learn, so it needs no download and writes no files: a real (if tiny) image classification task
  that trains in about a minute on a CPU, for smoke tests and recipe checks.
* `create_dataset_or_digits` - drop-in for `timm.data.create_dataset` that falls back to digits when no
  dataset / data dir is given, and turns the usual data config mistakes (missing dir, empty image folder,
  torchvision dataset that is not downloaded) into a one-line `DataConfigError` raised before any work.
* `FixedSubset`, `resolve_eval_data_config`, `create_eval_loader` - a seeded fixed subset of a dataset and the
  unshuffled eval loader (timm eval transforms) that the loafing evaluation and train_stim.py use.
"""
import os
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from .checkpoint import DATA_CONFIG_KEYS
from .cli import UsageError

__all__ = [
    'DIGITS_INFO', 'DIGITS_SPLIT_SEED', 'DIGITS_VAL_FRACTION', 'DataConfigError', 'DigitsDataset', 'FixedSubset',
    'create_dataset_or_digits', 'create_eval_loader', 'digits_split_indices', 'fixed_subset', 'is_digits',
    'resolve_eval_data_config',
]

DIGITS_SPLIT_SEED = 42  # seed of the fixed train / validation split (numpy RandomState, stable across versions)
DIGITS_VAL_FRACTION = 0.2  # per class, round(0.2 * n) samples go to validation -> 1438 train / 359 validation

_TRAIN_SPLITS = ('train', 'training')
_VAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation')

# Data config for digits at 32x32. mean / std are per-pixel statistics of the *upsampled training split*
# (img_size=32, pixel values / 255, all RGB channels are equal), computed once with:
#   x = np.stack([np.asarray(img) for img, _ in DigitsDataset('train', img_size=32)]) / 255.
#   x.mean(), x.std()
# tests/test_data.py recomputes them. crop_pct=1.0 so eval does not crop off digit borders (timm's default
# eval crop_pct=0.875 resizes to 36 and center-crops 32, i.e. zooms in and cuts edge strokes).
DIGITS_INFO: Dict[str, Any] = dict(
    num_classes=10,
    img_size=32,
    input_size=(3, 32, 32),
    mean=(0.3051,) * 3,
    std=(0.3231,) * 3,
    crop_pct=1.0,
    interpolation='bilinear',
)


def is_digits(dataset: Optional[str], data_dir: Optional[str]) -> bool:
    """True for the built-in digits: --dataset digits, or neither a dataset name nor a data dir."""
    return (dataset or '').lower() == 'digits' or (not dataset and not data_dir)


class DataConfigError(UsageError):
    """ Dataset / data dir configuration that cannot work; message names the problem and the fix (exit code 2). """


def _norm_split(split: str) -> str:
    s = split.lower()
    if s in _TRAIN_SPLITS:
        return 'train'
    if s in _VAL_SPLITS:
        return 'validation'
    raise ValueError(
        f"Unknown digits split '{split}', valid: 'train' ({', '.join(_TRAIN_SPLITS[1:])}) "
        f"or 'validation' ({', '.join(_VAL_SPLITS[1:])}).")


@lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """ Raw digits as uint8 (N, 8, 8) images (0..16 scaled to 0..255) and int64 labels. Cached. """
    from sklearn.datasets import load_digits  # deferred, sklearn import is slow-ish
    d = load_digits()
    images = np.round(d.images * (255. / 16.)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


@lru_cache(maxsize=4)
def digits_split_indices(split: str = 'train') -> np.ndarray:
    """ Sorted indices into `load_digits()` for a split; stratified, fixed (seed 42), train/val disjoint. """
    split = _norm_split(split)
    _, labels = _load_digits()
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(DIGITS_VAL_FRACTION * len(idx)))
        val.append(rng.permutation(idx)[:n_val])
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[np.concatenate(val)] = True
    out = np.flatnonzero(val_mask if split == 'validation' else ~val_mask)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=8)
def _upsampled(split: str, img_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """ (N, img_size, img_size) uint8 images (bilinear, PIL) and labels of a split. Cached, read-only. """
    images, labels = _load_digits()
    idx = digits_split_indices(split)
    resample = Image.Resampling.BILINEAR
    up = np.stack([
        np.asarray(Image.fromarray(images[i]).resize((img_size, img_size), resample))
        for i in idx])
    lab = labels[idx]
    up.setflags(write=False)
    lab.setflags(write=False)
    return up, lab


class DigitsDataset(torch.utils.data.Dataset):
    """ scikit-learn 8x8 digits, upsampled to `img_size` px, as (RGB PIL image, int label) samples.

    Split is fixed and stratified: per class, round(20%) of the samples (seed 42) are 'validation'
    (alias 'val', 'eval', ...), the rest 'train' -> 1438 train / 359 validation. No download, no files.
    Like timm's ImageDataset it has a settable `transform` (timm's `create_loader` assigns it).
    """

    def __init__(
            self,
            split: str = 'train',
            img_size: int = 32,
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
    ):
        self.split = _norm_split(split)
        if int(img_size) < 8:
            raise ValueError(f'img_size must be >= 8 (digits are 8x8), got {img_size}.')
        self.img_size = int(img_size)
        self.transform = transform
        self.target_transform = target_transform
        self._images, self._labels = _upsampled(self.split, self.img_size)
        self.classes: List[str] = [str(i) for i in range(10)]
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}

    @property
    def targets(self) -> List[int]:
        return self._labels.tolist()

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self._images[index]).convert('RGB')
        target = int(self._labels[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """ Pseudo file name (there are no files), for timm code that logs sample names. """
        return f'digits_{self.split}_{index:04d}.png'

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        return [self.filename(i) for i in range(len(self))]

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(split={self.split!r}, img_size={self.img_size}, n={len(self)})'


# -------------------------------------------------------------------------------------------------------------
# validation of timm dataset args (mirrors timm.data.dataset_factory.create_dataset / readers.create_reader)

_NON_FOLDER_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')
_TORCH_FOLDER_NAMES = ('folder', 'image_folder')
_TRAIN_SYNONYM = ('train', 'training')
_EVAL_SYNONYM = ('val', 'valid', 'validation', 'eval', 'evaluation')


def _search_split(root: str, split: str) -> str:
    """ Same resolution as timm's private `dataset_factory._search_split`: root/split, a synonym, else root. """
    split_name = split.split('[')[0]
    try_root = os.path.join(root, split_name)
    if os.path.exists(try_root):
        return try_root
    synonyms = _TRAIN_SYNONYM if split_name in _TRAIN_SYNONYM else _EVAL_SYNONYM if split_name in _EVAL_SYNONYM else ()
    for s in synonyms:
        try_root = os.path.join(root, s)
        if os.path.exists(try_root):
            return try_root
    return root


def _has_image_file(folder: str, extensions) -> bool:
    """ True as soon as one file with a matching extension is found (recursive, follows links like timm). """
    for _, _, files in os.walk(folder, followlinks=True):
        for f in files:
            if os.path.splitext(f)[1].lower() in extensions:
                return True
    return False


def _has_any_file(folder: str) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if files:
            return True
    return False


def _check_folder(root: str, split: str, search_split: bool, extensions, what: str):
    if search_split and os.path.isdir(root):
        root = _search_split(root, split)
    if os.path.isfile(root):
        if what == 'folder' and os.path.splitext(root)[1] == '.tar':
            return  # timm reads image tars directly
        raise DataConfigError(
            f"Data dir '{root}' is a file, not an image folder{' or .tar' if what == 'folder' else ''}; "
            f"pass the dataset root directory as --data-dir.")
    if not _has_image_file(root, extensions):
        exts = ', '.join(sorted(extensions))
        raise DataConfigError(
            f"No image files ({exts}) found for split '{split}' under '{root}'; put images in "
            f"<data-dir>/{split.split('[')[0]}/<class>/ (or <data-dir>/<class>/) or fix --data-dir / the split name.")


def _check_torch(name: str, root: Optional[str], download: bool):
    from torchvision import datasets as tvd
    basic = dict(
        cifar10=tvd.CIFAR10, cifar100=tvd.CIFAR100, mnist=tvd.MNIST, kmnist=tvd.KMNIST,
        fashion_mnist=tvd.FashionMNIST, qmnist=getattr(tvd, 'QMNIST', None))
    known = list(basic) + ['inaturalist', 'inat', 'places365', 'imagenet', *_TORCH_FOLDER_NAMES]
    if name not in known:
        raise DataConfigError(f"Unknown torchvision dataset 'torch/{name}'; use one of: {', '.join(known)}.")
    if name in _TORCH_FOLDER_NAMES or (download and name != 'imagenet'):
        return
    if name == 'imagenet':  # torchvision cannot download ImageNet
        hint = "point --data-dir at a local ImageNet copy (torchvision cannot download it)"
    else:
        hint = f"pass --dataset-download (download=True) to fetch torch/{name}, or point --data-dir at an existing copy"
    if not root:
        raise DataConfigError(f"No data dir given for torch/{name}; set --data-dir and {hint}.")
    if not os.path.isdir(root):
        raise DataConfigError(f"Data dir '{root}' for torch/{name} does not exist; {hint}.")
    ds_class = basic.get(name)
    if ds_class is not None:
        # CIFAR keeps its files in root/<base_folder>, the MNIST family in root/<ClassName>/raw
        sub = os.path.join(root, getattr(ds_class, 'base_folder', None) or ds_class.__name__)
        present = os.path.isdir(sub) and _has_any_file(sub)
    else:
        present = _has_any_file(root)
    if not present:
        raise DataConfigError(f"torch/{name} files not found under '{root}'; {hint}.")


def create_dataset_or_digits(
        name: str,
        root: Optional[str],
        split: str,
        is_training: bool = False,
        img_size: int = 32,
        **timm_kwargs,
):
    """ `timm.data.create_dataset` with a digits fallback and up-front checks of the data config.

    Returns a `DigitsDataset(split, img_size)` when `name` is 'digits', or when `name` is '' and no `root`
    (data dir) is given; `img_size` is only used for digits. Otherwise the args are checked first (raising
    `DataConfigError` for a missing data dir, an image folder split with no images, a torchvision dataset
    that is absent and not to be downloaded) and then passed on as
    `create_dataset(name, root=root, split=split, is_training=is_training, **timm_kwargs)`, so timm's
    argument names apply (download, search_split, class_map, batch_size, num_samples, seed, repeats, ...).
    """
    name = name or ''
    if is_digits(name, root):
        return DigitsDataset(split=split, img_size=img_size)

    download = bool(timm_kwargs.get('download', False))
    search_split = timm_kwargs.get('search_split', True)
    prefix, sep, rest = name.partition('/')
    prefix = prefix.lower() if sep else ''

    if prefix == 'torch':
        torch_name = name.split('/', 2)[-1].lower()
        _check_torch(torch_name, root, download)
        if torch_name in _TORCH_FOLDER_NAMES:
            if not root:
                raise DataConfigError(f"No data dir given for '{name}'; set --data-dir to the image folder root.")
            if not os.path.exists(root):
                raise DataConfigError(f"Data dir '{root}' does not exist; fix --data-dir.")
            from torchvision.datasets.folder import IMG_EXTENSIONS as TV_EXTENSIONS
            _check_folder(root, split, search_split, set(TV_EXTENSIONS), 'torch/folder')
    elif prefix in ('hfds', 'hfids'):
        pass  # root is an optional HF cache dir, created on demand
    elif prefix == 'tfds':
        if root and not os.path.exists(root) and not download:
            raise DataConfigError(
                f"Data dir '{root}' for {name} does not exist; fix --data-dir or pass --dataset-download.")
    elif prefix == 'wds':
        if not root:
            raise DataConfigError(f"No data dir given for '{name}'; set --data-dir to the webdataset shard dir.")
        if not os.path.exists(root):
            raise DataConfigError(f"Data dir '{root}' does not exist; fix --data-dir.")
    else:
        # timm folder / tar ImageDataset (any name without a known reader prefix)
        if not root:
            raise DataConfigError(
                f"No data dir given for folder dataset '{name}'; set --data-dir, or leave both --dataset and "
                f"--data-dir empty to use the built-in digits dataset.")
        if not os.path.exists(root):
            raise DataConfigError(f"Data dir '{root}' does not exist; fix --data-dir.")
        from timm.data import get_img_extensions
        input_key = timm_kwargs.get('input_key')
        extensions = {e.lower() for e in input_key.split(';')} if input_key else get_img_extensions(as_set=True)
        _check_folder(root, split, search_split, extensions, 'folder')

    from timm.data import create_dataset
    return create_dataset(name, root=root, split=split, is_training=is_training, **timm_kwargs)


# -------------------------------------------------------------------------------------------------------------
# evaluation data


class FixedSubset(torch.utils.data.Dataset):
    """A fixed random subset (drawn with `seed`, kept in dataset order) of a map-style dataset; forwards `transform`,
    which timm's `create_loader` sets."""

    def __init__(self, dataset, num_samples: int, seed: int = 0):
        self.dataset = dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        self.indices = sorted(order[:num_samples].tolist())

    transform = property(lambda self: self.dataset.transform, lambda self, t: setattr(self.dataset, 'transform', t))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def resolve_eval_data_config(
        model: torch.nn.Module,
        overrides: Optional[Dict[str, Any]] = None,
        run_config: Optional[Dict[str, Any]] = None,
        digits: bool = False,
) -> Dict[str, Any]:
    """Eval preprocessing: explicit overrides > the training run's (or export's) config > digits defaults
    (when evaluating on the embedded digits) > the model's timm defaults."""
    import timm.data
    merged: Dict[str, Any] = {}
    if digits:
        merged.update({k: DIGITS_INFO[k] for k in DATA_CONFIG_KEYS if k in DIGITS_INFO})
    for source in (run_config or {}, overrides or {}):
        if source.get('img_size') and not source.get('input_size'):
            merged.pop('input_size', None)
        merged.update({k: v for k, v in source.items() if v not in (None, '')})
    return timm.data.resolve_data_config(merged, model=model)


def fixed_subset(dataset, num_samples: Optional[int], seed: int = 0):
    """`dataset` cut to a `FixedSubset` of `num_samples` images; unchanged when it is iterable, no larger, or no
    number is given (timm's --train/val-num-samples only size iterable datasets; here they cut map-style ones)."""
    if num_samples and not isinstance(dataset, torch.utils.data.IterableDataset) and num_samples < len(dataset):
        return FixedSubset(dataset, num_samples, seed)
    return dataset


def create_eval_loader(
        dataset: str = '',
        data_dir: Optional[str] = None,
        split: str = 'validation',
        data_config: Optional[Dict[str, Any]] = None,
        batch_size: int = 128,
        workers: int = 2,
        num_samples: Optional[int] = None,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
) -> torch.utils.data.DataLoader:
    """A loader of `split` with timm eval transforms (resize, centre crop, normalise), unshuffled.

    With no `dataset` and no `data_dir` it serves the embedded digits. `num_samples` keeps a `FixedSubset` (drawn
    with `seed`) of that many images, e.g. training images for BN re-estimation or a quick validation subset.
    """
    import timm.data
    config = dict(data_config or {})
    input_size = tuple(config.get('input_size', (3, 224, 224)))
    ds = create_dataset_or_digits(dataset or '', data_dir, split, is_training=False, img_size=int(input_size[-1]))
    ds.transform = timm.data.create_transform(
        input_size, is_training=False, interpolation=config.get('interpolation', 'bilinear'),
        mean=config.get('mean', timm.data.IMAGENET_DEFAULT_MEAN), std=config.get('std', timm.data.IMAGENET_DEFAULT_STD),
        crop_pct=config.get('crop_pct'), crop_mode=config.get('crop_mode'))
    ds = fixed_subset(ds, num_samples, seed)
    pin = torch.device(device).type == 'cuda' if device is not None else False
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin, drop_last=False,
        persistent_workers=False)
