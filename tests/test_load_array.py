"""``datasets.load_array``: NaN refused unless the caller keeps them as missing values; infinities always."""

import numpy as np
import pytest
import torch

from freqvi.datasets import load_array
from freqvi.errors import FreqviInputError


def with_nan(rows=6, columns=3):
    x = np.arange(rows * columns, dtype=np.float64).reshape(rows, columns)
    x[4, 2] = x[5, 0] = np.nan
    return x


@pytest.mark.parametrize("source", ["array", "npy", "csv"])
def test_nan_is_refused_naming_the_first(tmp_path, source):
    x = with_nan()
    if source == "npy":
        np.save(tmp_path / "x.npy", x)
        x = tmp_path / "x.npy"
    elif source == "csv":
        np.savetxt(tmp_path / "x.csv", x, delimiter=",")
        x = tmp_path / "x.csv"
    expected = (r"holds 2 non-finite value\(s\), NaN \(first at row 4, column 2\);.*allow_nan=True if the "
                r"model handles missing values")
    with pytest.raises(FreqviInputError, match=expected):
        load_array(x)


@pytest.mark.parametrize("source", ["array", "npy"])
def test_allow_nan_keeps_every_value_where_it_was(tmp_path, source):
    x = with_nan()
    if source == "npy":
        np.save(tmp_path / "x.npy", x)
    loaded = load_array(tmp_path / "x.npy" if source == "npy" else x, allow_nan=True)
    assert loaded.dtype == torch.float64
    np.testing.assert_array_equal(loaded.numpy(), x)  # NaN where x has NaN, every other value equal


def test_infinite_values_are_refused_even_with_allow_nan():
    x = with_nan()
    x[1, 1] = -np.inf
    with pytest.raises(FreqviInputError, match=r"1 non-finite value\(s\) \(first: infinite at index \(1, 1"):
        load_array(x, allow_nan=True)


def test_values_a_narrower_dtype_cannot_hold_are_refused():
    x = np.ones((4, 2))
    x[2, 0] = 1e300  # above float32's largest, 3.4e38: float32 makes it inf
    assert torch.isinf(torch.tensor(x).float()[2, 0])
    with pytest.raises(FreqviInputError, match=r"infinite at index \(2, 0\)"):
        load_array(x, dtype=torch.float32)
    assert load_array(x)[2, 0].item() == 1e300
