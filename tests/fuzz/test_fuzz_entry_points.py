"""Fuzzed entry points: the dataset wrapper, the collate, the CMDAugment module and the stream buffer.

Samples with extreme finite values (subnormal, 1e+-38, 3e38 in float32, 1e300 in float64)
and fuzzed options go through the four entry points. Properties: the output is finite;
every generated sample lies in the hull of the partners its record names (per coordinate);
soft labels are convex; the inputs are untouched; nothing is lost (every real sample comes
out: as itself or as the row it guided, and the stream buffer emits one sample per sample
read); no subprocess is started; bad samples and bad options give a CMDAError naming them.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import strategies as S
import torch
from _entry_data import make_bank
from fuzz_harness import (
    assert_convex_rows,
    assert_in_hull,
    assert_untouched,
    examples,
    expect_cmda_error,
    no_subprocess,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, default_collate

from cmda_data import (
    CandidateBuffer,
    CMDACollate,
    CMDAError,
    CMDAugment,
    CrossModalAugmentedDataset,
    DeviceError,
    IndexedDataset,
    MixOptions,
)

N, C = 12, 3
BANK = make_bank(N)


class ArrayDataset(Dataset):
    """Dict samples ``{"image", "text", "label"}`` from given tensors (module level: workers import it)."""

    def __init__(self, images: torch.Tensor, labels: List[int]) -> None:
        self.images, self.labels = images, labels
        self.texts = torch.linspace(-1, 1, len(labels) * 2).reshape(len(labels), 2)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"image": self.images[i], "text": self.texts[i], "label": self.labels[i]}


@st.composite
def datasets(draw, dtype=None) -> ArrayDataset:
    dtype = draw(st.sampled_from([torch.float32, torch.float64])) if dtype is None else dtype
    shape = draw(st.sampled_from([(2,), (1, 2, 2)]))
    images = draw(S.extreme_tensors((N, *shape), dtype))
    labels = draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N))
    return ArrayDataset(images, labels)


@st.composite
def mix_options(draw) -> MixOptions:
    return MixOptions(
        p=draw(st.sampled_from([0.0, 0.5, 1.0])), top_k=draw(st.sampled_from([None, 1, 3, 8])),
        intra=draw(st.sampled_from(["soft", "hard", None])), keep_real=draw(st.booleans()),
        exclude_self=draw(st.booleans()), temperature=draw(st.sampled_from([None, 1.2e-38, 0.05, 1e30])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])), seed=draw(st.integers(0, 2 ** 31)),
        self_weight=draw(st.sampled_from([None, 0.0, 10.0])), pool_size=draw(st.integers(1, N)),
        renormalize=True)


def _check_batch(out: Dict[str, Any], images: torch.Tensor, batch_size: int, options: MixOptions) -> None:
    """Rows finite, in the hull of their partners, labels convex, every real sample accounted for."""
    info = out["mix_info"]
    assert_in_hull(out["image"], images, index=info["partners"], weights=info["weights"], rel=1e-4)
    assert_convex_rows(out["label"])
    rows = out["image"].shape[0]
    real = int((~info["mixed"]).sum())
    if options.keep_real:
        assert real >= batch_size and rows == batch_size + int(info["mixed"].sum())
    else:
        assert rows == batch_size  # one row per sample: itself or the row it guided
    assert sorted(set(info["index"].tolist())) == list(range(batch_size))


@settings(max_examples=examples(0.5))
@given(data=datasets(), options=mix_options(), batch=st.integers(1, N))
def test_collate_output_is_finite_convex_and_complete(data, options, batch):
    """CMDACollate over extreme samples: finite rows in their partners' hull, convex labels, no sample lost."""
    samples = [IndexedDataset(data)[i] for i in range(batch)]
    saved = snapshot(samples)
    collate = CMDACollate(BANK, options, target="label", num_classes=C)
    with no_subprocess():
        out = collate(samples)
    assert_untouched(saved)
    _check_batch(out, data.images[:batch], batch, options)


@settings(max_examples=examples(0.5))
@given(data=datasets(), options=mix_options(), batch=st.integers(1, N))
def test_module_output_is_finite_convex_and_complete(data, options, batch):
    """CMDAugment on a collated batch of extreme samples: the same properties as the collate."""
    batch_in = default_collate([IndexedDataset(data)[i] for i in range(batch)])
    saved = snapshot(batch_in)
    module = CMDAugment(BANK, options, target="label", num_classes=C)
    with no_subprocess():
        out, plan = module(batch_in)
    assert_untouched(saved)
    _check_batch(out, data.images[:batch], batch, options)


@settings(max_examples=examples(0.5))
@given(data=datasets(), options=mix_options(), items=st.lists(st.integers(0, 2 * N - 1), min_size=1, max_size=6))
def test_dataset_items_are_finite_and_in_the_hull(data, options, items):
    """CrossModalAugmentedDataset items (one at a time and as a batch): finite, in the hull, labels convex."""
    saved = snapshot(data.images)
    wrapped = CrossModalAugmentedDataset(data, BANK, options, target="label", num_classes=C)
    assert len(wrapped) == (2 * N if options.keep_real else N)
    items = [i % len(wrapped) for i in items]
    with no_subprocess():
        one = [wrapped[i] for i in items]
        many = wrapped.__getitems__(items)
    assert_untouched(saved)
    for a, b in zip(one, many):
        assert torch.equal(a["image"], b["image"])  # the batch is the items one at a time
        info = a["mix_info"]
        assert_in_hull(a["image"][None], data.images, index=info["partners"][None], weights=info["weights"][None],
                       rel=1e-4)
        assert_convex_rows(a["label"][None])


@settings(max_examples=examples(0.5))
@given(data=datasets(), options=mix_options(), count=st.integers(1, N))
def test_stream_buffer_emits_every_sample_finite_and_in_the_hull(data, options, count):
    """CandidateBuffer over a stream: one output per sample read (plus the generated ones with keep_real)."""
    stream = [IndexedDataset(data)[i] for i in range(count)]
    saved = snapshot(stream)
    buffer = CandidateBuffer(BANK, options, target="label", num_classes=C)
    with no_subprocess():
        out = list(buffer(iter(stream)))
    assert_untouched(saved)
    real = [o for o in out if not bool(o["mix_info"]["mixed"])] if options.keep_real else out
    assert len(real) == count if options.keep_real else len(out) == count
    assert sorted({int(o["mix_info"]["index"]) for o in out}) == list(range(count))
    for o in out:
        info = o["mix_info"]
        assert_in_hull(o["image"][None], data.images, index=info["partners"][None], weights=info["weights"][None],
                       rel=1e-4)
        assert_convex_rows(o["label"][None])


ENTRY_POINTS = {
    "collate": lambda **kw: CMDACollate(BANK, **kw),
    "module": lambda **kw: CMDAugment(BANK, **kw),
    "dataset": lambda **kw: CrossModalAugmentedDataset(ArrayDataset(torch.zeros(N, 2), [0] * N), BANK, **kw),
    "buffer": lambda **kw: CandidateBuffer(BANK, **kw),
}
ARGUMENTS = ["p", "top_k", "intra", "temperature", "self_weight", "exclude_self", "label_smoothing", "seed",
             "keep_real", "pool_size", "target", "num_classes", "student", "teachers", "fields", "info_key"]


@settings(max_examples=examples())
@given(entry=st.sampled_from(sorted(ENTRY_POINTS)), argument=st.sampled_from(ARGUMENTS), bad=S.bad_scalars())
def test_entry_points_refuse_bad_arguments_by_name(entry, argument, bad):
    """An entry point built with one bad argument: built, or a CMDAError that names the argument."""
    kwargs = {"target": "label", "num_classes": C, argument: bad}
    if argument == "num_classes" and bad is None:
        kwargs["target"] = None
    with no_subprocess():
        expect_cmda_error(lambda: ENTRY_POINTS[entry](**kwargs), [argument])


@settings(max_examples=examples(0.5))
@given(entry=st.sampled_from(["collate", "module", "buffer", "dataset"]),
       bad=st.sampled_from(["meta", "complex", "nan", "string", "missing", "label"]),
       position=st.integers(1, N - 1))
def test_bad_samples_give_a_cmda_error(entry, bad, position):
    """One bad sample (meta / complex / NaN / string image, missing field, huge label): a CMDAError."""
    images = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    samples = [IndexedDataset(ArrayDataset(images, [i % C for i in range(N)]))[i] for i in range(N)]
    options = MixOptions(p=1.0, top_k=3, pool_size=N)

    def spoil(sample: dict) -> dict:
        sample = dict(sample)
        if bad == "missing":
            del sample["image"]
        elif bad == "label":
            sample["label"] = 10 ** 20
        else:
            sample["image"] = {"meta": sample["image"].to("meta"), "complex": sample["image"].to(torch.complex64),
                               "nan": torch.full((2,), float("nan")), "string": "pixels"}[bad]
        return sample

    with no_subprocess():
        try:
            if entry == "collate":
                samples[position] = spoil(samples[position])
                CMDACollate(BANK, options, target="label", num_classes=C)(samples)
            elif entry == "module":
                batch = spoil(default_collate(samples))
                if bad == "label":  # (10 ** 20 has no int64: an out-of-range class instead)
                    batch["label"] = torch.full((N,), 10 ** 18)
                CMDAugment(BANK, options, target="label", num_classes=C)(batch)
            elif entry == "buffer":
                samples[position] = spoil(samples[position])
                list(CandidateBuffer(BANK, options, target="label", num_classes=C)(iter(samples)))
            else:
                samples[position] = spoil(samples[position])
                wrapped = CrossModalAugmentedDataset(ListDataset(samples), BANK, options, target="label",
                                                     num_classes=C)
                [wrapped[i] for i in range(len(wrapped))]
        except CMDAError as error:
            assert "expected" in str(error), str(error)
            if bad == "meta":
                assert isinstance(error, DeviceError), str(error)
        else:
            pytest.fail(f"{entry} accepted a bad sample ({bad})")


class ListDataset(Dataset):
    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        sample = dict(self.samples[i])
        sample.pop("index", None)
        return sample


def test_dataloader_with_workers_loses_nothing_and_starts_no_subprocess():
    """A real DataLoader with two worker processes over extreme samples: every sample out, all finite."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-45, 1e-38, 1.0, 3e38]).repeat(3)[:, None, None, None]
    images = (torch.rand(N, 1, 2, 2, generator=g) - 0.5) * 2 * scale  # |x| <= 3e38: finite in float32
    data = ArrayDataset(images, [i % C for i in range(N)])
    options = MixOptions(p=0.7, top_k=4, keep_real=False)
    collate = CMDACollate(BANK, options, target="label", num_classes=C)
    loader = DataLoader(IndexedDataset(data), batch_size=5, collate_fn=collate, num_workers=2)
    with no_subprocess():
        batches = list(loader)
    seen = torch.cat([b["index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(N))
    for b in batches:
        assert bool(torch.isfinite(b["image"]).all())
        assert_convex_rows(b["label"])
