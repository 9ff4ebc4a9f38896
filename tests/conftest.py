"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (finite differences and closed forms),
    restored afterwards so that other modules see float32 as users do."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """Tiny copies of the published data sets in their own formats, for runs of the
    experiments that read them: ``<root>/mnist`` (24 IDX images, 28x28), ``<root>/tmnist``
    (20 CSV rows) and ``<root>/celeba`` (12 JPEGs of CelebA's size 178x218, with the
    attributes Male, Young, Bald, Goatee, Smiling, Eyeglasses, each in both splits: images
    1-8 train, 9-12 test; the train images with Male and not Young are 2 and 6)."""
    import gzip
    import struct

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def idx(path, array):
        raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(raw)

    (root / "mnist").mkdir()
    idx(root / "mnist" / "train-images-idx3-ubyte", rng.integers(0, 256, (24, 28, 28), dtype=np.uint8))
    idx(root / "mnist" / "train-labels-idx1-ubyte", rng.integers(0, 10, 24).astype(np.uint8))

    (root / "tmnist").mkdir()
    header = "names,labels," + ",".join(map(str, range(1, 785)))
    rows = [f"Font-{i},{i % 10}," + ",".join(map(str, rng.integers(0, 256, 784))) for i in range(20)]
    (root / "tmnist" / "TMNIST_Data.csv").write_text("\n".join([header, *rows]) + "\n")

    celeba = root / "celeba"
    (celeba / "img_align_celeba").mkdir(parents=True)
    names = ["Male", "Young", "Bald", "Goatee", "Smiling", "Eyeglasses"]
    lines = ["12", " ".join(names)]
    partition = []
    for i in range(12):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(celeba / "img_align_celeba" / name)
        has = [i % 2, (i // 2) % 2, i in (2, 8), i in (3, 9), i in (0, 4, 10), i in (5, 11)]
        values = [1 if h else -1 for h in has]
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        partition.append(f"{name} {0 if i < 8 else 2}")
    (celeba / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (celeba / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root
