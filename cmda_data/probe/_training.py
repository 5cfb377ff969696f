"""One probe run: the train/test tensors, the CMDA bank of a seed, one classifier trained on one seed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ..aligners import ContrastiveAligner
from ..augment.collate import CMDACollate
from ..augment.dataset import IndexedDataset
from ..bank._bank import EmbeddingBank
from ..controls import random_teacher, shuffled_teacher
from ..core._seeding import hash_ints
from ..stats import t_ppf
from ._data import ProbeData

#: the CMDA choices (the paper's; ``n_components`` is M of the GMM of Eq. 11)
CMDA_DEFAULTS = {"top_k": None, "p": 1.0, "temperature": None, "self_weight": None, "intra": "soft",
                 "similarity": "abs_cosine", "n_components": 2}
MIXUP_ALPHA = 0.25
_STREAM_LOADER, _STREAM_MIXUP = 0x9B0B_01, 0x9B0B_02


class _ColumnRows(Dataset):
    """Dict samples ``{name: column[i]}`` over equally long tensors."""

    def __init__(self, columns: Mapping[str, torch.Tensor]) -> None:
        self.columns = dict(columns)

    def __len__(self) -> int:
        return len(self.columns["label"])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


@dataclass(frozen=True)
class _Setup:
    x_train: torch.Tensor
    y_train: torch.Tensor
    t_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    epochs: int
    aligner_epochs: int
    batch_size: int
    loss_form: str
    cmda: Dict[str, Any]


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


def _loss(logits: torch.Tensor, targets: List[torch.Tensor], loss_form: str, scale: float) -> torch.Tensor:
    """``sum``: CE(real) + CE(generated), real rows weigh 1 everywhere; ``mean``: one mean over all rows."""
    if loss_form == "mean" or len(targets) == 1:
        return scale * _soft_ce(logits, torch.cat(targets))
    n = len(targets[0])
    return scale * (_soft_ce(logits[:n], targets[0]) + _soft_ce(logits[n:], targets[1]))


def _latent_dim(n_train: int) -> int:
    """The aligner's latent size: 128, or a quarter of the train rows on tiny data."""
    return max(2, min(128, n_train // 4))


def _bank(setup: _Setup, seed: int) -> EmbeddingBank:
    """Offline CMDA on the train rows: the aligner (Eq. 8), then the bank and its GMM."""
    n, d, t = len(setup.y_train), setup.x_train.shape[1], setup.t_train.shape[1]
    dim = _latent_dim(n)
    aligner = ContrastiveAligner({"student": nn.Identity(), "teacher": nn.Identity()}, dim=dim, loss="eq8",
                                 head_hidden=(256,), in_features={"student": d, "teacher": t}, seed=seed)
    columns = {"student": setup.x_train, "teacher": setup.t_train, "label": setup.y_train}
    aligner.fit(columns, epochs=setup.aligner_epochs, batch_size=setup.batch_size, lr=0.01, target="label",
                seed=seed, progress=False)
    m = setup.cmda["n_components"]
    return EmbeddingBank.build(IndexedDataset(_ColumnRows(columns)), aligner, student="student", teachers="teacher",
                               fit_on="teacher", n_components=m, fit_gmm=setup.cmda["intra"] is not None and m != 1,
                               progress=False, random_state=seed, reg_covar=1e-4,
                               covariance_type="full" if n > 5 * dim else "diag")


def _loader(setup: _Setup, seed: int, collate: Optional[CMDACollate] = None) -> DataLoader:
    """The train rows in the seed's order (the same for every method: the collate draws nothing from it)."""
    rows = IndexedDataset(_ColumnRows({"student": setup.x_train, "label": setup.y_train}))
    return DataLoader(rows, batch_size=setup.batch_size, shuffle=True, collate_fn=collate or default_collate,
                      generator=torch.Generator().manual_seed(hash_ints(_STREAM_LOADER, seed) >> 1))


def _train(method: str, seed: int, setup: _Setup, bank: Optional[EmbeddingBank] = None, scale: float = 1.0
           ) -> List[float]:
    """Train one classifier; return the held-out accuracy after every epoch."""
    c = setup.num_classes
    options = {k: v for k, v in setup.cmda.items() if k != "n_components"}
    if options["intra"] is not None and setup.cmda["n_components"] == 1:
        options["intra"] = None
    collate = None if bank is None else CMDACollate(bank, target="label", num_classes=c, seed=seed, keep_real=True,
                                                    **options)
    loader = _loader(setup, seed, collate)
    mix_gen = torch.Generator().manual_seed(hash_ints(_STREAM_MIXUP, seed) >> 1)
    rng = np.random.default_rng(seed)
    curve = []
    with torch.random.fork_rng(devices=[]):  # init and dropout from the seed; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(setup.x_train.shape[1], 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, c))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=setup.epochs)
        for epoch in range(setup.epochs):
            model.train()
            if collate is not None:
                collate.set_epoch(epoch)
            for batch in loader:
                x, y = batch["student"], batch["label"]
                if collate is not None:  # real rows first, then the generated ones (if any)
                    n_real = int((~batch["mix_info"]["mixed"]).sum())
                    inputs, targets = [x[:n_real]], [y[:n_real]]
                    if n_real < len(x):
                        inputs.append(x[n_real:])
                        targets.append(y[n_real:])
                else:
                    inputs, targets = [x], [nn.functional.one_hot(y, c).float()]
                if method == "mixup" and len(x) > 1:
                    lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
                    perm = torch.randperm(len(x), generator=mix_gen)
                    inputs.append(lam * x + (1 - lam) * x[perm])
                    targets.append(lam * targets[0] + (1 - lam) * targets[0][perm])
                loss = _loss(model(torch.cat(inputs)), targets, setup.loss_form, scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            curve.append(_accuracy(model, setup.x_test, setup.y_test))
    return curve


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(1024)])
    return float((pred == y).float().mean())


def _summary(curves: List[List[float]]) -> Dict[str, Any]:
    """The benchmark's method record: last epoch per seed, mean and Student-t 95 % half-width."""
    array = np.asarray(curves, dtype=np.float64)
    half = t_ppf(0.975, len(array) - 1) / math.sqrt(len(array))
    last = array[:, -1]
    return {"mean": float(last.mean()), "ci95": float(half * last.std(ddof=1)), "per_seed": last.tolist(),
            "curve": array.mean(0).tolist(), "curve_ci95": (half * array.std(0, ddof=1)).tolist(),
            "per_seed_curves": array.tolist()}



def _setup(loaded: ProbeData, train: np.ndarray, test: np.ndarray, **settings: Any) -> _Setup:
    """Tensors of the two splits, features z-scored with the train rows' statistics."""
    def zscore(x: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, std = x[train].mean(0), x[train].std(0, ddof=1) + 1e-6
        return torch.from_numpy((x[train] - mean) / std), torch.from_numpy((x[test] - mean) / std)

    (x_train, x_test), (t_train, _) = zscore(loaded.student), zscore(loaded.teacher)
    y = torch.from_numpy(loaded.labels)
    return _Setup(x_train=x_train, y_train=y[train], t_train=t_train, x_test=x_test, y_test=y[test],
                  num_classes=len(loaded.classes), **settings)


def _control_bank(bank: EmbeddingBank, control: Optional[str], seed: int) -> EmbeddingBank:
    """The bank as built (``cmda``) or its uninformative-teacher control."""
    if control is None:
        return bank
    return (random_teacher if control == "random" else shuffled_teacher)(bank, seed=seed)
