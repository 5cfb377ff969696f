"""The disk-backed bank build (private): ``EmbeddingBank.build(..., out=folder)``.

The in-memory build holds every modality's ``[N, d]`` table at once (two tables of 2 GB for a
bank of 1M x 512 rows with an image and a text modality). This one writes the bank straight to
``out`` in the format of :meth:`~cmda_data.EmbeddingBank.save`, holding one batch at a time:

1. each batch's embeddings are appended to one raw float32 file per modality (plain file
   writes: the pages go to the page cache, not to the process);
2. the PCA, the choice of M and the EM fit read their subsample (``max_fit_rows`` rows, the
   rows :func:`~cmda_data.bank._fit.fit_subsample` draws from ``random_state``) from the file
   of the ``fit_on`` modality;
3. the responsibilities are computed in the chunks of the in-memory pass, each chunk read from
   that file, and appended to a raw file;
4. ``bank.safetensors`` is assembled from the raw files block by block (its SHA-256 computed on
   the way), then ``bank.json``; the result is byte for byte the folder that ``build`` +
   ``save`` writes with the same arguments.

Everything is written into a hidden temporary folder inside ``out`` (so on the file system of
``out``, which may be a mount point), whose files replace the bank files of ``out`` only when
complete; on any error (or Ctrl-C) the temporary folder and the folders the build created are
removed and ``out`` is left as it was. A hard kill (SIGKILL, the OOM killer) leaves the hidden
``.<name>.*.partial`` folder to delete by hand. The bank returned is ``EmbeddingBank.load(out)``
(memory-mapped).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core._validation import describe, fail
from ..exceptions import ShapeError, ValidationError
from ..io._safetensors import RawFile
from ..options import resolve_fit_on
from ._build import embedded_chunks
from ._checks import check_roles, count_non_finite
from ._fit import fit_model, pca_project, responsibility_chunks
from ._format import CONFIG_NAME, TENSORS_NAME, bank_contents, write_bank

__all__ = ["build_to_folder", "check_out"]


def check_out(out: Any, overwrite: Any) -> Path:
    """The bank folder ``out``: a folder (or a new path) holding no saved bank unless ``overwrite``."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        fail("out", "a folder path (str or pathlib.Path)", out)
    if not isinstance(overwrite, bool):
        fail("overwrite", "True or False", overwrite)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        fail("out", "a folder for the bank (or a path that does not exist yet)", f"{str(folder)!r}, a file", raw=True)
    held = [name for name in (CONFIG_NAME, TENSORS_NAME) if (folder / name).exists()]
    if held and not overwrite:
        fail("out", "a folder without a saved bank (pass overwrite=True to replace it)",
             f"{str(folder)!r}, which holds {', '.join(held)}", raw=True)
    return folder


def build_to_folder(dataset: Any, aligner: Any, *, student: str, teachers: Union[str, Sequence[str]], out: Any,
                    overwrite: bool, fields: Optional[Mapping[str, Union[str, int]]], batch_size: int,
                    device: Optional[Union[str, torch.device]], progress: bool, indices: Optional[Iterable[int]],
                    options: Dict[str, Any]) -> Path:
    """Embed, fit and write the bank into ``out`` (see the module docstring); returns the folder.

    ``options``: every fit option of :meth:`EmbeddingBank.from_embeddings`, defaults filled in
    and checked (:func:`~cmda_data.bank._bank.fit_settings`).
    """
    folder = check_out(out, overwrite)
    settings = dict(options)
    roles = [student] + ([teachers] if isinstance(teachers, str) else list(teachers))
    modalities = list(dict.fromkeys(roles))
    student, teachers = check_roles(dict.fromkeys(modalities), student, teachers)
    fit_on = resolve_fit_on(settings.pop("fit_on"), student, teachers, tuple(modalities))
    chunks, chosen, _ = embedded_chunks(dataset, aligner, modalities, fields=fields, batch_size=batch_size,
                                        device=device, progress=progress, indices=indices)
    created: List[Path] = []
    work = None
    try:
        _make_folders(folder, created)
        # inside out: the same file system as the bank files it replaces (out may be a mount point)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder))
        raw = {m: work / f"embeddings.{i}.f32" for i, m in enumerate(modalities)}
        rows, dim = _write_embeddings(chunks, raw)
        metadata: Dict[str, Any] = {"fit_on": fit_on}
        embeddings = {m: RawFile(raw[m], torch.float32, (rows, dim)) for m in modalities}
        gmm = pca = responsibilities = None
        if settings.pop("fit_gmm"):
            fitted = fit_model(lambda r: read_rows(raw[fit_on], r, rows, dim), (rows, dim), field=fit_on,
                               progress=progress, **settings)
            gmm, pca = fitted.gmm, fitted.pca
            metadata.update(fitted.metadata)
            resp = work / "responsibilities.f32"
            write_responsibilities(gmm, pca, raw[fit_on], resp, rows, dim, progress=progress)
            responsibilities = RawFile(resp, torch.float32, (rows, int(gmm.n_components)))
        indices = None if chosen is None or chosen == list(range(rows)) else torch.tensor(chosen, dtype=torch.long)
        config, tensors = bank_contents(embeddings=embeddings, responsibilities=responsibilities, indices=indices,
                                        pca=pca, gmm=gmm, student=student, teachers=list(teachers), metadata=metadata)
        write_bank(work, config, tensors, progress=progress)
        for path in list(raw.values()) + [work / "responsibilities.f32"]:
            path.unlink(missing_ok=True)
        _move_into_place(work, folder)
    except BaseException:
        if work is not None and not any((work / f"old.{name}").exists() for name in _BANK_FILES):
            shutil.rmtree(work, ignore_errors=True)  # (kept if the old bank could not be put back)
        for made in created:
            try:
                made.rmdir()
            except OSError:  # someone else put something there meanwhile
                break
        raise
    return folder


#: the files of a saved bank, in the order they are moved aside (``bank.json`` first) when replaced
_BANK_FILES = (CONFIG_NAME, TENSORS_NAME)


def _make_folders(folder: Path, created: List[Path]) -> None:
    """Create ``folder`` and its missing ancestors (with the usual permissions, unlike the private
    temporary folder); each one made is put first in ``created`` (so it lists them deepest first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        created.insert(0, path)


def _move_into_place(work: Path, folder: Path) -> None:
    """Move the bank files of ``work`` (a folder inside ``folder``) into ``folder``; remove ``work``.

    A bank already there is first moved aside into ``work``, ``bank.json`` first, and the new
    files moved in, ``bank.json`` last: at no point does ``folder`` hold a ``bank.json`` beside a
    ``bank.safetensors`` it does not describe. If a move fails, the moves done are undone (the
    old bank is back) and the error raised.
    """
    done: List[Tuple[Path, Path]] = []
    try:
        for name in _BANK_FILES:
            if (folder / name).exists():
                os.replace(folder / name, work / f"old.{name}")
                done.append((folder / name, work / f"old.{name}"))
        for name in reversed(_BANK_FILES):
            os.replace(work / name, folder / name)
            done.append((work / name, folder / name))
    except BaseException:
        for source, target in reversed(done):
            os.replace(target, source)
        raise
    for name in _BANK_FILES:
        (work / f"old.{name}").unlink(missing_ok=True)
    work.rmdir()


def _write_embeddings(chunks: Iterable[Tuple[int, Dict[str, torch.Tensor]]], raw: Mapping[str, Path]
                      ) -> Tuple[int, int]:
    """Append each batch of each modality to its raw file; return ``(rows, d)``."""
    rows, dim = 0, None
    handles = {m: open(path, "wb") for m, path in raw.items()}
    try:
        for count, batch in chunks:
            for modality, z in batch.items():
                name = f"embeddings[{modality!r}]"
                if dim is None:
                    dim = z.shape[1]
                elif z.shape[1] != dim:
                    fail(name, f"[N, {dim}] like the other modalities (one latent space)", f"[N, {z.shape[1]}]",
                         ShapeError, raw=True)
                bad = count_non_finite(z)
                if bad:
                    fail(name, "finite values (no NaN or inf)",
                         f"{bad} non-finite entries in {describe(z)} (rows {rows}..{rows + count - 1})", raw=True)
                handles[modality].write(np.ascontiguousarray(z.numpy()))
            rows += count
    finally:
        for handle in handles.values():
            handle.close()
    if not rows:
        fail("dataset", "at least one sample", "an empty stream", raw=True)
    return rows, dim


def _read_exactly(handle: Any, view: memoryview, offset: int) -> None:
    handle.seek(offset)
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            fail(str(handle.name), f"{offset + len(view)} bytes", f"a file that ends at {offset + done}",
                 ValidationError, raw=True)
        done += count


def read_rows(path: Path, rows: Optional[torch.Tensor], n: int, dim: int) -> torch.Tensor:
    """Rows ``rows`` (sorted indices; None: all ``n``) of the raw ``[n, dim]`` float32 file ``path``."""
    if rows is None:
        return torch.from_numpy(np.fromfile(path, dtype="<f4", count=n * dim).reshape(n, dim))
    out = np.empty((len(rows), dim), dtype=np.float32)
    view = memoryview(out).cast("B")
    width = dim * 4
    with open(path, "rb", buffering=0) as handle:
        for i, row in enumerate(rows.tolist()):
            _read_exactly(handle, view[i * width:(i + 1) * width], row * width)
    return torch.from_numpy(out)


def write_responsibilities(gmm: Any, pca: Optional[Tuple[torch.Tensor, torch.Tensor]], source: Path, target: Path,
                           n: int, dim: int, *, progress: bool = False) -> None:
    """``gmm.predict_proba`` of every row of ``source`` into the raw float32 ``[n, M]`` file ``target``.

    The chunks are those of :func:`~cmda_data.bank._fit.responsibilities` (so the values are
    the in-memory build's), each read from the file into one reused buffer.
    """
    buffer = np.empty((0, dim), dtype=np.float32)  # sized by the first (largest) chunk
    with open(source, "rb", buffering=0) as handle, open(target, "wb") as sink:

        def read(start: int, stop: int) -> torch.Tensor:
            nonlocal buffer
            if len(buffer) < stop - start:
                buffer = np.empty((stop - start, dim), dtype=np.float32)
            chunk = buffer[:stop - start]
            _read_exactly(handle, memoryview(chunk).cast("B"), start * dim * 4)
            x = torch.from_numpy(chunk)
            return x if pca is None else pca_project(x, pca)

        for _, probs in responsibility_chunks(gmm, read, n, progress=progress):
            sink.write(np.ascontiguousarray(probs.numpy()))
