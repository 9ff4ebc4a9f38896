"""Image data sets and perturbation sets S: the embedded sets, tiny fake copies of each
published format (round-tripped exactly to [-1, 1]), the safe CIFAR unpickler, the
selection filters against hand counts, the one-line errors, and Hydra composition."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from hydra import compose, initialize_config_module
from PIL import Image
from skimage.data import lfw_subset
from sklearn.datasets import load_digits

from diffsens_cli.data import IMAGE_DATASETS, ImageSet, load_images, perturbation_set
from diffsens_cli.data.embedded import digit_fonts
from diffsens_cli.errors import ConfigError

DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's digits per class


def cfg(kind: str, **kw) -> dict:
    return {"kind": kind, "root": None, "image_size": None, "limit": None, "seed": 0, **kw}


def image_set(**kw) -> dict:
    return {"kind": "image_set", "direction": "add", "source": None, "classes": None, "attributes": None,
            "scores_file": None, "top_k": None, "num_samples": None, "seed": 0, **kw}


def unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).float() / 127.5 - 1


def error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_images(cfg("digits"))


# --- embedded sets ---------------------------------------------------------------------


def test_every_dataset_has_a_config_that_composes():
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        for name in IMAGE_DATASETS:
            c = compose("config", overrides=[f"dataset={name}", "seed=7"]).dataset
            assert c.kind == name and c.seed == 7
            assert {"root", "image_size", "limit"} <= set(c)
            assert (c.root is None) == (name in ("digits", "typography", "lfw_faces"))
    assert sorted(IMAGE_DATASETS) == sorted(p.stem for p in (REPO / "configs/dataset").glob("*.yaml")
                                            if p.stem not in ("gmm", "curve2d", "chessboard"))


def test_digits_are_sklearn_digits_in_unit_range(digits):
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert torch.equal(digits.images[:, 0], torch.from_numpy(load_digits().images).float() / 8 - 1)
    assert torch.bincount(digits.labels).tolist() == DIGIT_COUNTS
    assert digits.images.min() == -1 and digits.images.max() == 1
    assert (digits.images == -1).float().mean() > 0.4  # background dark, ink bright


def test_lfw_faces_are_the_first_hundred():
    native = load_images(cfg("lfw_faces"))
    assert torch.equal(native.images[:, 0], torch.from_numpy(lfw_subset()[:100]).float() * 2 - 1)
    assert native.labels is None and set(native.attributes) == {"Bright", "Dark", "High_Contrast", "Lit_From_Left"}
    assert load_images(cfg("lfw_faces", image_size=24)).images.shape == (100, 1, 24, 24)


def test_typography_fonts_are_those_with_digit_glyphs():
    names = {p.name for p in digit_fonts()}
    assert {"DejaVuSans.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "cmr10.ttf", "cmtt10.ttf"} <= names
    # symbol fonts map '0'..'9' to other shapes or to nothing
    assert not names & {"cmex10.ttf", "cmsy10.ttf", "STIXSizOneSymReg.ttf", "LastResortHE-Regular.ttf",
                        "DejaVuSansDisplay.ttf", "STIXNonUni.ttf"}


def test_typography_is_deterministic_balanced_and_digit_shaped():
    a = load_images(cfg("typography", image_size=8, num_images=300))
    assert a.images.shape == (300, 1, 8, 8) and torch.bincount(a.labels).tolist() == [30] * 10
    assert torch.equal(a.images, load_images(cfg("typography", image_size=8, num_images=300)).images)
    assert not torch.equal(a.images, load_images(cfg("typography", image_size=8, num_images=300, seed=1)).images)
    assert a.images.min() == -1 and a.images.max() <= 1 and (a.images == -1).float().mean() > 0.3
    ink = ((a.images + 1) / 2).mean((1, 2, 3))
    assert ink[a.labels == 1].mean() < 0.8 * ink[a.labels == 8].mean()  # a '1' has less ink than an '8'
    big = load_images(cfg("typography", image_size=28, num_images=20, glyph_size=20 / 28))
    assert big.images.shape == (20, 1, 28, 28)
    ring = torch.ones(28, 28, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert (big.images[:, 0, ring] == -1).all()  # shifts never push a glyph out of the frame
    assert error(load_images, cfg("typography", glyph_size=1.5)) == \
        "dataset.glyph_size: must be in (0, 1] (the glyph's longer side over the frame's), got 1.5"


def test_common_keys_are_checked():
    assert error(load_images, cfg("imagenet")) == ("dataset.kind: 'imagenet' is not one of digits, typography, "
                                                   "lfw_faces, mnist, tmnist, celeba, cifar10, arrays, image_folder")
    assert error(load_images, cfg("digits", limit=0)) == "dataset.limit: must be null or a whole number >= 1, got 0"
    assert error(load_images, cfg("digits", root="/x")) == \
        "dataset.root: must be null: digits is embedded (built from installed packages), got '/x'"
    assert error(load_images, cfg("digits", image_size=2.5), key="perturbation.source") == \
        "perturbation.source.image_size: must be null or a whole number >= 1, got 2.5"


# --- MNIST -------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> tuple[Path, dict]:
    """Train (12 images, image i all i*20 except a 255 and a 0) and test (3) sets of 5x5 images."""
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n, gz in (("train", 12, True), ("t10k", 3, False)):
        images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None] * 20, 5, 1).repeat(5, 2)
        images[:, 0, 0], images[:, 4, 4] = 255, 0
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return root, arrays


@pytest.mark.parametrize("split,prefix", [("train", "train"), ("test", "t10k")])  # gzipped, plain
def test_mnist_round_trips(mnist_root, split, prefix):
    root, arrays = mnist_root
    s = load_images(cfg("mnist", root=str(root), split=split))
    images, labels = arrays[prefix]
    assert torch.equal(s.images, unit(images)[:, None]) and s.images[0, 0, 0, 0] == 1 and s.images[0, 0, 4, 4] == -1
    assert torch.equal(s.labels, torch.from_numpy(labels).long())


def test_limit_is_a_seeded_random_draw(mnist_root):
    root, _ = mnist_root
    picks = []
    for seed in (0, 0, 1):
        s = load_images(cfg("mnist", root=str(root), limit=5, seed=seed))
        picks.append(((s.images[:, 0, 2, 2] + 1) * 127.5 / 20).round().long().tolist())  # image i has value i*20
    assert len(set(picks[0])) == 5 and picks[0] == sorted(picks[0]) and picks[0] == picks[1]
    assert picks[0] != [0, 1, 2, 3, 4] and picks[0] != picks[2]
    assert len(load_images(cfg("mnist", root=str(root), limit=50))) == 12  # at most


def test_mnist_resizes_and_explains_missing_or_bad_files(mnist_root, tmp_path):
    root, _ = mnist_root
    small = load_images(cfg("mnist", root=str(root), image_size=3))
    assert small.images.shape == (12, 1, 3, 3) and small.images.min() >= -1 and small.images.max() <= 1
    assert torch.allclose(small.images[3, 0, 1, 1], torch.tensor(60 / 127.5 - 1))  # a constant region stays constant
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8), gz=False)
    assert error(load_images, cfg("mnist", root=str(tmp_path))) == (
        f"dataset.root: {tmp_path} has no train-labels-idx1-ubyte[.gz]; MNIST expects train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each gzipped (.gz) or not")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # 5 promised, 1 given
    assert error(load_images, cfg("mnist", root=str(tmp_path))) == (
        f"dataset.root: {tmp_path / 'train-labels-idx1-ubyte'} is not an IDX file of unsigned bytes "
        "(magic 0x0000080N, N sizes of at least 1, then exactly their product in bytes)")
    assert error(load_images, cfg("mnist", root=str(tmp_path / "nope"))).startswith(
        f"dataset.root: {tmp_path / 'nope'} is not a folder; expected one holding train-images-idx3-ubyte")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sizes", [(2, 0, 0), (-2, 3, 3), (2**31 - 1, 3, 3), (3, 3, 3)])
def test_idx_headers_that_do_not_match_their_data_are_refused_before_anything_loads(tmp_path, gz, sizes):
    """0x0 images, a negative count, a count of 2^31 - 1, or more images promised than
    given (2 images of 3x3 written): refused by the check that runs before a run starts
    (the header alone, against the file's size), in the same line as a full load."""
    from diffsens_cli.data import check_images

    images = np.zeros((2, 3, 3), np.uint8)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3i", *sizes) + images.tobytes()
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), gz=False)
    expected = (f"dataset.root: {path} is not an IDX file of unsigned bytes (magic 0x0000080N, N sizes of at least "
                "1, then exactly their product in bytes)")
    assert error(check_images, cfg("mnist", root=str(tmp_path))) == expected
    assert error(load_images, cfg("mnist", root=str(tmp_path))) == expected


def test_a_tmnist_csv_without_rows_or_with_labels_out_of_range_is_one_line_and_no_warning(tmp_path, recwarn):
    header = "names,labels," + ",".join(map(str, range(1, 785)))
    (tmp_path / "empty.csv").write_text(header + "\n")
    (tmp_path / "labels.csv").write_text(header + "\nAbel,12," + ",".join(["0"] * 784) + "\n")
    for file, rows in (("empty.csv", 0), ("labels.csv", 1)):
        assert error(load_images, cfg("tmnist", root=str(tmp_path), file=file)) == (
            f"dataset.file: {tmp_path / file} holds {rows} rows; expected at least one, with labels in 0..9 and "
            "pixels in 0..255")
    assert not [w for w in recwarn if "input contained no data" in str(w.message)]


# --- TMNIST ------------------------------------------------------------------------------


def test_tmnist_csv_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 784))
    labels = [7, 0, 3, 7]
    header = "names,labels," + ",".join(map(str, range(1, 785)))
    rows = [f'{name},{label},' + ",".join(map(str, p))
            for name, label, p in zip(["Abel-Regular", '"Odd, Font"', "Zilla-Bold", "Abel-Regular"], labels, pixels)]
    (tmp_path / "TMNIST_Data.csv").write_text("\n".join([header, *rows]) + "\n")
    s = load_images(cfg("tmnist", root=str(tmp_path), file="TMNIST_Data.csv"))
    assert torch.equal(s.images, unit(pixels.astype(np.uint8)).reshape(4, 1, 28, 28))
    assert s.labels.tolist() == labels
    (tmp_path / "bad.csv").write_text("label,1,2\n3,0,0\n")
    assert error(load_images, cfg("tmnist", root=str(tmp_path), file="bad.csv")) == (
        f"dataset.file: {tmp_path / 'bad.csv'} starts with columns label,1,2... (3 columns); TMNIST expects the "
        "Kaggle CSV bad.csv: header names,labels,1,2,...,784, then one row per image")
    assert error(load_images, cfg("tmnist", root=str(tmp_path), file="gone.csv")).startswith(
        f"dataset.root: {tmp_path} has no gone.csv; TMNIST expects")


# --- CelebA ------------------------------------------------------------------------------

ATTRS = ["5_o_Clock_Shadow", "Male", "Young"]
ATTR_ROWS = [[-1, 1, -1], [1, 1, 1], [-1, -1, 1], [1, 1, -1], [-1, -1, -1], [-1, 1, -1]]  # 6 images
PARTITION = [0, 0, 1, 0, 2, 0]  # train: images 0, 1, 3, 5


@pytest.fixture
def celeba_root(tmp_path) -> Path:
    """Six 20x24 JPEGs, each a different noise pattern, with the two text files."""
    (tmp_path / "img_align_celeba").mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
            tmp_path / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=90)
    lines = ["6", " ".join(ATTRS)] + [f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in row)
                                      for i, row in enumerate(ATTR_ROWS)]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = "".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(PARTITION))
    (tmp_path / "list_eval_partition.txt").write_text(partition)
    return tmp_path


def centre_crop(root: Path, i: int) -> torch.Tensor:
    """Image i decoded by Pillow, its centre 8x8 (rows 8..15, columns 6..13 of 24x20), in [-1, 1]."""
    pixels = np.asarray(Image.open(root / "img_align_celeba" / f"{i + 1:06d}.jpg").convert("RGB"))
    return unit(pixels[8:16, 6:14].copy()).permute(2, 0, 1)


def test_celeba_crops_splits_and_attributes(celeba_root):
    s = load_images(cfg("celeba", root=str(celeba_root), split="train", crop=8))
    train = [0, 1, 3, 5]
    assert torch.equal(s.images, torch.stack([centre_crop(celeba_root, i) for i in train]))
    assert s.labels is None and list(s.attributes) == ATTRS
    assert s.attributes["Male"].dtype == torch.bool
    assert s.attributes["5_o_Clock_Shadow"].tolist() == [ATTR_ROWS[i][0] == 1 for i in train]
    assert len(load_images(cfg("celeba", root=str(celeba_root), split="all", crop=8))) == 6
    assert len(load_images(cfg("celeba", root=str(celeba_root), split="test", crop=8))) == 1
    resized = load_images(cfg("celeba", root=str(celeba_root), split="valid", crop=8, image_size=4))
    assert resized.images.shape == (1, 3, 4, 4) and resized.images.abs().max() <= 1


def test_celeba_limit_decodes_only_the_drawn_images(celeba_root):
    c = cfg("celeba", root=str(celeba_root), split="all", crop=8, limit=2, seed=3)
    first = load_images(c)
    drawn = [i for i in range(6) if any(torch.equal(centre_crop(celeba_root, i), x) for x in first.images)]
    assert len(drawn) == 2
    for i in set(range(6)) - set(drawn):
        (celeba_root / "img_align_celeba" / f"{i + 1:06d}.jpg").write_bytes(b"not a jpeg")
    again = load_images(c)
    assert torch.equal(again.images, first.images)
    assert again.attributes["Young"].tolist() == [ATTR_ROWS[i][2] == 1 for i in drawn]


def test_celeba_explains_missing_or_bad_files(celeba_root):
    (celeba_root / "list_eval_partition.txt").unlink()
    assert error(load_images, cfg("celeba", root=str(celeba_root), split="train", crop=8)) == (
        f"dataset.root: {celeba_root} has no list_eval_partition.txt; CelebA expects img_align_celeba/*.jpg, "
        "list_attr_celeba.txt (line 1 the count, line 2 the 40 attribute names, then '000001.jpg -1 1 ...' rows) "
        "and list_eval_partition.txt ('000001.jpg 0' rows: 0 train, 1 valid, 2 test)")
    assert len(load_images(cfg("celeba", root=str(celeba_root), split="all", crop=8))) == 6  # needs no partition
    assert error(load_images, cfg("celeba", root=str(celeba_root), split="all", crop=30)) == \
        f"dataset.crop: 30 is larger than {celeba_root / 'img_align_celeba' / '000001.jpg'} (20x24)"
    (celeba_root / "list_attr_celeba.txt").write_text("7\n" + " ".join(ATTRS) + "\n000001.jpg 1 0 1\n")
    assert error(load_images, cfg("celeba", root=str(celeba_root), split="all")).startswith(
        f"dataset.root: {celeba_root / 'list_attr_celeba.txt'} is malformed (expected line 1 the count")


# --- CIFAR-10 ----------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as cPickle wrote the CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    """A batch as published: protocol 2, Python 2 strings, numpy 1.x's module name for ``_reconstruct``."""
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(batch)
    raw = path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    path.write_bytes(raw)


@pytest.fixture
def cifar_root(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 12)
    for i in range(5):
        write_cifar_batch(folder / f"data_batch_{i + 1}", data[2 * i:2 * i + 2], labels[2 * i:2 * i + 2].tolist())
    write_cifar_batch(folder / "test_batch", data[10:], labels[10:].tolist())
    return tmp_path, data, labels


def test_cifar_round_trips(cifar_root):
    root, data, labels = cifar_root
    train = load_images(cfg("cifar10", root=str(root), split="train"))
    assert torch.equal(train.images, unit(data[:10]).reshape(10, 3, 32, 32))
    assert torch.equal(train.images[4, 0].flatten(), unit(data[4, :1024]))  # the first 1024 bytes: the red plane
    assert train.labels.tolist() == labels[:10].tolist()
    test = load_images(cfg("cifar10", root=str(root), split="test"))
    assert torch.equal(test.images, unit(data[10:]).reshape(2, 3, 32, 32))
    assert test.labels.tolist() == labels[10:].tolist()
    # what numpy 2 writes by default loads too
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": data[10:], b"labels": labels[10:].tolist()}, f, protocol=4)
    assert torch.equal(load_images(cfg("cifar10", root=str(root), split="test")).images, test.images)


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def test_cifar_refuses_pickles_that_call_anything_but_numpy(cifar_root):
    root, data, _ = cifar_root
    path = root / "cifar-10-batches-py" / "data_batch_3"
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump({b"data": data[:2], b"labels": [0, 1], b"x": Exploit()})
    assert error(load_images, cfg("cifar10", root=str(root))) == (
        f"dataset.root: {path} is not a CIFAR-10 batch: it asks for posix.system, which is refused "
        "(only numpy arrays load)")
    path.write_bytes(pickle.dumps({b"data": data[:2, :100], b"labels": [0, 1]}, protocol=4))
    assert error(load_images, cfg("cifar10", root=str(root))) == (
        f"dataset.root: {path} is not a CIFAR-10 batch: expected a dict with b'data' (uint8 [N, 3072]) "
        "and b'labels' (N ints)")
    path.unlink()
    assert error(load_images, cfg("cifar10", root=str(root))) == (
        f"dataset.root: {root} has no cifar-10-batches-py/data_batch_3; CIFAR-10 expects cifar-10-batches-py/ "
        "with data_batch_1..5 and test_batch (the python version)")


# --- perturbation sets ---------------------------------------------------------------------


def test_classes_then_num_samples(digits):
    s = perturbation_set(image_set(classes=[3, 8]), digits, cfg("digits"))
    assert len(s) == DIGIT_COUNTS[3] + DIGIT_COUNTS[8] and set(s.labels.tolist()) == {3, 8}
    assert torch.equal(s.images, digits.images[(digits.labels == 3) | (digits.labels == 8)])
    few = perturbation_set(image_set(classes=[3, 8], num_samples=10), digits, cfg("digits"))
    assert len(few) == 10 and set(few.labels.tolist()) <= {3, 8}
    assert torch.equal(few.images, perturbation_set(image_set(classes=[3, 8], num_samples=10), digits,
                                                    cfg("digits")).images)
    assert error(perturbation_set, image_set(classes=[11]), digits, cfg("digits")) == \
        "perturbation.classes: [11] selects none of the 1797 images of digits"


@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_top_k_of_scores_among_the_images_left(digits, tmp_path, suffix):
    scores = -np.arange(1797, dtype=np.float64)  # the earlier an image, the higher its score
    path = tmp_path / f"scores{suffix}"
    np.save(path, scores) if suffix == ".npy" else np.savetxt(path, scores)
    s = perturbation_set(image_set(classes=[5], scores_file=str(path), top_k=4), digits, cfg("digits"))
    first_fives = torch.nonzero(digits.labels == 5)[:4, 0]
    assert torch.equal(s.images, digits.images[first_fives]) and s.labels.tolist() == [5] * 4
    np.save(tmp_path / "short.npy", scores[:10])
    assert error(perturbation_set, image_set(scores_file=str(tmp_path / "short.npy"), top_k=1), digits,
                 cfg("digits")) == (f"perturbation.scores_file: {tmp_path / 'short.npy'} holds 10 scores, but the "
                                    "source set has 1797 images (one score per image, in order, after split and limit)")
    assert error(perturbation_set, image_set(top_k=3), digits, cfg("digits")) == \
        "perturbation.top_k: scores_file and top_k go together: keep the top_k highest scores"


def test_attribute_expressions(celeba_root):
    base_cfg = cfg("celeba", root=str(celeba_root), split="all", crop=8)
    base = load_images(base_cfg)

    def selected(expression: str) -> list[int]:
        s = perturbation_set(image_set(attributes=expression), base, base_cfg)
        return [i for i in range(6) if any(torch.equal(base.images[i], x) for x in s.images)]

    # rows (5_o_Clock_Shadow, Male, Young): 0 -+-, 1 +++, 2 --+, 3 ++-, 4 ---, 5 -+-
    assert selected("Male and not Young") == [0, 3, 5]
    assert selected("5_o_Clock_Shadow or Young") == [1, 2, 3]
    assert selected("not (Male or Young) or 5_o_Clock_Shadow and Young") == [1, 4]
    assert error(perturbation_set, image_set(attributes="Male and Bald"), base, base_cfg) == (
        "perturbation.attributes: unknown attribute 'Bald' in 'Male and Bald'; the attributes are "
        "5_o_Clock_Shadow, Male, Young")
    assert error(perturbation_set, image_set(attributes="Male == 1"), base, base_cfg) == (
        "perturbation.attributes: 'Male == 1' uses 'Male == 1'; only attribute names, and, or, not and "
        "parentheses are allowed")
    assert error(perturbation_set, image_set(attributes="__import__('os').system('x')"), base, base_cfg).startswith(
        "perturbation.attributes: \"__import__('os').system('x')\" uses")
    assert error(perturbation_set, image_set(attributes="Male and"), base, base_cfg) == (
        "perturbation.attributes: cannot parse 'Male and': write attribute names joined by and, or, not and "
        "parentheses")
    assert error(perturbation_set, image_set(attributes="5_o_Clock_Shadow and not Male"), base, base_cfg) == (
        "perturbation.attributes: '5_o_Clock_Shadow and not Male' selects none of the 6 images of celeba")
    assert error(perturbation_set, image_set(classes=[1]), base, base_cfg) == \
        "perturbation.classes: the source set celeba has no class labels"


def test_attributes_need_a_set_with_attributes(digits):
    assert error(perturbation_set, image_set(attributes="Male"), digits, cfg("digits")) == \
        "perturbation.attributes: the source set digits has no attributes (celeba and lfw_faces have them)"


def test_attributes_top_k_and_num_samples_compose(celeba_root, tmp_path):
    base_cfg = cfg("celeba", root=str(celeba_root), split="all", crop=8)
    base = load_images(base_cfg)
    np.savetxt(tmp_path / "scores.txt", [0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    s = perturbation_set(image_set(attributes="Male", scores_file=str(tmp_path / "scores.txt"), top_k=2), base,
                         base_cfg)  # Male: 0, 1, 3, 5 with scores 0.1, 0.9, 0.8, 0.7 -> 1 and 3
    assert torch.equal(s.images, base.images[[1, 3]])
    assert s.attributes["Young"].tolist() == [True, False]
    one = perturbation_set(image_set(attributes="Male", num_samples=1), base, base_cfg)
    assert len(one) == 1 and one.attributes["Male"].all()
    assert error(perturbation_set, image_set(attributes="Young and Male and not 5_o_Clock_Shadow"), base, base_cfg) \
        == ("perturbation.attributes: 'Young and Male and not 5_o_Clock_Shadow' selects none of the 6 images of "
            "celeba")


def test_sequential_filters_report_the_earlier_keys(digits):
    faces = ImageSet(digits.images[:4], torch.tensor([1, 1, 2, 2]),
                     {"Male": torch.tensor([True, False, True, False])}, "fake")
    assert len(perturbation_set(image_set(classes=[1], attributes="Male"), faces, cfg("digits"))) == 1
    assert error(perturbation_set, image_set(classes=[2], attributes="not Male and Male"), faces, cfg("digits")) == (
        "perturbation.attributes: 'not Male and Male' selects none of the 2 images left after "
        "perturbation.classes=[2] (of 4 in fake)")


def test_source_from_another_data_set(digits):
    typo = cfg("typography", num_images=40)  # image_size null: takes rho's (8)
    s = perturbation_set(image_set(source=typo, classes=[4]), digits, cfg("digits"))
    assert s.images.shape == (4, 1, 8, 8) and s.labels.tolist() == [4] * 4 and s.name == "S(typography)"
    faces_cfg = cfg("lfw_faces", image_size=24)
    typeset_faces = perturbation_set(image_set(source=typo), load_images(faces_cfg), faces_cfg)
    assert typeset_faces.images.shape == (40, 1, 24, 24)  # rendered at rho's size
    assert error(perturbation_set, image_set(source={**typo, "image_size": 12}), digits, cfg("digits")) == (
        "perturbation.source: typography images are 1x12x12, but rho's data set digits has 1x8x8 "
        "(channels x height x width)")
    assert error(perturbation_set, image_set(source=typo, direction="remove"), digits, cfg("digits")) == (
        "perturbation.source: direction=remove takes S from rho's own data set: leave source null and select with "
        "classes, attributes, scores_file/top_k or num_samples")
    same = perturbation_set(image_set(source=cfg("digits"), direction="remove"), digits, cfg("digits"))
    assert torch.equal(same.images, digits.images)
    assert error(perturbation_set, image_set(source={**typo, "limit": -1}), digits, cfg("digits")) == \
        "perturbation.source.limit: must be null or a whole number >= 1, got -1"


# --- Hydra composition -------------------------------------------------------------------


def test_source_composes_from_the_command_line(digits):
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        c = compose("config", overrides=["experiment=gmm_first_order", "dataset=digits", "perturbation=image_set",
                                         "seed=2",
                                         "+dataset@perturbation.source=typography",
                                         "perturbation.source.num_images=30", "perturbation.classes=[0]"])
    assert c.perturbation.source.kind == "typography" and c.perturbation.source.seed == 2 and c.dataset.kind == "digits"
    s = perturbation_set(c.perturbation, load_images(c.dataset), c.dataset)
    assert s.images.shape == (3, 1, 8, 8) and s.labels.tolist() == [0, 0, 0]


def test_source_composes_from_an_experiment(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo_probe.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /dataset@perturbation.source: typography\n"
        "  - override /dataset: digits\n  - override /perturbation: image_set\n"
        "name: typo_probe\nperturbation:\n  classes: [3]\n")
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        c = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo_probe"])
    assert c.perturbation.kind == "image_set" and c.perturbation.source.kind == "typography"
    assert c.perturbation.classes == [3] and c.dataset.kind == "digits"


def test_old_men_selects_male_and_not_young(celeba_root):
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        c = compose("config", overrides=["experiment=gmm_first_order", "dataset=celeba", f"dataset.root={celeba_root}",
                                         "dataset.split=all",
                                         "dataset.crop=8", "dataset.image_size=null", "perturbation=old_men"])
    assert c.perturbation.attributes == "Male and not Young" and c.perturbation.source is None
    base = load_images(c.dataset)
    s = perturbation_set(c.perturbation, base, c.dataset)
    assert torch.equal(s.images, base.images[[0, 3, 5]])
