"""cmda_data.io.shards and cmda_data.augment.buffer with real webdataset shards written to tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch

wds = pytest.importorskip("webdataset")

from cmda_data.augment.buffer import CandidateBuffer, cmda_mix  # noqa: E402
from cmda_data.augment.collate import CMDACollate  # noqa: E402
from cmda_data.augment.dataset import IndexedDataset  # noqa: E402
from cmda_data.bank import EmbeddingBank  # noqa: E402
from cmda_data.exceptions import (  # noqa: E402
    FieldError,
    MissingDependencyError,
    SkippedSamplesWarning,
    ValidationError,
)
from cmda_data.io.codec import SafeDecoder, SkipCounter  # noqa: E402
from cmda_data.io.shards import MANIFEST_SUFFIX, read_manifest, read_shards, write_shards  # noqa: E402

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
    (tmp_path / ("cut-0.tar" + MANIFEST_SUFFIX)).write_bytes(open(paths[0] + MANIFEST_SUFFIX, "rb").read())
    counter = SkipCounter()
    with pytest.warns(SkippedSamplesWarning, match="sample.s. lost or skipped"):
        got = list(read_shards([str(cut), paths[1]], counter=counter))
    assert counter.count in (1, 2)  # the shard cut short (and the incomplete sample at the cut, if any)
    assert "expected 5 samples (its manifest)" in counter.errors[-1] and "(a truncated shard?)" in counter.errors[-1]
    assert [s["index"] for s in got][-5:] == [5, 6, 7, 8, 9]  # the second shard is read in full
    assert len(got) - 5 + counter.samples == 5  # emitted + counted == written
    assert all(sorted(s) == sorted(got[-1]) for s in got)  # no incomplete sample


def test_required_fields():
    decoder = SafeDecoder(required=["index", "x"])
    with pytest.raises(ValidationError, match=r"sample 'k': expected the fields index, x, got a sample without x"):
        decoder({"__key__": "k", "index.cls": b"1"})
    assert decoder({"__key__": "k", "index.cls": b"1", "x.npy.gz": gzip.compress(npy([1.0])), "y.txt": b"extra"})
    for bad in ("all", "consistent", 3):  # fields are never inferred from a sample
        with pytest.raises(ValidationError, match="required: expected None or a sequence of field names"):
            SafeDecoder(required=bad)
        with pytest.raises(ValidationError, match="required: expected None or a list of field names"):
            read_shards(["x.tar"], required=bad)


def test_safe_decoder_non_string_member_name():
    with pytest.raises(ValidationError, match=r"member 5 of sample 'k': expected a member name \(a str"):
        SafeDecoder()({"__key__": "k", 5: b"x", "y.cls": b"1"})
    with pytest.raises(ValidationError, match=r"member: expected a member name \(a str such as 'image.npy'\), got 5"):
        SafeDecoder().decode_one(5, b"x")


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


# --------------------------------------------------------------------------- manifests: nothing lost silently
FIELDS = {"caption", "feat64", "ids", "image", "index", "label", "meta"}


def member_offsets(path):
    """``(header offset, data offset, data end)`` of every member of a tar file."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data, m.offset_data + m.size) for m in tar.getmembers()]


def read_counted(paths, **kw):
    counter = SkipCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSamplesWarning)
        got = list(read_shards(paths, counter=counter, **kw))
    return got, counter


def test_manifest_records_count_fields_and_size(shards):
    _, paths = shards
    for path, count in zip(paths, (5, 5, 4)):
        manifest = read_manifest(path)
        with tarfile.open(path) as tar:
            keys = {name.split(".", 1)[0] for name in tar.getnames()}
        assert manifest["samples"] == count == len(keys)
        assert set(manifest["fields"]) == FIELDS
        assert manifest["bytes"] == os.path.getsize(path)
        assert manifest["shard"] == os.path.basename(path)
    assert read_manifest(paths[0] + ".nothing") is None


def cuts_of(path):
    """Every member boundary (512-byte aligned), and inside each header and each data block."""
    cuts = set()
    for header, start, end in member_offsets(path):
        cuts.update({header, header + 100, start, (start + end) // 2, end, end - 1})
    return sorted(c for c in cuts if 0 <= c < os.path.getsize(path))


def test_a_cut_anywhere_is_counted_or_raised_never_lost(tmp_path, shards):
    _, paths = shards
    blob = open(paths[0], "rb").read()
    manifest = open(paths[0] + MANIFEST_SUFFIX, "rb").read()
    cut = tmp_path / "cut.tar"
    cuts = cuts_of(paths[0])
    assert len(cuts) > 100
    for n in cuts:
        cut.write_bytes(blob[:n])
        (tmp_path / ("cut.tar" + MANIFEST_SUFFIX)).write_bytes(manifest)
        got, counter = read_counted([str(cut)])
        assert len(got) + counter.samples == 5, n  # emitted + counted == written
        assert counter.count >= 1 and "(a truncated shard?)" in " ".join(counter.errors), n
        assert all(set(s) - {"__key__", "__url__"} == FIELDS for s in got), n  # never a sample lacking fields
        assert [s["index"] for s in got] == sorted(s["index"] for s in got)
        with pytest.raises(ValidationError, match=r"shard '.*cut\.tar': expected 5 samples \(its manifest\)"):
            list(read_shards([str(cut)], strict=True))


def test_a_cut_inside_the_first_sample_emits_nothing_incomplete(tmp_path, shards):
    _, paths = shards
    first_sample_end = member_offsets(paths[0])[len(FIELDS) - 1][2]
    (tmp_path / "a.tar").write_bytes(open(paths[0], "rb").read()[: first_sample_end - 600])
    (tmp_path / ("a.tar" + MANIFEST_SUFFIX)).write_bytes(open(paths[0] + MANIFEST_SUFFIX, "rb").read())
    got, counter = read_counted([str(tmp_path / "a.tar")])
    assert got == [] and counter.samples == 5


def test_a_cut_on_a_block_boundary_between_samples_is_found(tmp_path, shards):
    """The case a tar alone cannot show: the archive ends cleanly after sample 2."""
    _, paths = shards
    end = member_offsets(paths[0])[3 * len(FIELDS) - 1][2]
    end += -end % 512
    (tmp_path / "b.tar").write_bytes(open(paths[0], "rb").read()[:end])
    (tmp_path / ("b.tar" + MANIFEST_SUFFIX)).write_bytes(open(paths[0] + MANIFEST_SUFFIX, "rb").read())
    with tarfile.open(tmp_path / "b.tar") as tar:  # python's tarfile reads it without complaint
        assert len(tar.getnames()) == 3 * len(FIELDS)
    with pytest.warns(SkippedSamplesWarning, match="skipped 1 item.s., 2 sample.s. lost or skipped"):
        got = list(read_shards([str(tmp_path / "b.tar")]))
    assert [s["index"] for s in got] == [0, 1, 2]


def test_manifest_errors(tmp_path, shards):
    _, paths = shards
    path = paths[0]
    good = open(path + MANIFEST_SUFFIX).read()
    for text, match in (("{not json", "expected a JSON shard manifest"),
                        (json.dumps({"format": "x"}), "expected a dict with format"),
                        (good.replace('"samples": 5', '"samples": 4.5'), r"key 'samples': expected an integer >= 0"),
                        (good.replace('"fields": [', '"fields": [3, '), r"key 'fields': expected a list")):
        open(path + MANIFEST_SUFFIX, "w").write(text)
        with pytest.raises(ValidationError, match=r"manifest '.*train-000\.tar\.manifest\.json'.*" + match):
            list(read_shards([path]))
    open(path + MANIFEST_SUFFIX, "w").write(good.replace('"samples": 5', '"samples": 3'))
    with pytest.raises(ValidationError, match="expected at most 3 samples .its manifest., got more"):
        list(read_shards([path]))
    open(path + MANIFEST_SUFFIX, "w").write(good.replace('"samples": 5', '"samples": 7'))
    got, counter = read_counted([path])
    assert len(got) == 5 and counter.samples == 2  # two samples the shard should have and lacks
    open(path + MANIFEST_SUFFIX, "w").write(good)
    with pytest.raises(ValidationError, match=r"required: expected fields that the manifest of shard .* lists "
                                              r"\(caption, .*\), got nope"):
        list(read_shards([path], required=["image", "nope"]))
    assert len(read_all([path], required=["image", "index"])) == 5
    os.remove(path)  # a shard listed in its manifest that is gone: its samples are lost, and counted
    got, counter = read_counted([path, paths[1]])
    assert len(got) == 5 and counter.samples == 5 and "no file where its manifest says" in counter.errors[0]


def test_required_fields_come_from_the_manifest_or_the_caller_never_sample_0(tmp_path):
    x = npy(np.ones(2, dtype=np.float32))
    extra_first = [{"__key__": f"{i:03d}", "x.npy": x, "index.cls": str(i).encode(), **({"extra.txt": b"!"} if i == 0 else {})}
                   for i in range(6)]
    write_raw(tmp_path / "extra-0.tar", extra_first)  # another tool's shard: no manifest
    assert [s["index"] for s in read_all([str(tmp_path / "extra-0.tar")])] == list(range(6))  # nothing dropped
    assert [s["index"] for s in read_all([str(tmp_path / "extra-0.tar")], required=["x", "index"])] == list(range(6))
    missing = [dict(r) for r in extra_first]
    del missing[3]["x.npy"]
    write_raw(tmp_path / "missing-0.tar", missing)
    got, counter = read_counted([str(tmp_path / "missing-0.tar")], required=["x", "index"])
    assert [s["index"] for s in got] == [0, 1, 2, 4, 5] and counter.samples == 1  # that sample only
    assert "sample '003' of shard" in counter.errors[0] and "got a sample without x" in counter.errors[0]
    # write_shards: sample 0 with an extra field, sample 3 without one
    data = [{"x": torch.ones(2), "label": i, **({"extra": "!"} if i == 0 else {})} for i in range(6)]
    del data[3]["label"]
    paths = write_shards(iter(data), str(tmp_path / "w-%d.tar"))
    assert read_manifest(paths[0])["fields"] == ["index", "x"]  # the fields every sample has
    got = read_all(paths)
    assert [s["index"] for s in got] == list(range(6)) and got[0]["extra"] == "!"


def test_shards_of_other_tools_without_a_manifest(tmp_path):
    records = [{"__key__": f"{i:03d}", "x.npy": npy([float(i)] * 300), "index.cls": str(i).encode()} for i in range(4)]
    write_raw(tmp_path / "other-0.tar", records)
    path = str(tmp_path / "other-0.tar")
    assert [s["index"] for s in read_all([path])] == [0, 1, 2, 3]
    offsets = member_offsets(path)
    blob = open(path, "rb").read()
    (tmp_path / "in-member.tar").write_bytes(blob[: (offsets[4][1] + offsets[4][2]) // 2])  # inside sample 2's .npy
    got, counter = read_counted([str(tmp_path / "in-member.tar")])
    assert [s["index"] for s in got] == [0, 1] and counter.damaged == 1 and counter.samples == 0
    assert "it has no manifest, so how many samples were lost is unknown" in counter.errors[0]
    with pytest.raises(ValidationError, match="expected a complete tar archive, got ReadError"):
        list(read_shards([str(tmp_path / "in-member.tar")], strict=True))
    (tmp_path / "boundary.tar").write_bytes(blob[: offsets[5][0]])  # after x.npy of sample 2: index.cls gone
    assert len(read_all([str(tmp_path / "boundary.tar")])) == 3  # undetectable without a manifest ...
    got, counter = read_counted([str(tmp_path / "boundary.tar")], required=["x", "index"])
    assert [s["index"] for s in got] == [0, 1] and counter.samples == 1  # ... but no sample lacks a declared field


# --------------------------------------------------------------------------- no URL is executed
@pytest.fixture
def no_process(monkeypatch):
    """Patch every way webdataset starts a process; the list records attempts."""
    started = []

    def refuse(*args, **kwargs):
        started.append(args)
        raise AssertionError(f"a process was started: {args}")

    import webdataset.gopen as _unused  # noqa: F401  (the module, for its Popen)
    gopen_module = sys.modules["webdataset.gopen"]
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(gopen_module, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "popen", refuse)
    return started


@pytest.mark.parametrize("url", ["pipe:touch {marker}", "PIPE:touch {marker}", "http://127.0.0.1:9/a.tar",
                                 "s3://bucket/a.tar", "gs://b/a.tar", "hf://x/a.tar", "ais://x/a.tar"])
def test_urls_that_start_a_process_are_refused(tmp_path, shards, no_process, url):
    _, paths = shards
    marker = tmp_path / "marker"
    url = url.format(marker=marker)
    with pytest.raises(ValidationError, match=r"urls: expected a local path or a file: URL \(allow_pipe=True .*got "
                                              + repr(url).replace("(", r"\(").replace(".", r"\.")):
        list(read_shards(url))
    with pytest.raises(ValidationError, match="allow_pipe=True"):
        list(read_shards([paths[0], url]))  # refused before anything is read
    with pytest.raises(ValidationError, match=r"pattern: expected a local path or a file: URL"):
        write_shards(make_data(2), url + "-%d.tar")
    assert not no_process and not marker.exists()
    assert not list(tmp_path.glob("*-0.tar"))


def test_brace_patterns_file_urls_and_paths_are_read_without_a_process(tmp_path, shards, no_process):
    _, paths = shards
    folder = os.path.dirname(paths[0])
    assert len(read_all(os.path.join(folder, "train-{000..002}.tar"))) == N
    assert len(read_all(["file:" + paths[0], "file://" + paths[1], type(tmp_path)(paths[2])])) == N
    with pytest.raises(ValidationError, match="allow_pipe"):
        read_shards(os.path.join(folder, "train-{000..001}.tar") + "::pipe:cat x")
    got = read_all(write_shards(make_data(3), "file:" + str(tmp_path / "f-%d.tar")))
    assert len(got) == 3 and read_manifest(str(tmp_path / "f-0.tar"))["samples"] == 3
    assert not no_process


def test_allow_pipe_is_the_explicit_opt_in(tmp_path, shards):
    _, paths = shards
    got = read_all([f"pipe:cat {paths[0]}"], allow_pipe=True)  # the caller's own command, on purpose
    assert [s["index"] for s in got] == [0, 1, 2, 3, 4]
    written = write_shards(make_data(2), f"pipe:cat > {tmp_path}/p-%d.tar", allow_pipe=True)
    assert written == [f"pipe:cat > {tmp_path}/p-0.tar"] and not os.path.exists(f"{tmp_path}/p-0.tar" + MANIFEST_SUFFIX)
    assert len(read_all([str(tmp_path / "p-0.tar")])) == 2
    with pytest.raises(ValidationError, match="allow_pipe: expected True or False"):
        read_shards(paths, allow_pipe="yes")


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
