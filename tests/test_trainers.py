"""CMDA inside the trainers people use (docs/howto/trainers.md): Lightning, Hugging Face ``Trainer``, timm.

Each test runs the real trainer on CPU and records the batches the model saw, then checks them
against a fresh :class:`CMDACollate` called in this process on the same dataset indices at the
epoch the trainer was in: the batches are CMDA-mixed, carry the draws of that epoch (so
``set_epoch`` reached the collate, also in persistent workers), and the targets are the soft
targets the loss needs. Controls show what each trainer does by itself (no ``set_epoch`` on a
collate function; float labels read as multi-label by transformers' heads; timm's in-place mix).
A trainer package that is not installed skips its tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cmda_data import CMDACollate, CMDAugment, EmbeddingBank, IndexedDataset
from cmda_data.datasets import ShapesDataset
from cmda_data.exceptions import FieldError

N, SIZE, BATCH = 32, 16, 8


@pytest.fixture(scope="module")
def setup():
    data = ShapesDataset(n=N, image_size=SIZE)
    noise = 0.1 * torch.randn(data.texts.shape, generator=torch.Generator().manual_seed(0))
    z = {"image": F.normalize(data.texts + noise, dim=1), "text": F.normalize(data.texts, dim=1)}
    bank = EmbeddingBank.from_embeddings(z, student="image", teachers="text", n_components=2)
    return IndexedDataset(data), bank, data.num_classes


def _collate(bank, num_classes, **kwargs):
    return CMDACollate(bank, target="label", num_classes=num_classes, p=0.5, seed=0, **kwargs)


def _record(batch, epoch):
    info = batch["mix_info"]
    return {"epoch": int(epoch), "image": batch["image"].detach().clone(), "label": batch["label"].detach().clone(),
            **{key: info[key].detach().clone() for key in ("index", "partners", "weights", "mixed")}}


def _reference(indexed, bank, num_classes, index, epoch):
    """The batch a CMDACollate in this process makes of these dataset indices at ``epoch``."""
    collate = _collate(bank, num_classes)
    collate.set_epoch(epoch)
    return _record(collate([indexed[int(i)] for i in index]), epoch)


def _same_draws(seen, ref):
    return (torch.equal(seen["index"], ref["index"]) and torch.equal(seen["mixed"], ref["mixed"])
            and torch.equal(seen["partners"], ref["partners"]))


def _check_seen(seen, indexed, bank, num_classes, epochs):
    """Every batch the model saw is the CMDA batch of its epoch; some differ from the other epoch's draws."""
    assert sorted({s["epoch"] for s in seen}) == list(range(epochs))
    changed = 0
    for s in seen:
        ref = _reference(indexed, bank, num_classes, s["index"], s["epoch"])
        assert _same_draws(s, ref), s["epoch"]
        torch.testing.assert_close(s["weights"], ref["weights"])
        torch.testing.assert_close(s["image"], ref["image"])
        torch.testing.assert_close(s["label"], ref["label"])
        other = _reference(indexed, bank, num_classes, s["index"], 1 - s["epoch"]) if epochs == 2 else ref
        changed += not _same_draws(s, other)
    assert changed > 0  # set_epoch changed the draws between the epochs
    labels = torch.cat([s["label"] for s in seen])
    mixed = torch.cat([s["mixed"] for s in seen])
    assert labels.shape[1] == num_classes and labels.dtype == torch.float32
    torch.testing.assert_close(labels.sum(1), torch.ones(len(labels)))
    assert mixed.any()
    assert (labels[mixed].max(1).values < 1).any()  # soft targets, not one-hot, on mixed rows


# --------------------------------------------------------------------------- Lightning
def _lightning_parts(pl, indexed, bank, num_classes, num_workers, seen):
    class ShapesData(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.collate = _collate(bank, num_classes)

        def train_dataloader(self):
            if self.trainer is not None:
                self.collate.set_epoch(self.trainer.current_epoch)
            return DataLoader(indexed, batch_size=BATCH, shuffle=True, collate_fn=self.collate,
                              num_workers=num_workers, persistent_workers=num_workers > 0)

    class CMDAEpoch(pl.Callback):
        def __init__(self, collate):
            self.collate = collate

        def on_train_epoch_start(self, trainer, pl_module):
            self.collate.set_epoch(trainer.current_epoch)

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, num_classes))

        def training_step(self, batch, batch_idx):
            seen.append(_record(batch, self.current_epoch))
            return F.cross_entropy(self.net(batch["image"]), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return ShapesData(), CMDAEpoch, Classifier()


def _lightning_trainer(pl, **kwargs):
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, **kwargs)


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_lightning_fast_dev_run_trains_on_cmda_batches(setup, quiet):
    pl = pytest.importorskip("pytorch_lightning")
    indexed, bank, num_classes = setup
    seen: list = []
    datamodule, callback, model = _lightning_parts(pl, indexed, bank, num_classes, 0, seen)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _lightning_trainer(pl, fast_dev_run=True, callbacks=[callback(datamodule.collate)])
    trainer.fit(model, datamodule=datamodule)
    assert trainer.state.finished and len(seen) == 1
    ref = _reference(indexed, bank, num_classes, seen[0]["index"], 0)
    assert _same_draws(seen[0], ref)
    torch.testing.assert_close(seen[0]["image"], ref["image"])
    torch.testing.assert_close(seen[0]["label"].sum(1), torch.ones(BATCH))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))  # it trained


def test_lightning_callback_gives_each_epoch_its_draws_in_persistent_workers(setup, quiet):
    pl = pytest.importorskip("pytorch_lightning")
    indexed, bank, num_classes = setup
    seen: list = []
    datamodule, callback, model = _lightning_parts(pl, indexed, bank, num_classes, 2, seen)
    trainer = _lightning_trainer(pl, max_epochs=2, callbacks=[callback(datamodule.collate)])
    trainer.fit(model, datamodule=datamodule)
    assert len(seen) == 2 * N // BATCH
    _check_seen(seen, indexed, bank, num_classes, epochs=2)
    assert datamodule.collate.epoch == 1


def test_lightning_alone_does_not_set_the_collate_epoch(setup, quiet):
    """The control: without the callback, epoch 1 repeats the draws of epoch 0 (Lightning sets samplers only)."""
    pl = pytest.importorskip("pytorch_lightning")
    indexed, bank, num_classes = setup
    seen: list = []
    datamodule, _, model = _lightning_parts(pl, indexed, bank, num_classes, 0, seen)
    trainer = _lightning_trainer(pl, max_epochs=2, limit_train_batches=2)
    trainer.fit(model, datamodule=datamodule)
    assert datamodule.collate.epoch == 0
    late = [s for s in seen if s["epoch"] == 1]
    assert late and all(_same_draws(s, _reference(indexed, bank, num_classes, s["index"], 0)) for s in late)


# --------------------------------------------------------------------------- Hugging Face Trainer
def _tiny_vit(transformers, folder, num_classes):
    config = transformers.ViTConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    num_labels=num_classes)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return transformers.ViTForImageClassification.from_pretrained(folder)


def _hf_parts(transformers, seen):
    class CMDATrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(_record(inputs, self.state.epoch or 0))
            outputs = model(pixel_values=inputs["image"])
            loss = F.cross_entropy(outputs.logits, inputs["label"])
            return (loss, outputs) if return_outputs else loss

    class CMDAEpochHF(transformers.TrainerCallback):
        def __init__(self, collate):
            self.collate = collate

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.collate.set_epoch(int(state.epoch or 0))

    return CMDATrainer, CMDAEpochHF


def _hf_args(transformers, tmp_path, **kwargs):
    return transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                                          num_train_epochs=2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0, **kwargs)


def test_hf_trainer_with_cmda_collator_and_epoch_callback(setup, tmp_path, quiet):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    indexed, bank, num_classes = setup
    seen: list = []
    model = _tiny_vit(transformers, tmp_path / "vit", num_classes)
    before = [p.detach().clone() for p in model.parameters()]
    trainer_cls, callback = _hf_parts(transformers, seen)
    collate = _collate(bank, num_classes)
    args = _hf_args(transformers, tmp_path, remove_unused_columns=False, dataloader_num_workers=2,
                    dataloader_persistent_workers=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=indexed, data_collator=collate,
                          callbacks=[callback(collate)])
    result = trainer.train()
    assert result.global_step == 2 * N // BATCH == len(seen)
    _check_seen(seen, indexed, bank, num_classes, epochs=2)
    assert collate.epoch == 1
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))  # it trained


def test_hf_trainer_alone_does_not_set_the_collator_epoch(setup, tmp_path, quiet):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    indexed, bank, num_classes = setup
    seen: list = []
    trainer_cls, _ = _hf_parts(transformers, seen)
    collate = _collate(bank, num_classes)
    trainer = trainer_cls(model=_tiny_vit(transformers, tmp_path / "vit", num_classes),
                          args=_hf_args(transformers, tmp_path, remove_unused_columns=False),
                          train_dataset=indexed, data_collator=collate)
    trainer.train()
    assert collate.epoch == 0
    late = [s for s in seen if s["epoch"] == 1]
    assert late and all(_same_draws(s, _reference(indexed, bank, num_classes, s["index"], 0)) for s in late)


def test_hf_trainer_drops_the_index_unless_remove_unused_columns_is_off(setup, tmp_path, quiet):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    indexed, bank, num_classes = setup
    trainer = transformers.Trainer(model=_tiny_vit(transformers, tmp_path / "vit", num_classes),
                                   args=_hf_args(transformers, tmp_path, max_steps=1), train_dataset=indexed,
                                   data_collator=_collate(bank, num_classes))
    with pytest.raises(FieldError, match="'index'"):
        trainer.train()


def test_hf_classification_head_reads_soft_targets_as_multilabel(setup, tmp_path):
    """Why the how-to overrides compute_loss: the head's own loss with float labels [B, C] is BCE, not CE."""
    transformers = pytest.importorskip("transformers")
    indexed, bank, num_classes = setup
    model = _tiny_vit(transformers, tmp_path / "vit", num_classes)
    batch = CMDACollate(bank, target="label", num_classes=num_classes, p=1.0, seed=0)([indexed[i] for i in range(8)])
    out = model(pixel_values=batch["image"], labels=batch["label"])
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, batch["label"]))
    soft_ce = -(batch["label"] * out.logits.log_softmax(1)).sum(1).mean()
    assert not torch.allclose(out.loss, soft_ce)
    torch.testing.assert_close(F.cross_entropy(out.logits, batch["label"]), soft_ce)


# --------------------------------------------------------------------------- timm
def test_cmda_targets_are_what_timm_soft_target_cross_entropy_takes(setup):
    pytest.importorskip("timm")
    from timm.data.mixup import one_hot
    from timm.loss import SoftTargetCrossEntropy

    indexed, bank, num_classes = setup
    smoothing = 0.1
    batch = next(iter(DataLoader(indexed, batch_size=BATCH, shuffle=False)))
    aug = CMDAugment(bank, target="label", num_classes=num_classes, p=0.5, seed=0, label_smoothing=smoothing)
    out, plan = aug(batch)
    target = out["label"]
    assert target.shape == (BATCH, num_classes) and target.dtype == torch.float32
    # the reference: timm's smoothed one-hot of each partner's class, averaged with the plan's weights
    off = smoothing / num_classes
    # (a row that is not mixed has itself as its one partner, weight 1)
    partner_targets = one_hot(batch["label"][plan.index], num_classes, on_value=1 - smoothing + off,
                              off_value=off).view(BATCH, -1, num_classes)
    expected = (plan.weights.unsqueeze(2) * partner_targets).sum(1)
    torch.testing.assert_close(target, expected)
    assert plan.mixed.any() and not plan.mixed.all()
    assert (target[plan.mixed].max(1).values < 1 - smoothing + off - 1e-3).any()  # really mixed targets
    logits = torch.randn(BATCH, num_classes, generator=torch.Generator().manual_seed(1))
    loss = SoftTargetCrossEntropy()(logits, target)
    torch.testing.assert_close(loss, -(expected * logits.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_unmixed_cmda_rows_equal_timm_mixup_targets_with_the_same_smoothing(setup):
    pytest.importorskip("timm")
    from timm.data import Mixup

    indexed, bank, num_classes = setup
    batch = next(iter(DataLoader(indexed, batch_size=BATCH, shuffle=False)))
    mixup = Mixup(mixup_alpha=0.8, prob=0.0, num_classes=num_classes)  # prob=0: never mixes, lambda = 1
    _, timm_target = mixup(batch["image"].clone(), batch["label"])
    out, _ = CMDAugment(bank, target="label", num_classes=num_classes, p=0.0, label_smoothing=0.1)(batch)
    torch.testing.assert_close(out["label"], timm_target)


def test_timm_loop_side_by_side_with_mixup(setup):
    """The how-to's loop: one loader feeds both; Mixup mixes in place and needs even batches, CMDA does not."""
    pytest.importorskip("timm")
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    indexed, bank, num_classes = setup
    loader = DataLoader(indexed, batch_size=BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    mixup = Mixup(mixup_alpha=0.8, num_classes=num_classes)
    cmda = CMDAugment(bank, target="label", num_classes=num_classes, p=0.5, seed=0)
    loss_fn = SoftTargetCrossEntropy()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for epoch in range(2):
        cmda.set_epoch(epoch)
        for batch in loader:
            image = batch["image"].clone()
            m_input, m_target = mixup(batch["image"].clone(), batch["label"])
            c_out, _ = cmda(batch)
            assert torch.equal(batch["image"], image)  # CMDA leaves the batch alone
            seen.append(_record(c_out, epoch))
            for input, target in ((m_input, m_target), (c_out["image"], c_out["label"])):
                assert target.shape == (BATCH, num_classes) and target.dtype == torch.float32
                loss = loss_fn(model(input), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                assert torch.isfinite(loss)
    _check_seen(seen, indexed, bank, num_classes, epochs=2)  # CMDAugment = CMDACollate, epoch by epoch

    odd = next(iter(DataLoader(indexed, batch_size=BATCH - 1)))
    in_place = odd["image"][:6].clone()
    mixup(in_place, odd["label"][:6])
    assert not torch.equal(in_place, odd["image"][:6])  # timm mixed its input in place
    with pytest.raises(AssertionError, match="even"):
        mixup(odd["image"].clone(), odd["label"])
    out, _ = cmda(odd)
    assert out["image"].shape[0] == BATCH - 1
