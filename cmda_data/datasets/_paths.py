"""Where the real data lives, and the error raised when a file is missing (private).

The data root is, in order of precedence:

1. the ``root=`` argument of a loader (the data set's own folder, e.g. ``.../wikipedia``,
   or the folder that holds it, e.g. ``.../shared/data``);
2. the environment variable ``CMDA_DATA_DIR`` (the folder that holds ``wikipedia/`` and
   ``webnews/``);
3. ``<repo>/../shared/data``, found relative to the repository that holds this package
   (a source checkout; an installed wheel has no such folder, so set the variable).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..exceptions import CMDAError

__all__ = ["ENV_VAR", "DataNotFoundError", "data_root", "dataset_dir", "require_file"]

#: the environment variable that points to the data folder
ENV_VAR = "CMDA_DATA_DIR"

#: the repository root of a source checkout (``cmda_data/datasets/_paths.py`` -> repo)
_REPO_ROOT = Path(__file__).resolve().parents[2]

PathLike = Union[str, "os.PathLike[str]"]


class DataNotFoundError(CMDAError, FileNotFoundError):
    """A data file or folder is missing.

    The message names the missing path and the environment variable ``CMDA_DATA_DIR``
    that points to the data folder. Derives from ``FileNotFoundError`` so
    ``except FileNotFoundError`` (and ``OSError``) keeps working.
    """

    def __str__(self) -> str:  # OSError.__str__ would print "[Errno ...]" for 2-arg forms
        return str(self.args[0]) if self.args else ""


def data_root() -> Path:
    """The folder that holds the data sets: ``$CMDA_DATA_DIR`` or ``<repo>/../shared/data``.

    Returns:
        The path (it may not exist; the loaders check the files they read).

    Examples:
        >>> isinstance(data_root(), Path)
        True
    """
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return _REPO_ROOT.parent / "shared" / "data"


def _hint(name: str) -> str:
    return (f"set the environment variable {ENV_VAR} to the data folder that holds '{name}/' "
            f"(for example shared/data), or pass root= to the loader; see {name}/SOURCE.md "
            f"for where the files come from")


def dataset_dir(name: str, root: Optional[PathLike] = None) -> Path:
    """The folder of data set ``name`` (``"wikipedia"``, ``"webnews"``).

    Args:
        name: the data set's folder name.
        root: the data set's folder itself, or the folder that holds it; ``None`` uses
            :func:`data_root`.

    Returns:
        The folder (existence is checked file by file by :func:`require_file`, so a
        missing root is reported with the first file the loader needs).

    Examples:
        >>> dataset_dir("wikipedia", "/nonexistent").as_posix()
        '/nonexistent'
        >>> dataset_dir("wikipedia").name
        'wikipedia'
    """
    if root is None:
        return data_root() / name
    root = Path(root).expanduser()
    nested = root / name
    return nested if nested.is_dir() else root


def require_file(folder: Path, relative: str, *, dataset: str) -> Path:
    """Return ``folder / relative`` or raise :class:`DataNotFoundError` naming it.

    Args:
        folder: the data set folder (from :func:`dataset_dir`).
        relative: the file's path inside it.
        dataset: the data set's folder name, for the message.

    Raises:
        DataNotFoundError: the file does not exist; the message names the file and
            ``CMDA_DATA_DIR``.

    Examples:
        >>> try:
        ...     require_file(Path("/nonexistent"), "raw_features.mat", dataset="wikipedia")
        ... except DataNotFoundError as error:
        ...     print(str(error).split(";")[0])
        wikipedia data: expected the file /nonexistent/raw_features.mat, got no such file
    """
    path = folder / relative
    if not path.is_file():
        raise DataNotFoundError(
            f"{dataset} data: expected the file {path}, got no such file; {_hint(dataset)}"
        )
    return path
