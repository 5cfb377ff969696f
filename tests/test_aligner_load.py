"""ContrastiveAligner.load rebuilds plain encoders (nn.Flatten, Linear stacks) from config.json.

Other encoders need ``encoders=``, and the error says so; nothing read from the folder is
imported or executed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cmda_data import ContrastiveAligner, ValidationError, load_aligner
from cmda_data.datasets import ShapesDataset


class Doubler(nn.Module):
    """An encoder of the user's own (not describable in config.json)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(n=48, image_size=8)


def fitted(encoders, data):
    aligner = ContrastiveAligner(encoders, dim=8, head_hidden=(16,), seed=0)
    aligner.fit({"image": data.images, "text": data.texts}, epochs=1, batch_size=16, progress=False)
    return aligner


def test_flatten_encoder_loads_without_encoders(tmp_path, shapes):
    """The README's aligner: nn.Flatten + nn.Identity comes back with no arguments."""
    aligner = fitted({"image": nn.Flatten(), "text": nn.Identity()}, shapes)
    aligner.save(tmp_path / "a")
    again = ContrastiveAligner.load(tmp_path / "a")
    assert isinstance(again.encoders["image"], nn.Flatten)
    for modality, batch in (("image", shapes.images[:10]), ("text", shapes.texts[:10])):
        torch.testing.assert_close(again.embed(modality, batch), aligner.embed(modality, batch), rtol=0, atol=0)
    # the generic loader too
    assert torch.equal(load_aligner(tmp_path / "a").embed("image", shapes.images[:4]),
                       aligner.embed("image", shapes.images[:4]))


def test_a_trained_mlp_encoder_comes_back_with_its_weights(tmp_path, shapes):
    mlp = nn.Sequential(nn.Flatten(start_dim=1), nn.Linear(3 * 8 * 8, 24), nn.GELU(approximate="tanh"),
                        nn.LayerNorm(24), nn.Dropout(0.1), nn.Linear(24, 12, bias=False))
    frozen = nn.Sequential(nn.Linear(shapes.texts.shape[1], 10), nn.Tanh()).requires_grad_(False)
    aligner = fitted({"image": mlp, "text": frozen}, shapes)
    aligner.save(tmp_path / "a")
    spec = json.loads((tmp_path / "a" / "config.json").read_text())["encoders"]["image"]["spec"]
    assert [child[1]["layer"] for child in spec["children"]] == ["Flatten", "Linear", "GELU", "LayerNorm",
                                                                 "Dropout", "Linear"]
    state = torch.random.get_rng_state()
    again = ContrastiveAligner.load(tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)  # rebuilding drew nothing from the global RNG
    assert str(again.encoders["image"]) == str(mlp)
    for key, value in aligner.state_dict().items():  # every weight, encoders included
        assert torch.equal(again.state_dict()[key], value), key
    again.eval(), aligner.eval()
    torch.testing.assert_close(again.embed("image", shapes.images[:10]), aligner.embed("image", shapes.images[:10]),
                               rtol=0, atol=0)
    # a frozen encoder stays frozen
    assert not any(p.requires_grad for p in again.encoders["text"].parameters())
    assert all(p.requires_grad for p in again.encoders["image"].parameters())


def test_an_encoder_of_ones_own_needs_encoders_and_the_error_says_how(tmp_path, shapes):
    aligner = fitted({"image": nn.Flatten(), "text": Doubler()}, shapes)
    with torch.no_grad():
        aligner.encoders["text"].scale.fill_(3.0)
    aligner.save(tmp_path / "a")
    with pytest.raises(ValidationError) as info:
        ContrastiveAligner.load(tmp_path / "a")
    message = str(info.value)
    assert message.startswith("encoders: expected an encoder for modality 'text'")
    assert "test_aligner_load.Doubler" in message and "encoders={'text': Doubler(...)}" in message
    assert "nn.Flatten" in message and "never code" in message
    again = ContrastiveAligner.load(tmp_path / "a", encoders={"text": Doubler()})
    assert again.encoders["text"].scale.item() == 3.0  # the saved weight went into the given module
    assert isinstance(again.encoders["image"], nn.Flatten)  # the other one was rebuilt


def test_folders_saved_before_the_spec_name_the_missing_argument(tmp_path, shapes):
    aligner = fitted({"image": nn.Flatten(), "text": nn.Identity()}, shapes)
    aligner.save(tmp_path / "a")
    config_file = tmp_path / "a" / "config.json"
    config = json.loads(config_file.read_text())
    for saved in config["encoders"].values():
        del saved["spec"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValidationError, match=r"encoders=\{'image': Flatten\(\.\.\.\)\}"):
        ContrastiveAligner.load(tmp_path / "a")
    again = ContrastiveAligner.load(tmp_path / "a", encoders={"image": nn.Flatten()})  # Identity still rebuilt
    assert torch.equal(again.embed("text", shapes.texts[:3]), aligner.embed("text", shapes.texts[:3]))


@pytest.mark.parametrize("spec, words", [
    ({"layer": "os.system", "args": {}}, "encoders.image.spec.layer: expected one of Sequential"),
    ({"layer": "Linear", "args": {"in_features": "192; rm -rf /", "out_features": 8, "bias": True}},
     "encoders.image.spec.args.in_features: expected an integer >= 1"),
    ({"layer": "Linear", "args": {"in_features": 192, "out_features": 8, "device": "cuda"}},
     "encoders.image.spec.args: expected arguments of nn.Linear"),
    ({"layer": "Sequential", "children": [["a.b", {"layer": "ReLU"}]]}, "children: expected a list of [name, spec]"),
    ({"layer": "Dropout", "args": {"p": float("nan")}}, "args.p: expected a finite number"),
])
def test_a_tampered_spec_is_refused_not_run(tmp_path, shapes, spec, words):
    aligner = fitted({"image": nn.Flatten(), "text": nn.Identity()}, shapes)
    aligner.save(tmp_path / "a")
    config_file = tmp_path / "a" / "config.json"
    config = json.loads(config_file.read_text())
    config["encoders"]["image"]["spec"] = spec
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValidationError) as info:
        ContrastiveAligner.load(tmp_path / "a")
    assert words in str(info.value) and "config.json" in str(info.value)
