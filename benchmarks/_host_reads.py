"""A development aid: count the host's reads of tensor values (each one a GPU synchronisation).

``bool(t)``, ``int(t)``, ``float(t)``, ``t.item()`` and ``t.tolist()`` make the host wait for
the device on a GPU. The entry points keep these few per batch; the tests and
``benchmarks/bench_online.py`` count them with :class:`HostReads` (on any device, the CPU too).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["HostReads"]


class HostReads:
    """Context manager counting reads of tensor values by the host while it is active.

    Examples:
        >>> with HostReads() as reads:
        ...     _ = bool(torch.tensor(1.0) > 0), torch.arange(3).tolist()
        >>> reads.count
        2
    """

    NAMES = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")

    def __enter__(self) -> "HostReads":
        self.count = 0
        self._saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def counting(original: Callable[..., Any]) -> Callable[..., Any]:
            def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                self.count += 1
                return original(tensor, *args, **kwargs)
            return read

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, counting(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
