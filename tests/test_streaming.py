"""cmda_data.io.shards and cmda_data.augment.buffer with real webdataset shards written to tmp_path."""

from __future__ import annotations

import gzip
import io
import pickle
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch

wds = pytest.importorskip("webdataset")

from cmda_data.bank import EmbeddingBank  # noqa: E402
from cmda_data.augment.collate import CMDACollate  # noqa: E402
from cmda_data.augment.dataset import IndexedDataset  # noqa: E402
from cmda_data.exceptions import FieldError, MissingDependencyError, ValidationError  # noqa: E402
from cmda_data.augment.buffer import CandidateBuffer, cmda_mix  # noqa: E402
from cmda_data.io.codec import SafeDecoder, SkipCounter  # noqa: E402
from cmda_data.io.shards import read_shards, write_shards  # noqa: E402
from cmda_data.exceptions import SkippedSamplesWarning  # noqa: E402

N = 14
NUM_CLASSES = 3


def make_data(n: int = N):
    g = torch.Generator().manual_seed(7)
    return [{"image": torch.randn(2, 3, generator=g), "caption": f"sample number {i}", "label": i % NUM_CLASSES,
             "meta": {"i": i, "tags": ["a", "b"]}, "feat64": torch.randn(2, generator=g, dtype=torch.float64),
             "ids": torch.arange(i, i + 3)} for i in range(n)]


def make_bank(n: int = N, responsibilities: bool = False) -> EmbeddingBank:
    g = torch.Generator().manual_seed(3)
    z_img = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    z_txt = torch.nn.functional.normalize(z_img + 0.5 * torch.randn(n, 4, generator=g), dim=1)
    resp = None
    if responsibilities:
        a = torch.rand(n, generator=g)
        resp = torch.stack([a, 1 - a], dim=1)
    return EmbeddingBank({"image": z_img, "text": z_txt}, student="image", teachers="text", responsibilities=resp)


@pytest.fixture
def shards(tmp_path):
    data = make_data()
    paths = write_shards(data, str(tmp_path / "train-%03d.tar"), maxcount=5)
    return data, paths


def read_all(paths, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedSamplesWarning)  # nothing may be skipped here
        return list(read_shards(paths, **kw))


# --------------------------------------------------------------------------- writing / reading
def test_round_trip_keeps_values_dtypes_and_index(shards):
    data, paths = shards
    assert [p.rsplit("/", 1)[1] for p in paths] == ["train-000.tar", "train-001.tar", "train-002.tar"]
    got = read_all(paths)
    assert len(got) == N
    for i, (sample, original) in enumerate(zip(got, data)):
        assert sample["index"] == i
        assert sample["__key__"] == f"{i:09d}"
        for name in ("image", "feat64", "ids"):
            assert sample[name].dtype == original[name].dtype
            assert torch.equal(sample[name], original[name])
        assert sample["caption"] == original["caption"]
        assert sample["label"] == original["label"]
        assert sample["meta"] == original["meta"]


def test_members_are_npy_json_txt_cls_never_pickle(shards):
    _, paths = shards
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    exts = {name.split(".", 1)[1] for name in names}
    assert exts == {"image.npy", "feat64.npy", "ids.npy", "caption.txt", "label.cls", "meta.json", "index.cls"}


def test_indexed_dataset_and_iterable_keep_their_index(tmp_path):
    data = make_data(4)
    indexed = IndexedDataset(data)
    paths = write_shards(indexed, str(tmp_path / "a-%02d.tar"), fields={"image": None, "label": "cls"})
    got = read_all(paths)
    assert [s["index"] for s in got] == [0, 1, 2, 3]
    assert sorted(got[0]) == ["__key__", "__url__", "image", "index", "label"]
    stream = ({**data[i], "index": 10 + i} for i in (2, 0))  # an iterable carrying other indices
    got = read_all(write_shards(stream, str(tmp_path / "b-%02d.tar")))
    assert [s["index"] for s in got] == [12, 10]
    stream = ({**data[i], "index": torch.tensor(20 + i)} for i in (1,))  # a tensor index is an index too
    assert [s["index"] for s in read_all(write_shards(stream, str(tmp_path / "d-%02d.tar")))] == [21]
    tuples = [(d["image"], d["label"]) for d in data[:2]]
    got = read_all(write_shards(tuples, str(tmp_path / "c-%02d.tar"), names=["image", "label"]))
    assert torch.equal(got[1]["image"], data[1]["image"]) and got[1]["index"] == 1


def test_write_shards_errors(tmp_path):
    data = make_data(2)
    with pytest.raises(ValidationError, match="pattern: expected a path with one printf field"):
        write_shards(data, str(tmp_path / "no-field.tar"))
    with pytest.raises(ValidationError, match=r"fields/encoders: expected no pickle-based extension, got \.pyd"):
        write_shards(data, str(tmp_path / "x-%d.tar"), fields={"image": "pyd"})
    with pytest.raises(ValidationError, match="field 'image': expected a tensor with a numpy dtype"):
        write_shards([{"image": torch.zeros(2, dtype=torch.bfloat16)}], str(tmp_path / "y-%d.tar"))
    with pytest.raises(ValidationError, match=r"fields: expected a field name without '\.'"):
        write_shards(data, str(tmp_path / "z-%d.tar"), fields={"a.b": None})
    with pytest.raises(ValidationError, match="sample 0: expected a dict, or a tuple with names="):
        write_shards([(1, 2)], str(tmp_path / "w-%d.tar"))
    with pytest.raises(FieldError, match="field 'nope' of sample 0"):
        write_shards(data, str(tmp_path / "v-%d.tar"), fields={"nope": None})
    with pytest.raises(FieldError, match="field 'index' of sample 0: expected an int dataset index"):
        write_shards(iter([{"image": torch.zeros(2), "index": "a"}]), str(tmp_path / "u-%d.tar"))


def test_custom_encoder_and_image_decoding(tmp_path):
    from PIL import Image

    def png(array):
        stream = io.BytesIO()
        Image.fromarray(array).save(stream, format="PNG")
        return stream.getvalue()

    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    paths = write_shards([{"img": pixels}], str(tmp_path / "p-%d.tar"), fields={"img": "png"}, encoders={"png": png})
    raw = read_all(paths)[0]
    assert isinstance(raw["img"], bytes)  # no image spec: the bytes stay bytes
    got = read_all(paths, decoder=SafeDecoder(image="torchrgb"))[0]["img"]
    assert got.shape == (3, 2, 3) and got.dtype == torch.float32
    assert torch.allclose(got, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    got8 = read_all(paths, decoder=SafeDecoder(image="torchrgb8"))[0]["img"]
    assert torch.equal(got8, torch.from_numpy(pixels).permute(2, 0, 1))


def test_safe_decoder_gz_unknown_and_duplicates():
    decoder = SafeDecoder()
    payload = io.BytesIO()
    np.save(payload, np.array([1.0, 2.0]), allow_pickle=False)
    out = decoder({"__key__": "k", "x.npy.gz": gzip.compress(payload.getvalue()), "blob.bin": b"\x00\x01"})
    assert torch.equal(out["x"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert out["blob"] == b"\x00\x01"
    assert sorted(SafeDecoder(strip=False)({"__key__": "k", "y.cls": b"3"})) == ["__key__", "y.cls"]
    with pytest.raises(ValidationError, match="member 'a.txt' of sample 'k': expected one member per field"):
        decoder({"__key__": "k", "a.cls": b"1", "a.txt": b"one"})
    with pytest.raises(ValidationError, match="image: expected one of"):
        SafeDecoder(image="jpg")
    with pytest.raises(ValidationError, match=r"handlers: expected no decoder for pickle-based extensions, got \.pkl"):
        SafeDecoder(handlers={"pkl": pickle.loads})


# --------------------------------------------------------------------------- corrupt and unsafe members
def write_raw(path, records):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for record in records:
            sink.write(record)


def npy(value) -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.asarray(value), allow_pickle=False)
    return stream.getvalue()


def test_corrupt_members_are_skipped_counted_and_reported(tmp_path):
    good = npy(np.ones(5, dtype=np.float32))
    records = [
        {"__key__": "000", "x.npy": good, "index.cls": b"0"},
        {"__key__": "001", "x.npy": good[:-7], "index.cls": b"1"},  # truncated .npy
        {"__key__": "002", "x.npy": b"garbage, not an npy file", "index.cls": b"2"},
        {"__key__": "003", "x.npy": good, "index.cls": b"not-an-int"},
        {"__key__": "004", "x.npy": good, "index.cls": b"4"},
    ]
    write_raw(tmp_path / "bad-0.tar", records)
    counter = SkipCounter()
    with pytest.warns(SkippedSamplesWarning, match="webdataset: skipped 3 item"):
        got = list(read_shards([str(tmp_path / "bad-0.tar")], counter=counter))
    assert [s["index"] for s in got] == [0, 4]
    assert counter.count == 3
    assert "member 'x.npy' of sample '001': expected a valid .npy member" in counter.errors[0]
    assert "member 'x.npy' of sample '002'" in counter.errors[1]
    assert "member 'index.cls' of sample '003'" in counter.errors[2]
    with pytest.raises(ValidationError, match="member 'x.npy' of sample '001'"):
        list(read_shards([str(tmp_path / "bad-0.tar")], strict=True))


def test_truncated_shard_is_skipped_and_counted(tmp_path, shards):
    _, paths = shards
    blob = open(paths[0], "rb").read()
    cut = tmp_path / "cut-0.tar"
    cut.write_bytes(blob[: len(blob) // 2 + 100])
    counter = SkipCounter()
    with pytest.warns(SkippedSamplesWarning):
        got = list(read_shards([str(cut), paths[1]], counter=counter))
    assert counter.count == 1
    assert "(a truncated shard?)" in counter.errors[0]
    assert [s["index"] for s in got] == [0, 1, 5, 6, 7, 8, 9]  # the second shard is read in full
    assert all(sorted(s) == sorted(got[-1]) for s in got)  # the incomplete sample was skipped


def test_required_fields():
    decoder = SafeDecoder(required=["index", "x"])
    with pytest.raises(ValidationError, match=r"sample 'k': expected the fields index, x, got a sample without x"):
        decoder({"__key__": "k", "index.cls": b"1"})
    with pytest.raises(ValidationError, match="required: expected None, 'consistent' or a sequence"):
        SafeDecoder(required="all")


class _Payload:
    """Unpickling this object opens (creates) a file: a visible side effect."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    probe = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(_Payload(str(probe))))  # the payload is live: unpickling creates a file
    assert probe.exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    records = [{"__key__": f"{i:03d}", "x.npy": npy([float(i)]), "index.cls": str(i).encode(), "evil.pyd": payload,
                "evil2.pickle": payload, "evil3.pth": payload, "evil4.pkl.gz": gzip.compress(payload)}
               for i in range(3)]
    write_raw(tmp_path / "evil-0.tar", records)
    counter = SkipCounter()
    decoder = SafeDecoder(counter=counter)
    with pytest.warns(SkippedSamplesWarning, match="never unpickled"):
        got = list(read_shards([str(tmp_path / "evil-0.tar")], decoder=decoder, counter=counter))
    assert not marker.exists()
    assert [sorted(k for k in s if not k.startswith("__")) for s in got] == [["index", "x"]] * 3
    assert decoder.refused == 12 and counter.count == 12
    # unsafe="error": the whole sample is refused (and counted by the handler), still never unpickled
    strict = SkipCounter()
    with pytest.warns(SkippedSamplesWarning):
        assert list(read_shards([str(tmp_path / "evil-0.tar")], decoder=SafeDecoder(unsafe="error"),
                                counter=strict)) == []
    assert strict.count == 3 and not marker.exists()
    # without a counter the decoder warns once
    with pytest.warns(SkippedSamplesWarning, match="pass counter=SkipCounter"):
        SafeDecoder()({"__key__": "k", "a.pyd": payload})
    assert not marker.exists()


def test_skip_counter_basics():
    counter = SkipCounter("shards", max_errors=1)
    assert counter.summary() == "shards: skipped nothing"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counter.report()  # nothing skipped: silent
    counter(ValueError("a"))
    counter(KeyError("b"))
    assert counter.count == 2 and counter.errors == ["ValueError: a"]
    with pytest.warns(SkippedSamplesWarning, match="shards: skipped 2 item"):
        counter.report()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counter.report()  # warned once for this count
    counter.reset()
    assert counter.count == 0 and counter.errors == []
    assert list(counter.report_at_end(iter([1, 2]))) == [1, 2]


def test_import_does_not_pull_in_webdataset():
    code = "import sys, cmda_data.io.shards, cmda_data.augment.buffer; print('webdataset' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_webdataset_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[webdataset\]'"):
        write_shards(make_data(1), str(tmp_path / "m-%d.tar"))
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[webdataset\]'"):
        read_shards([str(tmp_path / "m-0.tar")])


# --------------------------------------------------------------------------- the candidate buffer
def hand_weights(bank, row, pool, intra, top_k):
    """Eq. 10 (|cos|, row-normalised) x Eq. 11 (soft), top-k, renormalised -- in numpy float64."""
    t = bank.embeddings["text"].double().numpy()[row]
    s = bank.embeddings["image"].double().numpy()[pool]
    cos = np.abs(s @ t / (np.linalg.norm(s, axis=1) * np.linalg.norm(t)))
    w = cos / cos.sum()
    if intra == "soft":
        resp = bank.responsibilities.double().numpy()
        c = resp.argmax(1)
        w = w * (resp[row, c[pool]] + resp[row, c[row]])
    if top_k is not None:
        keep = np.argsort(-w, kind="stable")[:top_k]
        mask = np.zeros_like(w)
        mask[keep] = 1
        w = w * mask
    return w / w.sum()


@pytest.mark.parametrize("intra,top_k", [(None, None), ("soft", 2)])
def test_buffer_mix_is_the_convex_combination_of_bank_weights(shards, intra, top_k):
    data, paths = shards
    bank = make_bank(responsibilities=intra is not None)
    size = 4
    stage = cmda_mix(bank, pool_size=size, top_k=top_k, p=1.0, intra=intra, target="label",
                     num_classes=NUM_CLASSES, seed=5)
    pipeline = read_shards(paths)
    pipeline.append(stage)
    out = list(pipeline)
    assert len(out) == N and [s["index"] for s in out] == list(range(N))
    assert not bool(out[0]["mix_info"]["mixed"])  # empty buffer: only itself, kept as is
    assert torch.equal(out[0]["image"], data[0]["image"])
    for t in (3, 9, N - 1):
        pool = [t] + list(range(max(0, t - size), t))  # itself, then the buffer (oldest first)
        w = hand_weights(bank, t, pool, intra, top_k)
        expect = sum(w[j] * data[p]["image"].double().numpy() for j, p in enumerate(pool))
        info = out[t]["mix_info"]
        assert bool(info["mixed"]) and int(info["index"]) == t
        np.testing.assert_allclose(out[t]["image"].numpy(), expect, rtol=1e-5, atol=1e-6)
        assert out[t]["image"].dtype == torch.float32
        got = {int(p): float(x) for p, x in zip(info["partners"], info["weights"]) if float(x) > 0}
        want = {p: w[j] for j, p in enumerate(pool) if w[j] > 0}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], atol=1e-6)
        soft = np.zeros(NUM_CLASSES)
        for j, p in enumerate(pool):
            soft[data[p]["label"]] += w[j]
        np.testing.assert_allclose(out[t]["label"].numpy(), soft, atol=1e-6)
        assert info["partners"].shape == info["weights"].shape == (stage.k,)
        assert out[t]["caption"] == data[t]["caption"]  # other fields pass through


def test_buffer_is_deterministic_and_follows_seed_epoch_p(shards):
    _, paths = shards
    samples = read_all(paths)
    bank = make_bank()

    def run(**kw):
        stage = CandidateBuffer(bank, pool_size=3, top_k=2, intra=None, **kw)
        return stage, list(stage(iter(samples)))

    _, a = run(p=0.5, seed=1)
    _, b = run(p=0.5, seed=1)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    flags = [bool(s["mix_info"]["mixed"]) for s in a]
    assert any(flags) and not all(flags)
    _, c = run(p=0.5, seed=2)
    assert flags != [bool(s["mix_info"]["mixed"]) for s in c]
    stage = CandidateBuffer(bank, pool_size=3, top_k=2, intra=None, p=0.5, seed=1)
    stage.set_epoch(3)
    assert stage.epoch == 3
    assert flags != [bool(s["mix_info"]["mixed"]) for s in stage(iter(samples))]
    _, identity = run(p=0.0)
    for x, y in zip(identity, samples):
        assert torch.equal(x["image"], y["image"]) and not bool(x["mix_info"]["mixed"])
    # set_p: the same draws as a stage made with that p (the attenuation coefficient)
    stage = CandidateBuffer(bank, pool_size=3, top_k=2, intra=None, p=0.9, seed=1)
    assert stage.p == 0.9 and "p=0.9" in repr(stage)
    stage.set_p(0.5)
    assert stage.p == 0.5
    assert [bool(s["mix_info"]["mixed"]) for s in stage(iter(samples))] == flags
    stage.set_p(0.0)
    assert not any(bool(s["mix_info"]["mixed"]) for s in stage(iter(samples)))
    # the input samples are never modified
    assert all(torch.equal(s["image"], t["image"]) for s, t in zip(samples, read_all(paths)))
    assert "mix_info" not in samples[0]


def test_buffer_exclude_self_and_errors(shards):
    data, paths = shards
    samples = read_all(paths)
    bank = make_bank()
    stage = CandidateBuffer(bank, pool_size=2, top_k=None, p=1.0, intra=None, exclude_self=True)
    out = list(stage(iter(samples)))
    assert not bool(out[0]["mix_info"]["mixed"])  # nothing buffered yet
    partners = out[5]["mix_info"]["partners"]
    assert 5 not in partners.tolist() and set(partners.tolist()) == {3, 4}
    w = hand_weights(bank, 5, [3, 4], None, None)
    np.testing.assert_allclose(out[5]["image"].numpy(), w[0] * data[3]["image"].numpy() + w[1] * data[4]["image"].numpy(),
                               atol=1e-6)
    with pytest.raises(FieldError, match="field 'index' of sample 0 of the stream"):
        list(stage(iter([{"image": torch.zeros(2)}])))
    with pytest.raises(FieldError, match=r"field 'index' of sample 0 of the stream: expected an int dataset index"):
        list(stage(iter([{"image": torch.zeros(2), "index": torch.tensor(True)}])))
    labelled = CandidateBuffer(bank, pool_size=2, p=1.0, intra=None, target="label", num_classes=3)
    with pytest.raises(FieldError, match=r"field 'label' of sample 1: expected a class index in \[0, 3\)"):
        list(labelled(iter([{"image": torch.zeros(2), "index": 0, "label": 0},
                            {"image": torch.ones(2), "index": 1, "label": 7}])))
    with pytest.raises(ValidationError, match="pool_size: expected an integer >= 1"):
        CandidateBuffer(bank, pool_size=0, intra=None)
    with pytest.raises(ValidationError, match="bank: expected an EmbeddingBank"):
        cmda_mix("bank")
    bad = [{"image": torch.zeros(2), "index": 0}, {"image": torch.zeros(3), "index": 1}]
    with pytest.raises(Exception, match="shape"):
        list(CandidateBuffer(bank, pool_size=2, p=1.0, intra=None)(iter(bad)))


# --------------------------------------------------------------------------- CMDACollate as collation_fn
def test_cmda_collate_as_wds_collation_fn(shards):
    data, paths = shards
    bank = make_bank()
    collate = CMDACollate(bank, target="label", num_classes=NUM_CLASSES, p=0.5, intra=None, seed=4)
    pipeline = read_shards(paths, decoder=SafeDecoder())
    pipeline.append(wds.batched(4, collation_fn=collate, partial=True))
    batches = list(pipeline)
    assert [len(b["index"]) for b in batches] == [4, 4, 4, 2]
    samples = read_all(paths)
    indexed = IndexedDataset(data)
    for k, batch in enumerate(batches):
        chunk = samples[4 * k: 4 * k + 4]
        direct = collate(chunk)
        original = collate([indexed[i] for i in range(4 * k, min(4 * k + 4, N))])
        for ref in (direct, original):
            for key in ("image", "label", "index", "feat64"):
                assert torch.equal(batch[key], ref[key]), key
            for key in ("partners", "weights", "mixed"):
                assert torch.equal(batch["mix_info"][key], ref["mix_info"][key]), key
        assert batch["caption"] == direct["caption"]
    assert any(bool(b["mix_info"]["mixed"].any()) for b in batches)


def test_pipeline_in_dataloader_workers(shards):
    _, paths = shards
    bank = make_bank()
    collate = CMDACollate(bank, target="label", num_classes=NUM_CLASSES, p=1.0, intra=None)
    pipeline = read_shards(paths)
    pipeline.append(cmda_mix(bank, pool_size=3, p=0.5, intra=None, info_key="buffer_info"))
    pipeline.append(wds.batched(3, collation_fn=collate))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    seen = sorted(int(i) for batch in loader for i in batch["index"])
    assert seen == list(range(N))  # every shard read once, by one of the two workers
