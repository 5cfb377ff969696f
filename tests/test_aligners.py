"""Aligner protocol, registry, ContrastiveAligner and PrecomputedAligner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CPU_AND_CUDA
from torch import nn
from torch.utils.data import DataLoader

from cmda_data.aligners import (
    PAPER_HEAD_HIDDEN,
    Aligner,
    ContrastiveAligner,
    PrecomputedAligner,
    SupportsEmbed,
    create_aligner,
    list_aligners,
    load_aligner,
    register_aligner,
)
from cmda_data.core.losses import eq7_loss, eq8_loss, supcon_loss
from cmda_data.exceptions import FieldError, ShapeError, ValidationError


def paired_data(n=96, seed=0, classes=4):
    """Two views (6-d 'image', 5-d 'text') of a shared 4-d latent, plus a class label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = 2.0 * torch.randn(classes, 4, generator=g)
    shared = centers[labels] + torch.randn(n, 4, generator=g)
    a = torch.randn(4, 6, generator=g)
    b = torch.randn(4, 5, generator=g)
    image = shared @ a + 0.1 * torch.randn(n, 6, generator=g)
    text = shared @ b + 0.1 * torch.randn(n, 5, generator=g)
    return {"image": image, "text": text, "label": labels}


def small_aligner(loss="eq7", **kwargs):
    kwargs.setdefault("head_hidden", (16,))
    kwargs.setdefault("tau", 0.2)
    return ContrastiveAligner({"image": nn.Identity(), "text": nn.Identity()}, dim=8, loss=loss, **kwargs)


def top1(z_a, z_b):
    return float(((z_a @ z_b.T).argmax(1) == torch.arange(len(z_a))).float().mean())


class Mlp(nn.Module):
    def __init__(self, d_in, d_out=12):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU())

    def forward(self, x):
        return self.net(x)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
def test_registry_lists_builtins_and_creates():
    assert {"clip", "contrastive", "precomputed"} <= set(list_aligners())
    assert list_aligners() == sorted(list_aligners())
    aligner = create_aligner("contrastive", encoders={"a": nn.Identity(), "b": nn.Identity()}, dim=4)
    assert isinstance(aligner, ContrastiveAligner) and aligner.modalities == ("a", "b")
    pre = create_aligner("precomputed", tables={"a": torch.eye(3), "b": torch.eye(3)})
    assert isinstance(pre, PrecomputedAligner) and isinstance(pre, SupportsEmbed)


def test_register_custom_aligner_and_errors():
    @register_aligner("test-mine")
    def make(n):
        return PrecomputedAligner({"x": torch.eye(n), "y": torch.eye(n)})

    assert create_aligner("test-mine", n=2).dim == 2
    with pytest.raises(ValidationError, match=r"name: expected a name not registered yet .*'test-mine'"):
        register_aligner("test-mine", lambda: None)
    register_aligner("test-mine", make, overwrite=False)  # same factory again is fine
    with pytest.raises(ValidationError, match=r"name: expected a registered aligner: .*'contrastive'.*got 'nope'"):
        create_aligner("nope")


# ---------------------------------------------------------------------------------------
# ContrastiveAligner: construction and heads
# ---------------------------------------------------------------------------------------
def test_paper_heads_by_default_and_configurable():
    aligner = ContrastiveAligner({"image": nn.Identity(), "text": nn.Identity()}, dim=128,
                                 in_features={"image": 7, "text": 5})
    shapes = {m: [tuple(l.weight.shape) for l in aligner.heads[m] if isinstance(l, nn.Linear)] for m in aligner.modalities}
    assert shapes["image"] == [(2048, 7), (128, 2048)]
    assert shapes["text"] == [(4096, 5), (4096, 4096), (128, 4096)]
    assert [type(l) for l in aligner.heads["image"]] == [nn.Linear, nn.ReLU, nn.Linear]  # no ReLU after last
    assert PAPER_HEAD_HIDDEN == {"vision": (2048,), "language": (4096, 4096)}
    custom = ContrastiveAligner({"image": nn.Identity(), "text": nn.Identity()}, dim=3,
                                head_hidden={"text": (6, 5)}, in_features={"image": 2, "text": 2})
    assert [l.out_features for l in custom.heads["text"] if isinstance(l, nn.Linear)] == [6, 5, 3]
    linear = small_aligner(head_hidden=(), in_features={"image": 6, "text": 5})
    assert len(linear.heads["image"]) == 1


def test_heads_size_themselves_from_encoder_output():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))  # output [n, 4, 1, 1]
    aligner = ContrastiveAligner({"image": conv, "text": Mlp(5)}, dim=6, head_hidden=(8,))
    assert not aligner.built
    z = aligner.embed("image", torch.rand(3, 3, 8, 8))
    assert z.shape == (3, 6) and aligner.in_features["image"] == 4
    aligner.build({"image": torch.rand(2, 3, 8, 8), "text": torch.randn(2, 5)})
    assert aligner.built and aligner.in_features["text"] == 12


def test_head_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = small_aligner(in_features={"image": 6, "text": 5}, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = small_aligner(in_features={"image": 6, "text": 5}, seed=3)
    c = small_aligner(in_features={"image": 6, "text": 5}, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.heads["image"][0].weight, c.heads["image"][0].weight)


def test_embed_is_unit_no_grad_and_restores_modes():
    enc = Mlp(6)
    aligner = ContrastiveAligner({"image": enc, "text": nn.Identity()}, dim=4, head_hidden=(8,))
    aligner.train()
    enc.net[1].eval()  # a frozen BatchNorm inside a training aligner
    x = torch.randn(5, 6)
    before = x.clone()
    z = aligner.embed("image", x)
    assert not z.requires_grad
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert aligner.training and enc.training and not enc.net[1].training
    torch.testing.assert_close(x, before)
    y = aligner("image", x)
    assert y.requires_grad
    torch.testing.assert_close(y.norm(dim=1), torch.ones(5))


def test_embed_batching_invariance_in_eval_mode():
    aligner = ContrastiveAligner({"image": Mlp(6), "text": nn.Identity()}, dim=4, head_hidden=(8,))
    x = torch.randn(7, 6)
    whole = aligner.embed("image", x)
    parts = torch.cat([aligner.embed("image", x[k:k + 1]) for k in range(7)])
    torch.testing.assert_close(whole, parts, atol=1e-6, rtol=1e-5)


def test_construction_errors():
    with pytest.raises(ValidationError, match=r"encoders: expected a dict \{modality: nn.Module\} with at least 2"):
        ContrastiveAligner({"image": nn.Identity()})
    with pytest.raises(ValidationError, match=r"encoders\['text'\]: expected an nn.Module"):
        ContrastiveAligner({"image": nn.Identity(), "text": lambda x: x})
    with pytest.raises(ValidationError, match=r"loss: expected one of 'eq7', 'eq8', 'supcon', got 'infonce'"):
        small_aligner(loss="infonce")
    with pytest.raises(ValidationError, match=r"encoders: expected modality names that are non-empty strings"):
        ContrastiveAligner({"a.b": nn.Identity(), "text": nn.Identity()})
    with pytest.raises(ValidationError, match=r"head_hidden\[0\]: expected an integer >= 1, got 0"):
        small_aligner(head_hidden=(0,))
    with pytest.raises(ValidationError, match=r"modality: expected one of 'image', 'text', got 'audio'"):
        small_aligner(head_hidden={"audio": (3,)})
    aligner = small_aligner(in_features={"image": 6, "text": 5})
    with pytest.raises(ValidationError, match=r"modality: expected one of 'image', 'text', got 'audio'"):
        aligner.embed("audio", torch.randn(2, 6))
    with pytest.raises(ShapeError, match=r"encoders\['image'\] output: expected 6 features"):
        aligner.embed("image", torch.randn(2, 7))
    with pytest.raises(ValidationError, match=r"encoders\['image'\] output: expected a floating-point"):
        aligner.embed("image", torch.ones(2, 6, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# fit / joint_loss
# ---------------------------------------------------------------------------------------
def test_fit_improves_retrieval_and_loss():
    data = paired_data()
    aligner = small_aligner()
    aligner.build(data)
    before = top1(aligner.embed("image", data["image"]), aligner.embed("text", data["text"]))
    history = aligner.fit(data, epochs=40, batch_size=32, lr=0.05, progress=False)
    after = top1(aligner.embed("image", data["image"]), aligner.embed("text", data["text"]))
    assert len(history) == 40 and all(np.isfinite(history))
    assert history[-1] < history[0] - 0.5
    assert after > before + 0.2, (before, after)


def test_fit_is_deterministic_and_accepts_datasets_and_loaders():
    data = paired_data(n=40)
    h1 = small_aligner().fit(data, epochs=3, batch_size=16, progress=True, seed=5)  # tqdm path
    h2 = small_aligner().fit(data, epochs=3, batch_size=16, progress=False, seed=5)
    assert h1 == h2
    samples = [{"image": data["image"][i], "text": data["text"][i]} for i in range(40)]
    h3 = small_aligner().fit(samples, epochs=2, batch_size=16, progress=False)
    loader = DataLoader(samples, batch_size=10, shuffle=False)
    h4 = small_aligner().fit(loader, epochs=2, progress=False)
    assert len(h3) == len(h4) == 2 and all(np.isfinite(h3 + h4))


def test_fit_with_fields_mapping_and_numpy_columns():
    data = paired_data(n=32)
    renamed = {"pixels": data["image"].numpy(), "caption": data["text"].numpy()}
    history = small_aligner().fit(renamed, fields={"image": "pixels", "text": "caption"}, epochs=2,
                                  batch_size=16, progress=False)
    assert len(history) == 2


def test_fit_skips_size_one_batches():
    data = paired_data(n=33)  # batches of 16, 16, 1
    history = small_aligner().fit(data, epochs=1, batch_size=16, progress=False)
    assert np.isfinite(history[0])


@pytest.mark.parametrize("loss", ["eq8", "supcon"])
def test_fit_supervised_losses(loss):
    data = paired_data(n=48)
    aligner = small_aligner(loss=loss)
    history = aligner.fit(data, target="label", epochs=15, batch_size=24, lr=0.05, progress=False)
    assert history[-1] < history[0]


def test_fit_errors():
    data = paired_data(n=16)
    with pytest.raises(ValidationError, match=r"target: expected the name of the label field"):
        small_aligner(loss="eq8").fit(data, progress=False)
    with pytest.raises(ValidationError, match=r"target: expected None for loss='eq7'"):
        small_aligner().fit(data, target="label", progress=False)
    with pytest.raises(FieldError, match=r"batch field 'caption': expected present"):
        small_aligner().fit(data, fields={"text": "caption"}, progress=False)
    with pytest.raises(ShapeError, match=r"data: expected columns with the same number of rows"):
        small_aligner().fit({"image": data["image"], "text": data["text"][:5]}, progress=False)
    with pytest.raises(ValidationError, match=r"epochs: expected an integer >= 1, got 0"):
        small_aligner().fit(data, epochs=0)
    with pytest.raises(ValidationError, match=r"training loss: expected a finite value"):
        small_aligner(in_features={"image": 6, "text": 5}).fit(data, lr=1e30, epochs=3, progress=False)


def test_alignment_and_joint_loss_match_the_loss_functions():
    data = paired_data(n=12)
    for loss, fn, target in (("eq7", lambda z, y: eq7_loss(z, tau=0.2), None),
                             ("eq8", lambda z, y: eq8_loss(z, y, tau=0.2), "label"),
                             ("supcon", lambda z, y: supcon_loss(z, y, tau=0.2), "label")):
        aligner = small_aligner(loss=loss, in_features={"image": 6, "text": 5})
        z = {m: aligner(m, data[m]) for m in aligner.modalities}
        torch.testing.assert_close(aligner.alignment_loss(data, target=target), fn(z, data["label"]))
    aligner = small_aligner(in_features={"image": 6, "text": 5})
    task = torch.tensor(2.0, requires_grad=True)
    total = aligner.joint_loss(task, data, lam=0.1)
    align = aligner.alignment_loss(data)
    torch.testing.assert_close(total, task + 0.1 * align)
    total.backward()
    assert aligner.heads["image"][0].weight.grad is not None
    summed = aligner.joint_loss(task, data, lam=0.1, reduction="sum")
    torch.testing.assert_close(summed, task + 0.1 * 12 * align)


def test_joint_loss_warns_when_heads_are_created():
    data = paired_data(n=8)
    with pytest.warns(UserWarning, match="heads were created on this batch"):
        small_aligner().joint_loss(torch.tensor(0.0), data)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_fit_and_embed_on_device(device):
    data = paired_data(n=32)
    aligner = small_aligner()
    aligner.fit(data, epochs=2, batch_size=16, progress=False, device=device)
    z = aligner.embed("text", data["text"].to(device))
    assert z.device.type == device and z.shape == (32, 8)
    torch.testing.assert_close(aligner.embed("text", data["text"]), z)  # CPU inputs go to the weights


def test_fit_keeps_a_frozen_encoder_in_eval_mode():
    data = paired_data(n=32)
    frozen, trained = Mlp(6), Mlp(5)
    frozen.requires_grad_(False)
    frozen.eval()
    stats = frozen.net[1].running_mean.clone(), trained.net[1].running_mean.clone()
    ContrastiveAligner({"image": frozen, "text": trained}, dim=4, head_hidden=(8,)).fit(
        data, epochs=1, batch_size=16, progress=False)
    assert torch.equal(frozen.net[1].running_mean, stats[0]) and not frozen.training  # untouched
    assert not torch.equal(trained.net[1].running_mean, stats[1])  # a trained encoder's BatchNorm learns


def test_heads_built_under_autocast_are_float32():
    data = paired_data(n=8)
    aligner = ContrastiveAligner({"image": nn.Linear(6, 6), "text": nn.Identity()}, dim=4, head_hidden=(8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = aligner(modality="image", batch=data["image"])
    assert z.dtype == torch.bfloat16 and aligner.heads["image"][0].weight.dtype == torch.float32
    assert aligner.embed("text", data["text"]).dtype == torch.float32  # outside autocast: float32 heads too


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
def test_a_state_dict_loads_into_an_aligner_whose_heads_are_not_built():
    data = paired_data(n=32)
    trained = ContrastiveAligner({"image": Mlp(6), "text": nn.Identity()}, dim=4, head_hidden=(8,))
    trained.fit(data, epochs=1, batch_size=16, progress=False)
    fresh = ContrastiveAligner({"image": Mlp(6), "text": nn.Identity()}, dim=4, head_hidden=(8,))
    assert not fresh.built
    fresh.load_state_dict(trained.state_dict())
    nested = nn.ModuleDict({"aligner": ContrastiveAligner({"image": Mlp(6), "text": nn.Identity()}, dim=4,
                                                          head_hidden=(8,))})
    nested.load_state_dict(nn.ModuleDict({"aligner": trained}).state_dict())  # inside a user's model
    for m in ("image", "text"):
        torch.testing.assert_close(fresh.embed(m, data[m]), trained.embed(m, data[m]))
        torch.testing.assert_close(nested["aligner"].embed(m, data[m]), trained.embed(m, data[m]))
    wrong = ContrastiveAligner({"image": Mlp(6), "text": nn.Identity()}, dim=4, head_hidden=(9,))
    with pytest.raises(RuntimeError, match=r"size mismatch for heads.image.0.weight"):
        wrong.load_state_dict(trained.state_dict())


def test_save_load_roundtrip_identity_encoders(tmp_path):
    data = paired_data(n=32)
    aligner = small_aligner(loss="eq8")
    aligner.fit(data, target="label", epochs=2, batch_size=16, progress=False)
    aligner.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["aligner"] == "contrastive" and config["loss"] == "eq8" and config["tau"] == 0.2
    assert config["head_hidden"] == {"image": [16], "text": [16]} and config["in_features"] == {"image": 6, "text": 5}
    loaded = ContrastiveAligner.load(tmp_path / "a")
    generic = Aligner.load(tmp_path / "a")
    assert isinstance(generic, ContrastiveAligner)
    for m in ("image", "text"):
        torch.testing.assert_close(loaded.embed(m, data[m]), aligner.embed(m, data[m]))
        torch.testing.assert_close(generic.embed(m, data[m]), aligner.embed(m, data[m]))


def test_save_load_reattaches_encoders_with_weights(tmp_path):
    data = paired_data(n=32)
    aligner = ContrastiveAligner({"image": Mlp(6), "text": Mlp(5)}, dim=4, head_hidden=(8,))
    aligner.fit(data, epochs=2, batch_size=16, progress=False)
    aligner.save(tmp_path)
    with pytest.raises(ValidationError, match=r"encoders: expected an encoder for modality 'image' \(saved with "
                                               r".*Mlp, .*encoders=\{'image': Mlp\(\.\.\.\)\}\), got none"):
        ContrastiveAligner.load(tmp_path)
    loaded = ContrastiveAligner.load(tmp_path, encoders={"image": Mlp(6), "text": Mlp(5)})
    for m in ("image", "text"):
        torch.testing.assert_close(loaded.embed(m, data[m]), aligner.embed(m, data[m]))
    with pytest.raises(ShapeError, match=r"load\(.*\): expected weights that fit the given encoders"):
        ContrastiveAligner.load(tmp_path, encoders={"image": Mlp(6, 3), "text": Mlp(5)})


def test_load_errors(tmp_path):
    with pytest.raises(ValidationError, match=r"path: expected a folder written by save\(\) containing config.json"):
        load_aligner(tmp_path / "missing")
    PrecomputedAligner({"a": torch.eye(2), "b": torch.eye(2)}).save(tmp_path)
    with pytest.raises(ValidationError, match=r"ContrastiveAligner.load\(path\): expected a folder saved by "
                                               r"ContrastiveAligner, got a folder saved by PrecomputedAligner"):
        ContrastiveAligner.load(tmp_path)


# ---------------------------------------------------------------------------------------
# PrecomputedAligner
# ---------------------------------------------------------------------------------------
def test_precomputed_lookup_by_index_kinds():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    before = img.clone()
    aligner = PrecomputedAligner({"image": img, "text": txt})
    expected = img[[2, 5]] / img[[2, 5]].norm(dim=1, keepdim=True)
    for indices in ([2, 5], (2, 5), torch.tensor([2, 5]), np.array([2, 5]), torch.tensor([2, 5], dtype=torch.int32)):
        torch.testing.assert_close(aligner.embed("image", indices), expected)
    torch.testing.assert_close(aligner.embed("image", 5), expected[1:])
    torch.testing.assert_close(aligner.embed("image", torch.tensor(5)), expected[1:])
    assert aligner.embed("text", []).shape == (0, 4)
    assert aligner.dim == 4 and aligner.num_samples == 10 and aligner.modalities == ("image", "text")
    torch.testing.assert_close(img, before)


def test_precomputed_errors():
    with pytest.raises(ShapeError, match=r"tables\['text'\]: expected 10 rows like tables\['image'\]"):
        PrecomputedAligner({"image": torch.randn(10, 4), "text": torch.randn(9, 4)})
    with pytest.raises(ShapeError, match=r"tables: expected rows of one width, or projection=dim"):
        PrecomputedAligner({"image": torch.randn(10, 4), "text": torch.randn(10, 3)})
    aligner = PrecomputedAligner({"image": torch.randn(10, 4), "text": torch.randn(10, 4)})
    with pytest.raises(ValidationError, match=r"indices: expected data set indices: .* in \[0, 10\), got values "
                                               r"in \[3, 10\]"):
        aligner.embed("image", [3, 10])
    with pytest.raises(ValidationError, match=r"indices: expected data set indices"):
        aligner.embed("image", torch.tensor([0.5]))
    with pytest.raises(ValidationError, match=r"indices: expected data set indices"):
        aligner.embed("image", [-1])
    with pytest.raises(ValidationError, match=r"projection: expected an int dim"):
        aligner.fit()


def test_precomputed_projection_trains_and_roundtrips(tmp_path):
    data = paired_data(n=96)
    aligner = PrecomputedAligner({"image": data["image"], "text": data["text"]}, projection=8, tau=0.2,
                                 head_hidden=(16,))
    assert aligner.dim == 8
    train = torch.arange(64)
    before = top1(aligner.embed("image", train), aligner.embed("text", train))
    history = aligner.fit(train, epochs=40, batch_size=32, lr=0.05, progress=False)
    after = top1(aligner.embed("image", train), aligner.embed("text", train))
    assert history[-1] < history[0] and after > before + 0.2
    aligner.save(tmp_path)
    loaded = load_aligner(tmp_path)
    assert isinstance(loaded, PrecomputedAligner) and loaded.projection == 8
    torch.testing.assert_close(loaded.embed("text", [1, 70]), aligner.embed("text", [1, 70]))


def test_precomputed_supervised_projection_accepts_all_row_labels():
    data = paired_data(n=48)
    aligner = PrecomputedAligner({"image": data["image"], "text": data["text"]}, projection=4, loss="eq8")
    history = aligner.fit(torch.arange(32), labels=data["label"], epochs=2, batch_size=16, progress=False)
    assert len(history) == 2
    with pytest.raises(ShapeError, match=r"labels: expected one label per training row \(32\)"):
        aligner.fit(torch.arange(32), labels=data["label"][:5], progress=False)


def test_precomputed_keeps_float64_and_numpy(tmp_path):
    img = np.random.default_rng(0).normal(size=(6, 3))
    aligner = PrecomputedAligner({"image": img, "text": img * 2})
    z = aligner.embed("text", [0, 1])
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, aligner.embed("image", [0, 1]))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_precomputed_to_device(device):
    aligner = PrecomputedAligner({"image": torch.randn(5, 3), "text": torch.randn(5, 3)}, projection=2).to(device)
    z = aligner.embed("image", torch.tensor([0, 4]))
    assert z.device.type == device and z.shape == (2, 2)


def test_a_subclass_that_inherits_a_kind_does_not_take_over_loading(tmp_path):
    class Tweaked(PrecomputedAligner):  # e.g. a user's embed() override, no kind of its own
        pass

    table = {"image": torch.randn(5, 3), "text": torch.randn(5, 3)}
    Tweaked(table).save(tmp_path / "a")
    loaded = Aligner.load(tmp_path / "a")
    assert type(loaded) is PrecomputedAligner
    assert "precomputed" in list_aligners()

    class Named(PrecomputedAligner):
        kind = "named-precomputed-test"

    try:
        assert Aligner._kinds["named-precomputed-test"] is Named  # a class naming its kind registers it
    finally:
        del Aligner._kinds["named-precomputed-test"]
