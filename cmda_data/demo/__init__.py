"""The ``cmda demo`` job: train an aligner, build a bank, mix, draw the figures, summarise."""

from ._job import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
