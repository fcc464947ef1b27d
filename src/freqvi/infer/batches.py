"""Where a run's observations come from: arrays in memory or a stream of batches, behind one interface.

A driver asks a :class:`BatchSource` for the next :class:`Batch` (the model's
arguments for one step and a :class:`~freqvi.handlers.SubsamplePlate` that makes
the data plate stand for all ``n`` observations) or for one pass over the data.
Arrays in memory are one kind of source (epochs of a random permutation, the model
called with all rows and the plate's indices); an iterable of batches (a
:class:`torch.utils.data.DataLoader`, :class:`freqvi.datasets.NpyBatches`, a
generator) is the other (the model called with each batch, the plate scaled by
``n / len(batch)``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from freqvi.errors import FreqviInputError
from freqvi.guides import LocalMeanField
from freqvi.handlers import SubsamplePlate
from freqvi.traces import data_plate
from freqvi.validation import WithMissing, as_data, check_not_callable, check_positive_int, with_missing


@dataclass(frozen=True)
class Batch:
    """One step's observations.

    :ivar data: the model's and guide's positional arguments, tensors of ``b`` (or all) rows.
    :ivar handler: the context under which the data plate stands for all ``n`` observations.
    """

    data: tuple[torch.Tensor, ...]
    handler: SubsamplePlate | nullcontext

    def bind(self, fn):
        """``fn`` run under :attr:`handler` (for code that blocks enclosing handlers, as tracing does)."""
        return fn if isinstance(self.handler, nullcontext) else self.handler(fn)


class BatchSource(ABC):
    """The observations of a run, one step's batch at a time, in passes over the data.

    :ivar n: the number of observations the data plate stands for (the true n).
    """

    n: int
    plate_name: str

    def next(self) -> Batch:
        """The next batch, starting a new pass when the current one has ended."""
        batch = self._next_in_pass()
        if batch is None:
            self._new_pass()
            batch = self._next_in_pass()
        return batch

    def epoch(self) -> Iterator[Batch]:
        """The rest of the current pass, or a whole new pass if the current one has ended."""
        batch = self.next()
        while batch is not None:
            yield batch
            batch = self._next_in_pass()

    @abstractmethod
    def first(self) -> tuple[torch.Tensor, ...]:
        """Data to check the model and guide on, before any step."""

    @abstractmethod
    def check_batch(self) -> Batch:
        """The observations of one step, before any step, the plate at its declared size (what
        :meth:`check_plate` reads): what a driver checks the model and guide on."""

    @abstractmethod
    def check_plate(self, model_trace, guide) -> None:
        """Raises unless the model has the data plate this source needs, over ``first()``'s rows."""

    @abstractmethod
    def evaluation_pass(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Every observation once, in parts whose unscaled objectives sum to the full data's."""

    @abstractmethod
    def resumable(self) -> str | None:
        """Why the position in the data cannot be saved and restored, or ``None`` if it can."""

    @abstractmethod
    def state(self) -> dict:
        """The position in the data, for a checkpoint."""

    @abstractmethod
    def load(self, state: dict) -> None:
        """Restores what :meth:`state` returned."""

    @abstractmethod
    def _next_in_pass(self) -> Batch | None:
        """The next batch of the current pass, or ``None`` at its end."""

    @abstractmethod
    def _new_pass(self) -> None:
        """Starts a pass over the data."""


def make_batches(data, batch_size: int | None, plate_name: str, num_observations: int | None = None,
                 device: torch.device | None = None) -> BatchSource:
    """An :class:`InMemoryBatches` for arrays, a :class:`StreamedBatches` for an iterable of batches."""
    if num_observations is not None:
        num_observations = check_positive_int(num_observations, "num_observations")
    check_not_callable(data)
    missing = isinstance(data, WithMissing)
    if not is_stream(data.data if missing else data):
        return InMemoryBatches(as_data(data), batch_size, plate_name, num_observations, device)
    if batch_size is not None:
        raise FreqviInputError(
            f"batch_size={batch_size!r} was given with data that already come in batches "
            f"({type(data).__name__}); set the batch size in the data source and leave batch_size out."
        )
    if missing:
        return StreamedBatches(data.data, plate_name, num_observations, device, missing=True)
    return StreamedBatches(data, plate_name, num_observations, device)


def is_stream(data) -> bool:
    """Whether ``data`` is an iterable of batches rather than arrays (tuples and lists are arrays)."""
    return (isinstance(data, Iterable) and not hasattr(data, "__array__")
            and not isinstance(data, tuple | list | str | bytes | dict))


class InMemoryBatches(BatchSource):
    """Epochs of a random permutation of rows held in memory, ``batch_size`` at a time (or all rows).

    The model is called with every row and the plate's indices; a last partial
    batch of each epoch is dropped. With ``num_observations`` larger than the rows
    held (one process's shard), the plate stands for that many.
    """

    def __init__(self, data: tuple[torch.Tensor, ...], batch_size: int | None, plate_name: str,
                 num_observations: int | None = None, device: torch.device | None = None):
        self.data = data if device is None else tuple(t.to(device) for t in data)
        self.rows = data[0].shape[0]
        self.n = self.rows if num_observations is None else num_observations
        if self.n < self.rows:
            raise FreqviInputError(f"num_observations must be at least the {self.rows} rows given; "
                                   f"got {self.n}.")
        if batch_size is not None:
            batch_size = check_positive_int(batch_size, "batch_size")
            if batch_size > self.rows:
                raise FreqviInputError(f"batch_size must be between 1 and n = {self.rows}; got {batch_size}.")
        self.batch_size, self.plate_name = batch_size, plate_name
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def first(self) -> tuple[torch.Tensor, ...]:
        return self.data

    def check_batch(self) -> Batch:
        """The first ``batch_size`` rows in order (all rows without minibatches): no random draw."""
        if self.batch_size is None:
            return Batch(self.data, nullcontext())
        return Batch(self.data, SubsamplePlate(self.plate_name, torch.arange(self.batch_size)))

    def check_plate(self, model_trace, guide) -> None:
        # A model with no data plate fits whole; a plate name given (not the default) must be the model's.
        if self.batch_size is not None or self.n != self.rows or self.plate_name != "data":
            data_plate(model_trace, self.plate_name, self.rows)

    def evaluation_pass(self) -> Iterator[tuple[torch.Tensor, ...]]:
        yield self.data

    def resumable(self) -> str | None:
        return None

    def state(self) -> dict:
        return {"order": self.order, "position": self.position}

    def load(self, state: dict) -> None:
        self.order, self.position = state["order"], state["position"]

    def _next_in_pass(self) -> Batch | None:
        if self.batch_size is None:  # one batch of all rows per pass
            fresh, self.position = self.position == 0, 1
            return Batch(self.data, self._handler(None)) if fresh else None
        if self.position + self.batch_size > len(self.order):
            return None
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return Batch(self.data, self._handler(indices))

    def _new_pass(self) -> None:
        self.position = 0
        if self.batch_size is not None:
            self.order = torch.randperm(self.rows)

    def _handler(self, indices: torch.Tensor | None) -> SubsamplePlate | nullcontext:
        size = None if self.n == self.rows else self.n
        if indices is None and size is None:
            return nullcontext()
        return SubsamplePlate(self.plate_name, indices, size)


class StreamedBatches(BatchSource):
    """Batches drawn from an iterable, each passed to the model, the data plate scaled to ``n``.

    Each batch is a tensor or array of ``b`` rows, or a tuple or list of them (the
    model's arguments); the model is called with it and its plate sites are scaled by
    ``n / b``. One iteration over ``source`` is one pass. With ``missing``, NaN cells
    of the batches pass (:func:`~freqvi.validation.with_missing`). ``n`` is ``num_observations``
    if given, else ``source.num_observations``, else ``len(source.dataset)`` (a
    ``DataLoader``). The position in the data can be checkpointed when ``source``
    has ``state_dict()`` and ``load_state_dict()`` (:class:`freqvi.datasets.NpyBatches`,
    torchdata's ``StatefulDataLoader``), whose next iteration continues from the state loaded.
    """

    def __init__(self, source: Iterable, plate_name: str, num_observations: int | None = None,
                 device: torch.device | None = None, missing: bool = False):
        self.source, self.plate_name, self.device, self.missing = source, plate_name, device, missing
        self.n = num_observations if num_observations is not None else _length(source)
        self.iterator: Iterator | None = None
        self.pending: Batch | None = None
        self.passes = 0
        self.shapes: list[tuple[int, ...]] | None = None

    def first(self) -> tuple[torch.Tensor, ...]:
        if self.pending is None:
            self._new_pass()
            self.pending = self._next_in_pass()
            if self.pending is None:
                raise FreqviInputError(f"the data source ({type(self.source).__name__}) yields no batches.")
        return self.pending.data

    def check_batch(self) -> Batch:
        return Batch(self.first(), nullcontext())

    def check_plate(self, model_trace, guide) -> None:
        """Also refuses freqvi's guide with parameters per observation: a batch's rows are new each time."""
        data_plate(model_trace, self.plate_name, self.first()[0].shape[0])
        if isinstance(getattr(guide, "__self__", guide), LocalMeanField):
            raise FreqviInputError(
                "a LocalMeanField guide has parameters per observation, which batches streamed from a larger "
                "data set cannot index; use an amortised guide (freqvi.guides.AmortizedNormal) or hold the "
                "data in memory."
            )

    def evaluation_pass(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.epoch():
            yield batch.data

    def resumable(self) -> str | None:
        if callable(getattr(self.source, "state_dict", None)) and callable(
                getattr(self.source, "load_state_dict", None)):
            return None
        return (f"the position in a {type(self.source).__name__} cannot be saved, so a resumed run could not "
                "continue where this one stops; stream from freqvi.datasets.NpyBatches or a source with "
                "state_dict() and load_state_dict() (torchdata's StatefulDataLoader), or hold the data "
                "in memory")

    def state(self) -> dict:
        return {"source": self.source.state_dict(), "passes": self.passes}

    def load(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.iterator, self.pending, self.passes = iter(self.source), None, state["passes"]

    def _next_in_pass(self) -> Batch | None:
        if self.pending is not None:
            batch, self.pending = self.pending, None
            return batch
        item = next(self.iterator, None) if self.iterator is not None else None
        if item is None:
            self.iterator = None
            return None
        data = self._checked(item)
        return Batch(data, SubsamplePlate(self.plate_name, None, self.n))

    def _new_pass(self) -> None:
        if self.passes > 0 and iter(self.source) is self.source:
            raise FreqviInputError(
                f"the data ({type(self.source).__name__}) is an iterator, used up after one pass; pass an "
                "iterable that can be iterated again (a DataLoader, freqvi.datasets.NpyBatches) or "
                "fewer steps."
            )
        self.iterator, self.pending = iter(self.source), None
        self.passes += 1

    def _checked(self, item) -> tuple[torch.Tensor, ...]:
        """The batch as the model's arguments: validated, of the first batch's shapes, on the device.

        A list is the batch's arrays, as a ``DataLoader`` collates a dataset of tuples.
        """
        item = tuple(item) if isinstance(item, list) else item
        data = as_data(with_missing(item) if self.missing else item, "batch")
        shapes = [tuple(t.shape[1:]) for t in data]
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise FreqviInputError(f"every batch must have the first batch's shapes per row, {self.shapes}; "
                                   f"got {shapes}.")
        if data[0].shape[0] > self.n:
            raise FreqviInputError(f"a batch has {data[0].shape[0]} rows, more than num_observations = "
                                   f"{self.n}; give the number of observations of the whole data set.")
        return data if self.device is None else tuple(t.to(self.device) for t in data)


def _length(source) -> int:
    """The number of observations behind a stream: ``source.num_observations`` or ``len(source.dataset)``."""
    n = getattr(source, "num_observations", None)
    if n is None and hasattr(source, "dataset"):
        try:
            n = len(source.dataset)
        except TypeError:
            n = None
    if n is None:
        raise FreqviInputError(
            f"the number of observations behind the batches of a {type(source).__name__} is unknown; pass "
            "num_observations= (the plate's sites are scaled by num_observations / batch size)."
        )
    return check_positive_int(n, "num_observations")
