"""Test settings: one CPU thread (2-core CI machines slow down badly otherwise) and an offline Hub."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ['HF_HUB_OFFLINE'] = '1'

import torch  # noqa: E402

torch.set_num_threads(1)
