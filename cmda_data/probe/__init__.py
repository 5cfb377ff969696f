"""``cmda probe``: does the teacher matter on *your* data?

Give it one ``.npz`` file (or a mapping) of row-aligned arrays: the student features that
are mixed, the teacher features that guide the mixing and the class labels. It splits the
rows once (stratified, seed 0), then on every seed trains the same small MLP classifier on
the student features with each method, sharing the seed's initialisation and batch order:

* ``base``: cross-entropy on the real batch;
* ``base_matched``: Base with the real rows' loss weight of the augmented methods (under the
  default ``loss_form="sum"`` that is Base itself: recorded as a copy, not retrained);
* ``mixup``: + a Mixup batch (lambda ~ Beta(0.25, 0.25), random partner);
* ``cmda``: + a CMDA batch (:class:`~cmda_data.ContrastiveAligner` trained with Eq. 8 on the
  train rows, an :class:`~cmda_data.EmbeddingBank` with a 2-component GMM on the teacher
  latents, :class:`~cmda_data.CMDACollate`);
* ``random_teacher`` and ``shuffled_teacher``: exactly ``cmda`` with an uninformative
  teacher: random unit latents, or the teacher latents permuted across rows
  (:mod:`cmda_data.controls`).

The result of a run is the held-out accuracy after the *last* epoch (never the best epoch).
``cmda - random_teacher`` (and ``cmda - shuffled_teacher``) on the same seeds is the
*teacher effect*: what the teacher adds beyond mixing with CMDA's machinery
(:func:`cmda_data.stats.compare_methods`).
"""

from __future__ import annotations

from ._data import ProbeData, load_probe_data, split_stratified
from ._probe import DEFAULT_METHODS, METHODS, probe
from ._report import plot_forest, reading, report, verdict

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "ProbeData",
    "load_probe_data",
    "plot_forest",
    "probe",
    "reading",
    "report",
    "split_stratified",
    "verdict",
]
