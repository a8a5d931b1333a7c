"""A user's own dataset for mpifedmeta, in the user's own file: 8×8 images of six kinds of bars
(horizontal, vertical, two diagonals, a cross, a frame), shifted by up to a pixel, with random
contrast and noise; generated, nothing to download. Used by configs/user-model.toml:

    [data]
    dataset = "examples/my_dataset.py:load"    # FILE.py:FUNCTION, relative to the current directory

``load(path, dtype)`` gets data.path (here: the number of images, default 1200) and the run's
floating precision; it returns a mapping with ``x`` (n, 1, 8, 8) and ``y`` (n,) labels 0..5 (an
``mpifedmeta.data.Dataset`` works too; optional keys: ``agent``, ``test``, ``num_classes``).
"""

import numpy as np

SIZE, CLASSES = 8, 6


def _templates() -> np.ndarray:
    t = np.zeros((CLASSES, SIZE, SIZE))
    i = np.arange(SIZE)
    t[0, 3:5, :] = 1                                   # horizontal bar
    t[1, :, 3:5] = 1                                   # vertical bar
    t[2, i, i] = 1                                     # diagonal
    t[3, i, SIZE - 1 - i] = 1                          # anti-diagonal
    t[4, 3:5, 1:7] = t[4, 1:7, 3:5] = 1                # cross
    t[5, 1, 1:7] = t[5, 6, 1:7] = t[5, 1:7, 1] = t[5, 1:7, 6] = 1   # frame
    return t


def load(path: str, dtype: np.dtype) -> dict:
    n = int(path) if path else 1200
    rng = np.random.default_rng(2024)
    y = rng.permutation(np.arange(n) % CLASSES)
    images = _templates()[y]
    for k, (dy, dx) in enumerate(rng.integers(-1, 2, size=(n, 2))):
        images[k] = np.roll(images[k], (dy, dx), axis=(0, 1))
    images *= rng.uniform(0.6, 1.4, size=(n, 1, 1))
    images += rng.normal(0.0, 0.35, size=images.shape)
    x = images[:, None].astype(np.promote_types(dtype, np.float32))   # float64 runs get float64 data
    return {"x": x, "y": y.astype(np.int64)}
