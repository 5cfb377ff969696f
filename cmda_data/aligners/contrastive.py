"""ContrastiveAligner: the paper's own latent space (encoders + projection heads + Eq. 7/8).

Each modality has an encoder (any ``nn.Module``: a torchvision backbone, an MLP over
precomputed features, ``nn.Identity()``) followed by a projection head. The default
heads are the paper's (Sec. IV-A): ``Linear(in, 2048)-ReLU-Linear(2048, dim)`` for vision
and ``Linear(in, 4096)-ReLU-Linear(4096, 4096)-ReLU-Linear(4096, dim)`` for language. A
head sizes itself from the encoder output on the first batch (a dry run), so the user never
states feature widths; pass ``in_features`` to build the heads at once.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core import losses
from ..core._kernels import autocast_enabled
from ..core._validation import check_int, check_option, check_positive_float, fail
from ..exceptions import ShapeError, ValidationError
from ..io._folders import PathLike, load_folder, save_folder
from . import _training
from ._encoders import build_encoder, describable_names, describe_encoder
from .base import Aligner, register_aligner

__all__ = ["ContrastiveAligner", "PAPER_HEAD_HIDDEN", "default_head_hidden"]

#: hidden widths of the paper's projection heads (Sec. IV-A), before the final ``dim`` layer
PAPER_HEAD_HIDDEN = {"vision": (2048,), "language": (4096, 4096)}
_LANGUAGE_HINTS = ("text", "txt", "caption", "language", "lang", "sentence", "word", "token", "doc", "audio")

LOSSES = ("eq7", "eq8", "supcon")

HeadHidden = Union[None, Sequence[int], Mapping[str, Sequence[int]]]


def default_head_hidden(modality: str) -> Tuple[int, ...]:
    """The paper's hidden widths for ``modality``: language-like names get (4096, 4096).

    Examples:
        >>> default_head_hidden("caption"), default_head_hidden("image")
        ((4096, 4096), (2048,))
    """
    name = modality.lower()
    kind = "language" if any(hint in name for hint in _LANGUAGE_HINTS) else "vision"
    return PAPER_HEAD_HIDDEN[kind]


def _hidden_tuple(name: str, value: Any) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        fail(name, "a sequence of hidden widths such as (2048,) or ()", value)
    return tuple(check_int(f"{name}[{k}]", width, minimum=1) for k, width in enumerate(value))


def _as_features(modality: str, output: Any) -> torch.Tensor:
    """Encoder output -> ``[n, f]`` floating features (tuples: first item; >2-D: flattened)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        fail(f"encoders[{modality!r}] output", "a floating-point [n, features] tensor", output)
    if output.ndim < 2:
        fail(f"encoders[{modality!r}] output", "a [n, features] tensor (batch first)", output, ShapeError)
    return output.flatten(1) if output.ndim > 2 else output


def _linear(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from ``generator`` (not the global RNG)."""
    layer = nn.Linear(in_features, out_features, device="meta").to_empty(device="cpu")
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


@register_aligner("contrastive")
class ContrastiveAligner(Aligner):
    """Encoders + projection heads trained with the paper's contrastive losses.

    Args:
        encoders: ``{modality: nn.Module}``; each maps a batch of that modality to
            ``[n, features]`` (more dims are flattened). ``nn.Identity()`` for features.
        dim: width of the common latent space (128 in the paper).
        loss: ``"eq7"`` (unsupervised, Eq. 7), ``"eq8"`` (supervised, Eq. 8; ``fit``
            needs ``target``) or ``"supcon"`` (the official code's SupCon / NT-Xent).
        tau: temperature of the loss.
        base_temperature: SupCon scale ``tau / base_temperature`` (``loss="supcon"`` only).
        normalize_by: Eq. 8 normaliser, see :func:`cmda_data.core.losses.eq8_loss`.
        head_hidden: hidden widths of the heads: ``None`` (paper defaults chosen from the
            modality name, see :func:`default_head_hidden`), one sequence for every
            modality, or ``{modality: widths}`` (missing ones get the default). ``()``
            gives a single linear projection.
        heads: ``{modality: nn.Module}`` custom heads mapping features to ``[n, dim]``
            (replace the MLP for those modalities).
        in_features: ``{modality: int}`` encoder output widths; builds the heads now
            instead of on the first batch.
        seed: seed of the head initialisation and of the default shuffling in ``fit``.

    Examples:
        >>> aligner = ContrastiveAligner({"image": nn.Identity(), "text": nn.Identity()}, dim=4,
        ...                              head_hidden=(8,), in_features={"image": 6, "text": 5})
        >>> g = torch.Generator().manual_seed(0)
        >>> data = {"image": torch.randn(32, 6, generator=g), "text": torch.randn(32, 5, generator=g)}
        >>> history = aligner.fit(data, epochs=2, batch_size=16, progress=False)
        >>> len(history), aligner.embed("image", data["image"][:3]).shape
        (2, torch.Size([3, 4]))
    """

    kind = "contrastive"

    def __init__(self, encoders: Mapping[str, nn.Module], dim: int = 128, *, loss: str = "eq7",
                 tau: float = 0.5, base_temperature: Optional[float] = 0.07, normalize_by: str = "paper",
                 head_hidden: HeadHidden = None, heads: Optional[Mapping[str, nn.Module]] = None,
                 in_features: Optional[Mapping[str, int]] = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(encoders, Mapping) or len(encoders) < 2:
            fail("encoders", "a dict {modality: nn.Module} with at least 2 modalities", encoders)
        self._dim = check_int("dim", dim, minimum=1)
        self.loss = check_option("loss", loss, LOSSES)
        self.tau = check_positive_float("tau", tau)
        self.base_temperature = check_positive_float("base_temperature", base_temperature, allow_none=True)
        self.normalize_by = check_option("normalize_by", normalize_by, ("paper", "positives"))
        self.seed = check_int("seed", seed, minimum=0)
        self.encoders = nn.ModuleDict()
        for name, encoder in encoders.items():
            if not isinstance(name, str) or not name or "." in name:
                fail("encoders", "modality names that are non-empty strings without '.'", name)
            if not isinstance(encoder, nn.Module):
                fail(f"encoders[{name!r}]", "an nn.Module (wrap functions in a module; nn.Identity() for "
                     "features)", encoder)
            try:
                self.encoders[name] = encoder
            except KeyError as error:
                fail("encoders", f"a modality name usable as a module key ({error})", name)
        self._modalities = tuple(self.encoders.keys())
        self.head_hidden = self._resolve_hidden(head_hidden)
        self.heads = nn.ModuleDict()
        self._custom_heads = set()
        for name, head in (heads or {}).items():
            self.check_modality(name)
            if not isinstance(head, nn.Module):
                fail(f"heads[{name!r}]", "an nn.Module mapping features to [n, dim]", head)
            self.heads[name] = head
            self._custom_heads.add(name)
        self.in_features: Dict[str, Optional[int]] = {m: None for m in self._modalities}
        for name, width in (in_features or {}).items():
            self.check_modality(name)
            self._build_head(name, check_int(f"in_features[{name!r}]", width, minimum=1))
        self.history_: List[float] = []

    # -- protocol ------------------------------------------------------------------------
    @property
    def modalities(self) -> Tuple[str, ...]:
        return self._modalities

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, modality: str, batch: Any) -> torch.Tensor:
        device = self._first_device()
        if device is not None:  # like the CLIP and precomputed aligners: inputs go where the weights are
            batch = _training.move_to(batch, device)
        features = _as_features(modality, self.encoders[modality](batch))
        if modality not in self.heads:
            dtype = features.dtype
            if dtype in (torch.float16, torch.bfloat16) and autocast_enabled(features.device.type):
                dtype = torch.float32  # autocast computes in low precision; the weights stay float32
            self._build_head(modality, features.shape[1], features.device, dtype)
        expected = self.in_features.get(modality)
        if expected is not None and features.shape[1] != expected:
            fail(f"encoders[{modality!r}] output", f"{expected} features (the head was built for them)",
                 features, ShapeError)
        return self.heads[modality](features)

    # -- heads ---------------------------------------------------------------------------
    def _resolve_hidden(self, head_hidden: HeadHidden) -> Dict[str, Tuple[int, ...]]:
        hidden = {m: default_head_hidden(m) for m in self._modalities}
        if head_hidden is None:
            return hidden
        if isinstance(head_hidden, Mapping):
            for name, widths in head_hidden.items():
                self.check_modality(name)
                hidden[name] = _hidden_tuple(f"head_hidden[{name!r}]", widths)
            return hidden
        widths = _hidden_tuple("head_hidden", head_hidden)
        return {m: widths for m in self._modalities}

    def _build_head(self, modality: str, in_features: int, device: Any = None, dtype: Any = None) -> None:
        self.in_features[modality] = int(in_features)
        if modality in self._custom_heads:
            return
        generator = torch.Generator().manual_seed(self.seed * 1000 + self._modalities.index(modality))
        widths = (int(in_features), *self.head_hidden[modality], self._dim)
        layers: List[nn.Module] = []
        for k in range(len(widths) - 1):
            if k:
                layers.append(nn.ReLU())
            layers.append(_linear(widths[k], widths[k + 1], generator))
        head = nn.Sequential(*layers)
        self.heads[modality] = head.to(device=device, dtype=dtype if dtype is not None else torch.float32)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of a trained aligner loads into a fresh one whose heads size themselves:
        # build each missing head from the width of its first layer's saved weight
        for modality in self._modalities:
            weight = state_dict.get(f"{prefix}heads.{modality}.0.weight")
            if modality not in self.heads and modality not in self._custom_heads \
                    and isinstance(weight, torch.Tensor) and weight.ndim == 2:
                self._build_head(modality, weight.shape[1], self._first_device(), weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def built(self) -> bool:
        """Whether every head exists (after ``in_features``, a first batch or :meth:`build`)."""
        return all(m in self.heads for m in self._modalities)

    def build(self, batch: Mapping[str, Any], fields: Optional[Mapping[str, str]] = None) -> "ContrastiveAligner":
        """Create the missing heads from one batch (a dry run in eval mode, no gradient).

        Call it before making your own optimizer when the heads size themselves.
        """
        fields = self._resolve_fields(fields)
        batch = _training.check_batch(batch, fields, None)
        for modality in self._modalities:
            if modality not in self.heads:
                self.embed(modality, batch[fields[modality]])
        return self

    # -- losses --------------------------------------------------------------------------
    def _resolve_fields(self, fields: Optional[Mapping[str, str]]) -> Dict[str, str]:
        resolved = {m: m for m in self._modalities}
        if fields is not None:
            if not isinstance(fields, Mapping):
                fail("fields", "a dict {modality: sample field}", fields)
            for name, field in fields.items():
                self.check_modality(name)
                resolved[name] = field
        return resolved

    def _check_target(self, target: Optional[str]) -> None:
        if self.loss == "eq8" and target is None:
            fail("target", "the name of the label field (loss='eq8' is supervised)", target)
        if self.loss == "eq7" and target is not None:
            fail("target", "None for loss='eq7' (unsupervised; use loss='eq8' to use labels)", target)

    def criterion(self, latents: Mapping[str, torch.Tensor], labels: Optional[torch.Tensor] = None, *,
                  reduction: str = "mean") -> torch.Tensor:
        """The configured loss (Eq. 7, Eq. 8 or SupCon) of already computed latents."""
        if self.loss == "eq7":
            return losses.eq7_loss(latents, tau=self.tau, reduction=reduction)
        if self.loss == "eq8":
            return losses.eq8_loss(latents, labels, tau=self.tau, reduction=reduction,
                                   normalize_by=self.normalize_by)
        return losses.supcon_loss(latents, labels, tau=self.tau, base_temperature=self.base_temperature,
                                  reduction=reduction)

    def alignment_loss(self, batch: Mapping[str, Any], *, target: Optional[str] = None,
                       fields: Optional[Mapping[str, str]] = None, reduction: str = "mean") -> torch.Tensor:
        """The latent-space loss ``L_g`` of one dict batch, with gradient (current mode)."""
        self._check_target(target)
        fields = self._resolve_fields(fields)
        batch = _training.check_batch(batch, fields, target)
        if not self.built:
            warnings.warn("ContrastiveAligner: heads were created on this batch; build them before making an "
                          "optimizer (in_features=... or aligner.build(batch))", UserWarning, stacklevel=3)
            self.build(batch, fields)
        latents = {m: self.forward(m, batch[fields[m]]) for m in self._modalities}
        labels = batch[target] if target is not None else None
        return self.criterion(latents, labels, reduction=reduction)

    def joint_loss(self, task_loss: torch.Tensor, batch: Mapping[str, Any], lam: float = 0.1, *,
                   target: Optional[str] = None, fields: Optional[Mapping[str, str]] = None,
                   reduction: str = "mean") -> torch.Tensor:
        """Eq. 9 for online training (CMDA): ``task_loss + lam * alignment_loss(batch)``.

        ``reduction="sum"`` gives the paper's literal ``L_g = sum_i l_i``; the default
        mean is what the official code does (and keeps ``lam`` independent of the batch size).
        """
        align = self.alignment_loss(batch, target=target, fields=fields, reduction=reduction)
        return losses.joint_loss(task_loss, align, lam)

    # -- offline training ----------------------------------------------------------------
    def fit(self, data: Any, *, epochs: int = 30, batch_size: int = 128, lr: float = 0.01,
            weight_decay: float = 1e-4, momentum: float = 0.9, target: Optional[str] = None,
            fields: Optional[Mapping[str, str]] = None, num_workers: int = 0, shuffle: bool = True,
            generator: Optional[torch.Generator] = None, seed: Optional[int] = None, progress: bool = True,
            device: Optional[Union[str, torch.device]] = None) -> List[float]:
        """Learn the latent space offline (CMDA offline) with SGD; return per-epoch mean losses.

        Args:
            data: a dataset of dict samples, a mapping of equally long tensors
                (``{"image": X, "text": T, "label": y}``) or a DataLoader of dict batches.
            epochs: passes over the data (paper: 30).
            batch_size: samples per SGD step (paper: 128).
            lr: SGD learning rate (paper: 0.01).
            weight_decay: SGD weight decay (paper: 1e-4).
            momentum: SGD momentum (paper: 0.9).
            target: label field for ``loss="eq8"`` (optional for ``"supcon"``).
            fields: ``{modality: sample field}``; defaults to the modality names.
            num_workers: DataLoader workers (datasets only).
            shuffle: reshuffle every epoch (not used for a DataLoader).
            generator: the shuffling randomness (takes precedence over ``seed``).
            seed: seed of the shuffling when ``generator`` is None; default: the aligner's seed.
            progress: show a tqdm bar.
            device: move the aligner there first (default: where it is).

        Batches with fewer than 2 samples are skipped (a contrastive loss needs negatives).
        Encoder parts whose parameters are all frozen (``requires_grad=False``) stay in eval
        mode, so their BatchNorm statistics do not move; every train/eval flag is restored
        afterwards.
        """
        epochs = check_int("epochs", epochs, minimum=1)
        batch_size = check_int("batch_size", batch_size, minimum=2)
        lr = check_positive_float("lr", lr)
        weight_decay = check_positive_float("weight_decay", weight_decay, allow_zero=True)
        momentum = check_positive_float("momentum", momentum, allow_zero=True)
        num_workers = check_int("num_workers", num_workers, minimum=0)
        self._check_target(target)
        fields = self._resolve_fields(fields)
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed if seed is None else check_int("seed", seed, minimum=0))
        if device is not None:
            # heads that do not exist yet are built on the first batch's device, so the batches
            # go where asked even when the aligner has no parameters yet (identity encoders)
            device = torch.device(device)
            self.to(device)
        else:
            device = self._device()
        batches = _training.make_batches(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                         generator=generator)
        modes = [(module, module.training) for module in self.modules()]
        optimizer = None
        history: List[float] = []
        total = epochs * len(batches) if hasattr(batches, "__len__") else epochs
        bar = _training.progress_bar(total, progress, "ContrastiveAligner.fit")
        try:
            for epoch in range(epochs):
                running, count = 0.0, 0
                for step, batch in enumerate(batches):
                    batch = _training.move_to(_training.check_batch(batch, fields, target), device)
                    n = _training.batch_size_of(batch, fields[self._modalities[0]])
                    if hasattr(batches, "__len__"):
                        bar.update(1)
                    if n < 2:
                        continue
                    if optimizer is None:
                        self.build(batch, fields)
                        optimizer = self._make_optimizer(lr, momentum, weight_decay)
                        frozen = self._frozen_encoder_parts()
                    self.train()
                    for module in frozen:  # a frozen encoder's BatchNorm statistics stay as they are
                        module.eval()
                    latents = {m: self.forward(m, batch[fields[m]]) for m in self._modalities}
                    _training.check_finite_loss(None, latents, epoch, step)
                    loss = self.criterion(latents, batch[target] if target is not None else None)
                    _training.check_finite_loss(loss, {}, epoch, step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    running += float(loss.detach()) * n
                    count += n
                if count == 0:
                    fail("data", "at least one batch with 2 or more samples", data)
                history.append(running / count)
                if not hasattr(batches, "__len__"):
                    bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
        finally:
            bar.close()
            for module, training in modes:
                module.training = training
        self.history_ = self.history_ + history
        return history

    def _make_optimizer(self, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            fail("ContrastiveAligner.fit", "trainable parameters", "none (all frozen)", ValidationError, raw=True)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _device(self) -> torch.device:
        return self._first_device() or torch.device("cpu")

    def _first_device(self) -> Optional[torch.device]:
        """The device of the first parameter or buffer; None while the aligner has none."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return None

    def _frozen_encoder_parts(self) -> List[nn.Module]:
        """Encoder submodules that have parameters, none of them trainable (kept in eval by ``fit``)."""
        return [module for module in self.encoders.modules()
                if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())]

    # -- persistence ---------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        encoders = {}
        for name, encoder in self.encoders.items():
            cls = type(encoder)
            encoders[name] = {"class": f"{cls.__module__}.{cls.__qualname__}",
                              "has_state": bool(encoder.state_dict()), "spec": describe_encoder(encoder)}
        return {
            "aligner": self.kind,
            "dim": self._dim,
            "loss": self.loss,
            "tau": self.tau,
            "base_temperature": self.base_temperature,
            "normalize_by": self.normalize_by,
            "seed": self.seed,
            "modalities": list(self._modalities),
            "head_hidden": {m: list(w) for m, w in self.head_hidden.items()},
            "in_features": dict(self.in_features),
            "custom_heads": sorted(self._custom_heads),
            "encoders": encoders,
        }

    def save(self, path: PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (heads and encoder weights)."""
        return save_folder(path, self.get_config(), self.state_dict())

    @classmethod
    def _from_saved(cls, path: PathLike, config: Dict[str, Any], *, encoders: Optional[Mapping[str, nn.Module]] = None,
                    heads: Optional[Mapping[str, nn.Module]] = None, device: Any = None, strict: bool = True
                    ) -> "ContrastiveAligner":
        config, tensors = load_folder(path)
        encoders = dict(encoders or {})
        for name in config["modalities"]:
            saved = config["encoders"][name]
            if name in encoders:
                continue
            if saved.get("spec") is not None:  # a plain layer stack: rebuilt from the fixed table, no code read
                encoders[name] = build_encoder(saved["spec"], f"{Path(path) / 'config.json'}: encoders.{name}.spec")
            elif saved["class"] == "torch.nn.modules.linear.Identity":
                encoders[name] = nn.Identity()
            else:
                cls_name = saved["class"].rsplit(".", 1)[-1]
                fail("encoders", f"an encoder for modality {name!r} (saved with {saved['class']}, which config.json "
                     f"cannot rebuild: only {describable_names()} are rebuilt from it, and model.safetensors "
                     "holds weights, never code), so pass the module built as when saving: "
                     f"ContrastiveAligner.load(path, encoders={{{name!r}: {cls_name}(...)}})",
                     "none", ValidationError, raw=True)
        unknown = set(encoders) - set(config["modalities"])
        if unknown:
            fail("encoders", "only the saved modalities " + ", ".join(map(repr, config["modalities"])),
                 sorted(unknown))
        for name in config["custom_heads"]:
            if not heads or name not in heads:
                fail("heads", f"the custom head of modality {name!r} (it was not built by the aligner)", heads)
        in_features = {m: w for m, w in config["in_features"].items() if w is not None}
        aligner = cls({m: encoders[m] for m in config["modalities"]}, dim=config["dim"], loss=config["loss"],
                      tau=config["tau"], base_temperature=config["base_temperature"],
                      normalize_by=config["normalize_by"], head_hidden=config["head_hidden"], heads=heads,
                      in_features=in_features, seed=config["seed"])
        for name in in_features:
            weights = [t for key, t in tensors.items() if key.startswith(f"heads.{name}.")]
            if weights and name not in config["custom_heads"]:
                aligner.heads[name].to(weights[0].dtype)
        return aligner._restore(tensors, path, strict=strict, expected="weights that fit the given encoders and heads",
                                device=device)
