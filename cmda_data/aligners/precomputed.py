"""PrecomputedAligner: embeddings that ship with the data set, looked up by sample index.

For data sets that already hold one vector per sample and modality (the paper's
"precomputed Wikipedia", CLIP features cached on disk, ...). ``embed(modality, indices)``
returns the L2-normalised rows ``table[indices]``. With ``projection=dim`` a learned linear
map per modality (trained by :meth:`PrecomputedAligner.fit` with Eq. 7/8, exactly like
:class:`ContrastiveAligner` with ``nn.Identity()`` encoders) brings tables of different
widths into one ``dim``-wide space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..core._validation import check_float_tensor, check_int, check_rank, fail
from ..exceptions import ShapeError, ValidationError
from ..io._folders import PathLike, load_folder, save_folder
from .base import Aligner, register_aligner
from .contrastive import ContrastiveAligner

__all__ = ["PrecomputedAligner"]

Indices = Union[int, Sequence[int], torch.Tensor, np.ndarray]


@register_aligner("precomputed")
class PrecomputedAligner(Aligner):
    """Per-sample embedding tables, looked up by data set index.

    Args:
        tables: ``{modality: Tensor[N, d_modality]}`` (or numpy arrays); row ``k`` of every
            table belongs to sample ``k`` of the data set. Stored as buffers (they follow
            ``to(device)`` and are saved), not copied.
        projection: ``None`` (use the rows as they are; all tables must share ``d``) or an
            int ``dim``: a learned linear projection per modality, trained with :meth:`fit`.
        head_hidden: hidden widths of the projection (``()`` = linear; only with ``projection``).
        loss: passed to the inner :class:`ContrastiveAligner`.
        tau: passed to the inner :class:`ContrastiveAligner`.
        seed: passed to the inner :class:`ContrastiveAligner`.
        **kwargs: more :class:`ContrastiveAligner` settings.

    Examples:
        >>> images = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
        >>> texts = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
        >>> aligner = PrecomputedAligner({"image": images, "text": texts})
        >>> aligner.embed("image", [0, 2])
        tensor([[0.6000, 0.8000],
                [0.0000, 1.0000]])
    """

    kind = "precomputed"

    def __init__(self, tables: Mapping[str, Any], projection: Optional[int] = None, *,
                 head_hidden: Sequence[int] = (), loss: str = "eq7", tau: float = 0.5, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(tables, Mapping) or len(tables) < 2:
            fail("tables", "a dict {modality: Tensor[N, d]} with at least 2 modalities", tables)
        self._names: Tuple[str, ...] = tuple(tables)
        rows = None
        for name, table in tables.items():
            if not isinstance(name, str) or not name or "." in name:
                fail("tables", "modality names that are non-empty strings without '.'", name)
            if isinstance(table, np.ndarray):
                table = torch.from_numpy(table)
            check_float_tensor(f"tables[{name!r}]", table)
            check_rank(f"tables[{name!r}]", table, 2)
            if rows is None:
                rows, first = table.shape[0], name
            elif table.shape[0] != rows:
                fail(f"tables[{name!r}]", f"{rows} rows like tables[{first!r}] (one row per sample)",
                     table, ShapeError)
            self.register_buffer(self._buffer(name), table)
        self.projection = check_int("projection", projection, minimum=1, allow_none=True)
        widths = {name: self._table(name).shape[1] for name in self._names}
        if self.projection is None:
            if head_hidden:
                fail("head_hidden", "() unless projection=dim is set", head_hidden)
            if len(set(widths.values())) != 1:
                fail("tables", "rows of one width, or projection=dim to map them to a common width",
                     widths, ShapeError, raw=True)
            self.inner: Optional[ContrastiveAligner] = None
        else:
            self.inner = ContrastiveAligner({name: nn.Identity() for name in self._names}, dim=self.projection,
                                            loss=loss, tau=tau, seed=seed, head_hidden=tuple(head_hidden),
                                            **kwargs)
            for name in self._names:
                table = self._table(name)
                self.inner._build_head(name, table.shape[1], table.device, table.dtype)

    @staticmethod
    def _buffer(name: str) -> str:
        return f"table_{name}"

    def _table(self, name: str) -> torch.Tensor:
        return getattr(self, self._buffer(name))

    # -- protocol ------------------------------------------------------------------------
    @property
    def modalities(self) -> Tuple[str, ...]:
        return self._names

    @property
    def dim(self) -> int:
        return self.projection if self.projection is not None else self._table(self._names[0]).shape[1]

    @property
    def num_samples(self) -> int:
        """``N``, the number of rows of every table."""
        return self._table(self._names[0]).shape[0]

    def indices(self, indices: Indices) -> torch.Tensor:
        """Validate ``indices`` (int, list, numpy or integer tensor) as a LongTensor ``[n]``."""
        n = self.num_samples
        expected = f"data set indices: an int, a list or a 1-D integer tensor with values in [0, {n})"
        if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
            index = torch.tensor([int(indices)])
        elif isinstance(indices, (list, tuple)) and not indices:
            index = torch.empty(0, dtype=torch.long)
        else:
            try:
                index = torch.as_tensor(np.asarray(indices) if isinstance(indices, (list, tuple)) else indices)
            except (TypeError, ValueError, RuntimeError):
                fail("indices", expected, indices)
            if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
                fail("indices", expected, indices)
            if index.ndim == 0:
                index = index.reshape(1)
            if index.ndim != 1:
                fail("indices", expected, indices, ShapeError)
        if index.numel():
            low, high = torch.stack(torch.aminmax(index)).tolist()  # one read-back (a GPU sync)
            if low < 0 or high >= n:
                fail("indices", expected, f"values in [{low}, {high}]", ValidationError, raw=True)
        return index.long()

    def rows(self, modality: str, indices: Indices) -> torch.Tensor:
        """The raw (unnormalised, unprojected) rows ``table[indices]``."""
        self.check_modality(modality)
        table = self._table(modality)
        return table[self.indices(indices).to(table.device)]

    def encode(self, modality: str, batch: Indices) -> torch.Tensor:
        rows = self.rows(modality, batch)
        if self.inner is None:
            return rows
        return self.inner.encode(modality, rows)

    # -- training ------------------------------------------------------------------------
    def fit(self, indices: Optional[Indices] = None, *, labels: Optional[Any] = None, **fit_kwargs: Any
            ) -> List[float]:
        """Train the projection on the rows ``indices`` (default: all); return the history.

        Args:
            indices: the training rows (keep test rows out).
            labels: class of each training row (``[len(indices)]``, or ``[N]`` for all rows)
                for ``loss="eq8"`` / supervised ``"supcon"``.
            **fit_kwargs: :meth:`ContrastiveAligner.fit` settings (epochs, batch_size, lr, ...).
        """
        if self.inner is None:
            fail("projection", "an int dim (PrecomputedAligner.fit trains the projection)", None)
        index = torch.arange(self.num_samples) if indices is None else self.indices(indices)
        data: Dict[str, Any] = {name: self._table(name)[index.to(self._table(name).device)] for name in self._names}
        target = None
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.shape[0] not in (index.shape[0], self.num_samples):
                fail("labels", f"one label per training row ({index.shape[0]}) or per sample ({self.num_samples})",
                     labels, ShapeError)
            if labels.shape[0] != index.shape[0]:
                labels = labels[index]
            target = "__label__"
            data[target] = labels
        return self.inner.fit(data, target=target, **fit_kwargs)

    # -- persistence ---------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        config: Dict[str, Any] = {"aligner": self.kind, "modalities": list(self._names), "projection": self.projection}
        if self.inner is not None:
            inner = self.inner.get_config()
            config.update(head_hidden=inner["head_hidden"][self._names[0]], loss=inner["loss"], tau=inner["tau"],
                          seed=inner["seed"], base_temperature=inner["base_temperature"],
                          normalize_by=inner["normalize_by"])
        return config

    def save(self, path: PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (the tables and the projection)."""
        return save_folder(path, self.get_config(), self.state_dict())

    @classmethod
    def _from_saved(cls, path: PathLike, config: Dict[str, Any], *, device: Any = None) -> "PrecomputedAligner":
        config, tensors = load_folder(path)
        tables = {}
        for name in config["modalities"]:
            key = cls._buffer(name)
            if key not in tensors:
                fail(f"load({str(path)!r})", f"the table of modality {name!r}", sorted(tensors), ValidationError)
            tables[name] = tensors[key]
        kwargs = {}
        if config["projection"] is not None:
            kwargs = {k: config[k] for k in ("head_hidden", "loss", "tau", "seed", "base_temperature", "normalize_by")}
        aligner = cls(tables, config["projection"], **kwargs)
        return aligner._restore(tensors, path, strict=True, expected="weights matching the saved configuration",
                                device=device)
