"""Data and CMDA wiring shared by the task benchmarks (private to ``benchmarks/``).

* :func:`load_features`: the real paired features of a data set, z-scored with train
  statistics (an affine map, so convex mixing commutes with it).
* :class:`MixConfig`: the open choices of CMDA (top-k, p, temperature, self weight, M, intra
  form). :data:`FAITHFUL` is the paper's configuration.
* :func:`fit_offline_aligner`, :func:`build_bank`, :class:`RealAndMixed`: offline CMDA with the
  library's entry points (ContrastiveAligner.fit -> EmbeddingBank -> CMDACollate).
* :func:`make_augment`, :func:`refit_gmm`: online CMDA (CMDAugment over the aligner trained
  jointly with the task, GMM refitted on the current latents every epoch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from cmda_data.aligners import ContrastiveAligner
from cmda_data.augment.collate import CMDACollate
from cmda_data.augment.module import CMDAugment
from cmda_data.bank import EmbeddingBank
from cmda_data.controls import random_teacher, shuffled_teacher
from cmda_data.core.mixture import GaussianMixture
from cmda_data.datasets import load_webnews, load_wikipedia

DATASETS = ("wikipedia", "webnews")
STUDENTS = ("image", "text")
FEATURE_NAMES = {"wikipedia": {"image": "SIFT-128 BoVW", "text": "all-MiniLM-L6-v2 (384)"},
                 "webnews": {"image": "EfficientNet-Lite0 (1280)", "text": "multilingual-e5-small (384)"}}
LATENT_DIM = 128
HEAD_HIDDEN = (256,)  # CPU-sized heads (the paper's are 2048 / 4096x2); see the README


def other(student: str) -> str:
    return "text" if student == "image" else "image"


class ColumnDataset(Dataset):
    """Dict samples ``{name: column[i]}`` over equally long tensors."""

    def __init__(self, columns: Mapping[str, torch.Tensor]) -> None:
        self.columns = dict(columns)
        self.n = len(next(iter(self.columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {k: (v[i] if v[i].ndim else int(v[i])) for k, v in self.columns.items()}


#: Wikipedia's text features, weakest to strongest teacher (logistic regression: 67 / 81 / 85 %)
TEXT_FEATURES = {"lda10": "LDA-10 topic proportions", "lda50": "LDA-50 topic proportions",
                 "minilm384": "all-MiniLM-L6-v2 (384)"}


def text_features_name(dataset: str, text_features: str = "default") -> str:
    """The Wikipedia text features a run uses (``"default"``: MiniLM); Web News has one kind."""
    if dataset != "wikipedia":
        return "default"
    return "minilm384" if text_features == "default" else text_features


def feature_name(dataset: str, modality: str, text_features: str = "default") -> str:
    if dataset == "wikipedia" and modality == "text":
        return TEXT_FEATURES[text_features_name(dataset, text_features)]
    return FEATURE_NAMES[dataset][modality]


def load_table(dataset: str, text_features: str = "default"):
    """The full table (train rows then test rows) of ``dataset`` as features."""
    if dataset == "wikipedia":
        return load_wikipedia(split="all", text_features=text_features_name(dataset, text_features))
    if text_features != "default":
        raise SystemExit(f"--text-features: expected default for {dataset} (it has one text feature), "
                         f"got {text_features!r}")
    if dataset == "webnews":
        return load_webnews(split="all", image="features", captions=False)
    raise SystemExit(f"--dataset: expected one of {DATASETS}, got {dataset!r}")


def zscore(train: torch.Tensor, *others: torch.Tensor) -> tuple:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True) + 1e-6
    return tuple((x - mean) / std for x in (train, *others))


def columns(table: Any, rows: Sequence[int], stats_rows: Sequence[int]) -> Dict[str, torch.Tensor]:
    """``{"image", "text", "label"}`` of ``rows``, features z-scored with ``stats_rows``' statistics."""
    rows_t, stats_t = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(stats_rows, dtype=torch.long)
    out = {}
    for modality in STUDENTS:
        full = table.features(modality).float()
        out[modality] = zscore(full[stats_t], full[rows_t])[1].contiguous()
    out["label"] = table.labels[rows_t].clone()
    return out


@dataclass(frozen=True)
class MixConfig:
    """The CMDA choices the paper leaves open (defaults = the paper's / faithful)."""

    top_k: Optional[int] = None        # None: the whole batch (paper)
    p: float = 1.0                     # share of generated samples (paper: B new per batch)
    temperature: Optional[float] = None
    self_weight: Optional[float] = None
    intra: Optional[str] = "soft"      # Eq. 11
    n_components: Optional[int] = 2    # M (paper: 2 by BIC); None: BIC over 1..6 (offline)
    similarity: str = "abs_cosine"

    def options(self) -> Dict[str, Any]:
        """Keyword arguments of CMDACollate / CMDAugment."""
        return {"top_k": self.top_k, "p": self.p, "temperature": self.temperature,
                "self_weight": self.self_weight, "intra": self.intra if self.n_components != 1 else None,
                "similarity": self.similarity}

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(FAITHFUL, k)]
        return "faithful" if not parts else ",".join(parts)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


FAITHFUL = MixConfig()
#: the grid studied on the validation split (one change from the faithful configuration each)
STUDY_GRID = (FAITHFUL, replace(FAITHFUL, top_k=2), replace(FAITHFUL, top_k=8), replace(FAITHFUL, temperature=0.05),
              replace(FAITHFUL, self_weight=10.0), replace(FAITHFUL, p=0.5), replace(FAITHFUL, n_components=1),
              replace(FAITHFUL, top_k=2, temperature=0.05))


def make_aligner(student: str, student_encoder: nn.Module, student_width: int, teacher_width: int,
                 *, loss: str, seed: int, teacher_encoder: Optional[nn.Module] = None) -> ContrastiveAligner:
    """A ContrastiveAligner whose student encoder is ``student_encoder`` (shared with the task)."""
    teacher = other(student)
    return ContrastiveAligner({student: student_encoder, teacher: teacher_encoder or nn.Identity()},
                              dim=LATENT_DIM, loss=loss, head_hidden=HEAD_HIDDEN, seed=seed,
                              in_features={student: student_width, teacher: teacher_width})


def fit_offline_aligner(train: Mapping[str, torch.Tensor], student: str, *, loss: str, epochs: int, seed: int,
                        progress: bool = False) -> ContrastiveAligner:
    """Offline CMDA step 1: learn the latent space on the train pairs (Eq. 8 or Eq. 7)."""
    aligner = make_aligner(student, nn.Identity(), int(train[student].shape[1]),
                           int(train[other(student)].shape[1]), loss=loss, seed=seed)
    data = {"image": train["image"], "text": train["text"], "label": train["label"]}
    aligner.fit(data, epochs=epochs, batch_size=128, lr=0.01, target="label" if loss == "eq8" else None,
                seed=seed, progress=progress)
    return aligner


def build_bank(aligner: Any, dataset: Dataset, student: str, cfg: MixConfig, seed: int) -> EmbeddingBank:
    """Offline CMDA step 2: embed every train sample; GMM on the language latents (paper IV-C)."""
    return EmbeddingBank.build(dataset, aligner, student=student, teachers=other(student), fit_on="text",
                               n_components=cfg.n_components, fit_gmm=cfg.intra is not None and cfg.n_components != 1,
                               progress=False, random_state=seed, covariance_type="full", reg_covar=1e-4)


class RealAndMixed:
    """collate_fn giving ``(real_batch, generated_batch)``: the paper adds B generated samples
    to the B real ones, so CMDACollate runs with ``p`` and the real batch is kept beside it.

    With more collates (other seeds: independent draws) the second item is the list of their
    generated batches.
    """

    def __init__(self, cmda_collate: CMDACollate, *more: CMDACollate) -> None:
        self.cmda = cmda_collate
        self.more = more

    def set_epoch(self, epoch: int) -> None:
        for collate in (self.cmda, *self.more):
            collate.set_epoch(epoch)

    def __call__(self, samples: Sequence[Any]) -> tuple:
        if not self.more:
            return default_collate(list(samples)), self.cmda(samples)
        return default_collate(list(samples)), [c(samples) for c in (self.cmda, *self.more)]


def make_collate(bank: EmbeddingBank, cfg: MixConfig, *, num_classes: Optional[int], seed: int,
                 target: Optional[str] = "label") -> CMDACollate:
    return CMDACollate(bank, target=target, num_classes=num_classes, seed=seed, **cfg.options())


def refit_gmm(aligner: Any, teacher_text: torch.Tensor, cfg: MixConfig, seed: int, device: Any) -> Optional[Any]:
    """Online CMDA: the GMM of Eq. 11 on the current language latents of the whole train set."""
    if cfg.intra is None or cfg.n_components == 1:
        return None
    with torch.no_grad():
        z = torch.cat([aligner.embed("text", chunk.to(device)) for chunk in teacher_text.split(512)])
    cov = "full" if z.shape[0] > 5 * z.shape[1] else "diag"
    return GaussianMixture(cfg.n_components or 2, covariance_type=cov, reg_covar=1e-4, random_state=seed).fit(z)


def make_augment(aligner: Any, student: str, cfg: MixConfig, *, num_classes: Optional[int], seed: int,
                 target: Optional[str] = "label") -> CMDAugment:
    """Online CMDA: weights from the aligner's current latents, GMM set by :func:`refit_gmm`."""
    options = cfg.options()
    return CMDAugment(aligner=aligner, student=student, teachers=other(student), target=target, num_classes=num_classes,
                      fit_on="text", seed=seed, **options)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


# ------------------------------------------------------------------------------------ controls
#: teacher controls and the method whose pipeline each one copies (the teacher effect is the
#: method minus its control, on the same seeds)
TEACHER_CONTROLS = {"random_teacher": "cmda", "shuffled_teacher": "cmda",
                    "random_teacher_offline": "cmda_offline", "shuffled_teacher_offline": "cmda_offline"}
LOSS_FORMS = ("sum", "mean")


def method_parts(method: str) -> tuple:
    """``(pipeline, control)`` of a method name: pipeline ``"none"`` (base, base_matched,
    mixup), ``"align"``, ``"online"`` (cmda, its controls) or ``"offline"`` (cmda_offline,
    its controls); control None, ``"random"`` or ``"shuffled"``.

    Examples:
        >>> method_parts("random_teacher_offline"), method_parts("cmda_tuned"), method_parts("mixup")
        (('offline', 'random'), ('online', None), ('none', None))
    """
    name = method.replace("_tuned", "")
    control = "random" if name.startswith("random_teacher") else "shuffled" if name.startswith("shuffled_teacher") \
        else None
    if name == "align":
        return "align", None
    if name.endswith("_offline"):
        return "offline", control
    if name == "cmda" or control is not None:
        return "online", control
    return "none", None


def control_bank(bank: EmbeddingBank, control: Optional[str], seed: int) -> EmbeddingBank:
    """The bank of an offline method: as built, or its uninformative-teacher control."""
    if control is None:
        return bank
    return (random_teacher if control == "random" else shuffled_teacher)(bank, seed=seed)


def control_aligner(aligner: Any, control: Optional[str], student: str, seed: int) -> Any:
    """The aligner the online mixing sees: the trained one, or a wrapper with a useless teacher."""
    if control is None:
        return aligner
    return (random_teacher if control == "random" else shuffled_teacher)(aligner, teachers=other(student), seed=seed)


def task_loss(logits: torch.Tensor, targets: Sequence[torch.Tensor], *, loss_form: str = "sum",
              gen_weight: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """The classification loss over the real rows (``targets[0]``) and the generated ones.

    ``"sum"``: ``CE(real) + gen_weight * sum CE(generated rows) / B``: the real rows weigh 1 in
    every method, and each generated row ``gen_weight`` times a real row (for the B generated
    rows of ``p = 1``: ``gen_weight * CE(generated)``; the official code adds them in a
    second step at weight 1).
    ``"mean"``: one mean over all rows (the real rows then weigh ``B / (B + G)``).
    ``scale`` multiplies the whole loss (``base_matched`` under ``"mean"``).
    """
    if loss_form == "mean" or len(targets) == 1:
        return scale * soft_cross_entropy(logits, torch.cat(list(targets)))
    n = len(targets[0])
    real = soft_cross_entropy(logits[:n], targets[0])
    generated = torch.cat(list(targets[1:]))
    per_row = -(generated * torch.log_softmax(logits[n:], dim=1)).sum(1)
    # each generated row weighs gen_weight times a real row (B generated rows: gen_weight * their mean)
    return scale * (real + gen_weight * per_row.sum() / n)


def matched_scale(loss_form: str, cfg: MixConfig) -> float:
    """The weight of the real rows in the augmented methods, relative to Base.

    ``"sum"``: 1 (``base_matched`` is Base). ``"mean"``: a batch of B real rows gets
    ``p * B`` generated rows (Mixup and CMDA at ``p = 1``: B), so each real row weighs
    ``1 / (1 + p)`` of what it weighs in Base.
    """
    return 1.0 if loss_form == "sum" else 1.0 / (1.0 + cfg.p)
