"""Data for freqvi: the embedded iris and digits data, two 2-D toy sets, loaders for user arrays and files.

Every loader returns a 2-D tensor of shape ``(n_observations, dim)``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from freqvi.errors import FreqviInputError
from freqvi.validation import as_real, check_choice, check_finite, check_positive_int

FILE_TYPES = (".npy", ".csv")
DIGITS_SPLITS = ("train", "test", "all")
#: Training images of :func:`load_digits`; the other 297 of the 1,797 are the test split.
DIGITS_TRAIN_SIZE = 1500
_DIGITS_SPLIT_SEED = 0
#: Intensity (in ``[0, 1]``) above which :func:`load_digits` with ``binarize=True`` sets a pixel to 1.
DIGITS_THRESHOLD = 0.5
#: Points of :func:`load_moons` and :func:`load_swiss_roll` in each of the train and test splits.
TOY_SPLIT_SIZE = 2000
TOY_NOISE = {"moons": 0.1, "swiss_roll": 0.5}
_TOY_SEED = 0


def load_iris(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fisher's iris measurements, shape ``(150, 4)``.

    Columns: sepal length, sepal width, petal length, petal width (cm). Read from
    scikit-learn's embedded copy, so nothing is downloaded: the CSV file it ships is
    read directly, as importing scikit-learn takes seconds; through
    :func:`sklearn.datasets.load_iris` if that file is not where it has long been.
    """
    path = _sklearn_iris_csv()
    if path is not None:
        values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(4))
    else:
        from sklearn import datasets

        values = datasets.load_iris().data
    return torch.as_tensor(values, dtype=_check_dtype(dtype))


def _sklearn_iris_csv() -> Path | None:
    """``sklearn/datasets/data/iris.csv``, found without importing scikit-learn."""
    return _sklearn_data_file("iris.csv")


def _sklearn_data_file(name: str) -> Path | None:
    """``sklearn/datasets/data/<name>``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / name
    return path if path.is_file() else None


def load_digits(split: str = "train", dtype: torch.dtype = torch.float32,
                return_labels: bool = False, *,
                binarize: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 handwritten digits of the UCI repository, as scikit-learn embeds them.

    1,797 images, each a row of 64 pixel intensities in ``0..16`` (row-major),
    divided by 16 so that they lie in ``[0, 1]``. The fixed split: a permutation of
    the rows drawn by ``numpy.random.default_rng(0)``; its first 1,500 rows are
    ``"train"``, the remaining 297 ``"test"``; ``"all"`` is every row in the
    original order.

    :param split: ``"train"``, ``"test"`` or ``"all"``.
    :param return_labels: also return the digits ``0..9``, an int64 tensor ``(n,)``.
    :param binarize: pixels above one half (intensity above 8 of 16) become 1, the others 0
        (:data:`DIGITS_THRESHOLD`): binary images, on which a Bernoulli likelihood is a
        normalised probability and :math:`\\log p(x)` a log-likelihood (on grey levels it is a
        cross-entropy). The tour and ``freqvi vae`` use this binarisation.
    :returns: the images, shape ``(n, 64)`` (and the labels).
    :raises FreqviInputError: for an unknown ``split``, a ``dtype`` that is not a floating
        torch dtype, or a ``binarize`` that is not a bool.
    """
    split = check_choice(split, "split", DIGITS_SPLITS)
    if not isinstance(binarize, bool):
        raise FreqviInputError(f"binarize must be True or False; got {binarize!r}.")
    path = _sklearn_data_file("digits.csv.gz")
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        from sklearn import datasets

        bunch = datasets.load_digits()
        pixels, labels = bunch.data, bunch.target
    if split != "all":
        order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(pixels))
        rows = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
        pixels, labels = pixels[rows], labels[rows]
    pixels = pixels / 16.0
    if binarize:
        pixels = (pixels > DIGITS_THRESHOLD).astype(pixels.dtype)
    x = torch.as_tensor(pixels, dtype=_check_dtype(dtype))
    return (x, torch.as_tensor(labels, dtype=torch.int64)) if return_labels else x


def load_moons(split: str = "train", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scikit-learn's two interleaving half circles, 2-D, standardised: shape ``(2000, 2)`` per split.

    ``sklearn.datasets.make_moons(4000, noise=0.1, random_state=0)``; its first 2,000 rows are
    ``"train"``, the other 2,000 ``"test"`` (``"all"``: both). Both splits are centred and
    scaled by the training split's mean and standard deviation per coordinate.
    """
    from sklearn.datasets import make_moons

    points, _ = make_moons(2 * TOY_SPLIT_SIZE, noise=TOY_NOISE["moons"], random_state=_TOY_SEED)
    return _standardised_split(points, split, dtype)


def load_swiss_roll(split: str = "train", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scikit-learn's swiss roll seen from its axis, 2-D, standardised: shape ``(2000, 2)`` per split.

    Columns 0 and 2 of ``sklearn.datasets.make_swiss_roll(4000, noise=0.5, random_state=0)``
    (the spiral; column 1 is the roll's length); splits and scaling as in :func:`load_moons`.
    """
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(2 * TOY_SPLIT_SIZE, noise=TOY_NOISE["swiss_roll"], random_state=_TOY_SEED)
    return _standardised_split(points[:, [0, 2]], split, dtype)


def _standardised_split(points: np.ndarray, split: str, dtype: torch.dtype) -> torch.Tensor:
    """The rows of ``split`` (first half train, second test), scaled by the train rows' mean and sd."""
    split = check_choice(split, "split", DIGITS_SPLITS)
    train = points[:TOY_SPLIT_SIZE]
    scaled = (points - train.mean(0)) / train.std(0)
    rows = {"train": slice(0, TOY_SPLIT_SIZE), "test": slice(TOY_SPLIT_SIZE, None), "all": slice(None)}[split]
    return torch.as_tensor(scaled[rows], dtype=_check_dtype(dtype))


def load_array(path_or_array, dtype: torch.dtype | None = None, *, allow_nan: bool = False) -> torch.Tensor:
    """A 2-D tensor of observations, shape ``(n_observations, dim)``, from an array or a file.

    :param path_or_array: a tensor or array-like of shape ``(n, dim)``, or the path
        (``str`` or ``os.PathLike``) of a ``.npy`` file or a numeric ``.csv`` file
        (comma-separated, one observation per line, an optional single header row
        detected automatically, ``#`` comments skipped). A one-column CSV gives ``(n, 1)``.
    :param dtype: the floating dtype to return; default: precision follows the data
        (float64 stays float64, so CSV files load as float64; other numbers become float32).
    :param allow_nan: keep NaN entries, as missing values, for a model that handles them;
        by default they are refused. Infinite values are refused either way, also those a
        narrower ``dtype`` makes (1e300 in float32).
    :raises FreqviInputError: for a missing file, an extension other than ``.npy`` or
        ``.csv``, non-numeric content, NaN (unless ``allow_nan``) or infinite values
        (naming the first one's row and column), or data that is not 2-D.
    """
    if isinstance(path_or_array, str | os.PathLike):
        name = str(path_or_array)
        x = as_real(_read_file(Path(path_or_array)), name)
    else:
        name = "data"
        x = as_real(path_or_array, name)
    _check_2d(x, name)
    x = x if dtype is None else x.to(_check_dtype(dtype))
    _check_values(x, name, allow_nan)
    return x


def _check_values(x: torch.Tensor, name: str, allow_nan: bool) -> None:
    """Refuses infinite values, and NaN unless ``allow_nan``, naming the first one's place."""
    check_finite(torch.where(torch.isnan(x), 0.0, x), name)  # infinities first: never a missing value
    missing = torch.isnan(x)
    if not allow_nan and missing.any():
        row, column = (int(i) for i in missing.nonzero()[0])
        raise FreqviInputError(
            f"{name} holds {int(missing.sum())} non-finite value(s), NaN (first at row {row}, column "
            f"{column}); remove or impute them, or pass allow_nan=True if the model handles missing values."
        )


def _read_file(path: Path) -> np.ndarray:
    """The numbers in a ``.npy`` or ``.csv`` file, as NumPy returns them."""
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise FreqviInputError(
            f"data file must end in {' or '.join(FILE_TYPES)}; got {path.name!r}."
        )
    if not path.is_file():
        raise FreqviInputError(f"data file {str(path)!r} does not exist (or is not a file).")
    return _read_npy(path) if suffix == ".npy" else _read_csv(path)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # an empty file is an EOFError
        raise FreqviInputError(
            f"{path} is not a readable .npy file of numbers (NumPy says: {exc})."
        ) from None


def _read_csv(path: Path) -> np.ndarray:
    """Comma-separated numbers, skipping a header row if the first data line is not numeric."""
    try:
        skip = _header_rows(path)  # a file that is not UTF-8 fails here, a ValueError too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked below
            values = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, encoding="utf-8-sig")
    except ValueError as exc:
        raise FreqviInputError(
            f"{path} must hold comma-separated numbers as UTF-8 text (with at most one header row); "
            f"reading it failed: {exc}"
        ) from None
    if values.size == 0:
        raise FreqviInputError(f"{path} holds no numbers; expected one observation per line.")
    return values


def _header_rows(path: Path) -> int:
    """Lines to skip: up to and including the first content line if it is not all numbers."""
    with path.open(encoding="utf-8-sig") as lines:
        for index, line in enumerate(lines):
            content = line.split("#", 1)[0].strip()
            if content:
                return 0 if _is_numeric_row(content) else index + 1
    return 0


def _is_numeric_row(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return False
    return True


def _check_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        hint = " (for one variable, reshape to (n, 1))" if x.dim() == 1 else ""
        raise FreqviInputError(
            f"{name} must be 2-D, shape (n_observations, dim){hint}; got shape {tuple(x.shape)}."
        )


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FreqviInputError(f"dtype must be a floating torch dtype; got {dtype!r}.")
    return dtype


class NpyBatches:
    """Batches of rows of a ``.npy`` file too large for memory, read from disk as they are needed.

    The header is parsed once (:func:`numpy.load` with ``mmap_mode="r"``, then the map
    is dropped); each batch is read by its own call of :func:`numpy.fromfile` at its
    byte offset into fresh memory, so no page of the file stays mapped and resident
    memory holds a batch at a time, whatever the number of rows. The rows are cut
    into consecutive blocks of ``batch_size`` (the last may be shorter); each pass
    visits the blocks in a random order drawn from ``(seed, pass number)``, or in
    file order with ``shuffle=False``. With ``world_size > 1`` (data-parallel runs),
    process ``rank`` reads blocks ``rank, rank + world_size, ...`` of each pass's order,
    every process the same number of them (leftover blocks sit that pass out).

    Iterating yields tensors of shape ``(b, *row_shape)``: float64 for a float64 file,
    else float32, unless ``dtype`` is given. ``num_observations`` is the number of rows
    in the file (of all processes together) and ``len()`` the batches per pass here.
    ``state_dict()``/``load_state_dict()`` save and restore the pass and the position in
    it: the next iteration after a load continues from there (checkpoints, ``resume=``).
    One iteration at a time: starting another moves the state to it.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, shuffle: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.shape, self.file_dtype, self.offset = _npy_layout(self.path)
        self.num_observations = self.shape[0]
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.world_size = check_positive_int(world_size, "world_size")
        self.rank = check_positive_int(rank, "rank", minimum=0)
        if self.rank >= self.world_size:
            raise FreqviInputError(f"rank must be below world_size = {self.world_size}; got {rank}.")
        self.blocks = -(-self.num_observations // self.batch_size)
        if self.blocks < self.world_size:
            raise FreqviInputError(f"{self.path} holds {self.blocks} block(s) of batch_size rows, fewer than "
                                   f"world_size = {self.world_size} processes; lower batch_size.")
        self.shuffle, self.seed = bool(shuffle), int(seed)
        default = torch.float64 if self.file_dtype == np.float64 else torch.float32
        self.dtype = default if dtype is None else _check_dtype(dtype)
        self.pass_number, self.position = -1, 0
        self.resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.blocks // self.world_size

    def __iter__(self):
        if self.resume_at is not None:
            (self.pass_number, self.position), self.resume_at = self.resume_at, None
        else:
            self.pass_number, self.position = self.pass_number + 1, 0
        return self._batches(self._blocks(self.pass_number)[self.position:])

    def state_dict(self) -> dict:
        """The pass under way and how many of its batches were read."""
        return {"pass": self.pass_number, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Makes the next iteration continue the pass ``state`` describes."""
        self.resume_at = (int(state["pass"]), int(state["position"]))

    def _blocks(self, pass_number: int) -> np.ndarray:
        """This process's blocks in pass ``pass_number``, in reading order."""
        order = (np.random.default_rng([self.seed, pass_number]).permutation(self.blocks) if self.shuffle
                 else np.arange(self.blocks))
        return order[self.rank::self.world_size][:len(self)]

    def _batches(self, blocks: np.ndarray):
        for block in blocks:
            self.position += 1
            yield self._read(int(block))

    def _read(self, block: int) -> torch.Tensor:
        """Rows ``block * batch_size`` onwards, at most ``batch_size`` of them, read into new memory."""
        start = block * self.batch_size
        rows = min(self.batch_size, self.num_observations - start)
        row_size = int(np.prod(self.shape[1:]))
        values = np.fromfile(self.path, dtype=self.file_dtype, count=rows * row_size,
                             offset=self.offset + start * row_size * self.file_dtype.itemsize)
        return torch.from_numpy(values.reshape(rows, *self.shape[1:])).to(self.dtype)


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, byte offset of the data)`` of a C-ordered numeric ``.npy`` file of 2+ dimensions."""
    if path.suffix.lower() != ".npy" or not path.is_file():
        raise FreqviInputError(f"expected an existing .npy file; got {str(path)!r}.")
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # an empty file is an EOFError
        raise FreqviInputError(f"{path} is not a readable .npy file (NumPy says: {exc}).") from None
    shape, dtype, offset = mapped.shape, mapped.dtype, mapped.offset
    c_order = mapped.flags.c_contiguous
    del mapped
    if dtype.kind not in "fiu" or len(shape) < 2 or shape[0] == 0 or not c_order:
        order = "C" if c_order else "Fortran"
        raise FreqviInputError(f"{path} must hold real numbers of shape (n_observations, dim, ...) in C "
                               f"order; got dtype {dtype}, shape {shape}, {order} order.")
    return shape, dtype, offset
