"""Fuzzed webdataset shards: nothing lost silently, no sample without its fields, no URL executed.

Shards are written by ``write_shards`` to a temporary folder, then damaged: cut at member
boundaries (512-byte aligned), inside headers, inside data or anywhere; members added to or
removed from samples. The properties (issue 14):

* samples emitted + ``counter.samples`` (skipped or lost) == samples written, or
  (``strict=True``) a ``CMDAError`` naming the shard;
* every emitted sample has every declared field, with the value that was written;
* an extra member changes nothing, a missing one skips that sample only;
* a URL with a scheme other than ``file:`` is refused with a ``CMDAError`` naming it, and no
  process is started (the harness's ``no_subprocess`` patches ``subprocess.Popen``, ``os.system``
  ... and webdataset's own ``Popen`` to refuse);
* ``SafeDecoder`` turns any member name and any bytes into a value or a ``CMDAError``.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile

import pytest
import strategies as S
import torch
from fuzz_harness import expect_cmda_error, no_subprocess
from hypothesis import given
from hypothesis import strategies as st

wds = pytest.importorskip("webdataset")

from test_streaming import member_offsets, read_counted  # noqa: E402  (the same shard helpers)

from cmda_data.io.codec import SafeDecoder, encode_field  # noqa: E402
from cmda_data.io.shards import MANIFEST_SUFFIX, read_shards, write_shards  # noqa: E402

SCHEMES = ("pipe", "PIPE", "http", "https", "s3", "gs", "hf", "ais", "sftp", "scp", "ftps", "htgs", "ftp", "data")


def assert_as_written(sample, original, fields):
    assert set(fields) | {"index"} <= set(sample), f"sample {sample.get('__key__')} lacks a field"
    for name in fields:
        if name == "image":
            assert sample[name].dtype == original[name].dtype and torch.equal(sample[name], original[name])
        else:
            assert sample[name] == original[name], name


@given(S.shard_samples(), st.integers(1, 4), st.data())
def test_a_cut_shard_loses_nothing_silently(drawn, maxcount, data):
    """A shard cut anywhere: emitted + counted == written, or a CMDAError (strict); no field missing."""
    samples, fields = drawn
    with tempfile.TemporaryDirectory() as folder, no_subprocess():
        paths = write_shards(samples, os.path.join(folder, "s-%03d.tar"), maxcount=maxcount)
        victim = data.draw(st.sampled_from(paths), label="shard")
        size = os.path.getsize(victim)
        cut = data.draw(S.cut_points(size, member_offsets(victim)), label="cut")
        with open(victim, "r+b") as stream:
            stream.truncate(cut)
        got, counter = read_counted(paths)
        assert len(got) + counter.samples == len(samples)
        assert counter.count >= 1 and counter.damaged == 0  # the cut is reported (every shard has a manifest)
        indices = [s["index"] for s in got]
        assert len(set(indices)) == len(indices) and indices == sorted(indices)
        for sample in got:
            assert_as_written(sample, samples[sample["index"]], fields)
        ok, error = expect_cmda_error(lambda: list(read_shards(paths, strict=True)), ["shard"])
        assert not ok and repr(victim) in str(error)


@given(S.shard_samples(), st.booleans(), st.data())
def test_extra_members_change_nothing_and_a_missing_member_skips_its_sample_only(drawn, manifest, data):
    """Extra members are kept, a sample without a declared field is skipped and counted; with or without a manifest."""
    samples, fields = drawn
    declared = sorted(set(fields) | {"index"})
    extra, missing = data.draw(S.member_edits(len(samples), declared), label="edits")
    with tempfile.TemporaryDirectory() as folder, no_subprocess():
        path = write_shards(samples, os.path.join(folder, "s-%03d.tar"), maxcount=len(samples))[0]
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:  # the same shard, edited
            for name, payload in members:
                key, field = name.split(".")[:2]
                if field in missing.get(int(key), ()):
                    continue
                tar.addfile(_info(name, payload), io.BytesIO(payload))
                if int(key) in extra and field == declared[-1]:
                    tar.addfile(_info(f"{key}.zextra.bin", b"!"), io.BytesIO(b"!"))
        if not manifest:
            os.remove(path + MANIFEST_SUFFIX)
        got, counter = read_counted([path], **({} if manifest else {"required": declared}))
        assert [s["index"] for s in got] == [i for i in range(len(samples)) if i not in missing]
        assert counter.samples == len(missing) and len(got) + counter.samples == len(samples)
        for sample in got:
            assert_as_written(sample, samples[sample["index"]], fields)
            assert ("zextra" in sample) == (sample["index"] in extra)


def _info(name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info


@given(st.sampled_from(SCHEMES) | st.from_regex(r"[A-Za-z][A-Za-z0-9+.\-]{1,7}", fullmatch=True).filter(
    lambda scheme: scheme.lower() != "file"), st.text(max_size=40))
def test_a_url_with_a_scheme_is_refused_and_nothing_is_started(scheme, rest):
    """pipe:, http:, s3: ... URLs raise a CMDAError naming the URL; no process is started."""
    url = f"{scheme}:{rest}"
    with tempfile.TemporaryDirectory() as folder, no_subprocess():
        ok, error = expect_cmda_error(lambda: list(read_shards([url])), ["urls"])
        assert not ok and repr(url) in str(error)
        ok, error = expect_cmda_error(lambda: read_shards([os.path.join(folder, "a.tar"), url]), ["urls"])
        assert not ok
        ok, error = expect_cmda_error(lambda: write_shards([{"x": 1}], url + "-%d.tar"), ["pattern"])
        assert not ok and repr(url + "-%d.tar") in str(error)
        assert os.listdir(folder) == []


MEMBER_VALUES = st.one_of(
    st.tuples(st.just("x"), st.builds(torch.tensor, st.lists(st.floats(-1e6, 1e6, width=32), max_size=5))),
    st.tuples(st.just("label"), st.integers(-(2 ** 40), 2 ** 40)),
    st.tuples(st.just("caption"), st.text(max_size=20)),
    st.tuples(st.just("meta"), st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=3)),
)


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # numpy parsing a damaged header
@given(MEMBER_VALUES, st.sampled_from(["", ".gz"]), st.data())
def test_safe_decoder_gives_a_value_or_a_cmda_error_for_any_damage(field_value, gz, data):
    """A member truncated or with a flipped byte decodes to a value or raises a CMDAError naming the member."""
    name, value = field_value
    ext, payload = encode_field(name, value, None)
    payload = gzip.compress(payload, mtime=0) if gz else payload
    if payload:
        where = data.draw(st.integers(0, len(payload) - 1), label="where")
        if data.draw(st.booleans(), label="truncate"):
            payload = payload[:where]
        else:
            payload = payload[:where] + bytes([payload[where] ^ data.draw(st.integers(1, 255))]) + payload[where + 1:]
    member = f"{name}.{ext}{gz}"
    with no_subprocess():
        ok, out = expect_cmda_error(lambda: SafeDecoder()({"__key__": "k", member: payload}), [f"member {member!r}"])
    if ok:
        assert set(out) == {"__key__", name}


@given(st.one_of(st.integers(), st.binary(max_size=4), st.none(), st.floats(allow_nan=False),
                 st.tuples(st.integers())))
def test_safe_decoder_refuses_member_names_that_are_not_str(key):
    """A member name that is not a str raises a CMDAError naming it (it was an AttributeError)."""
    ok, error = expect_cmda_error(lambda: SafeDecoder()({"__key__": "k", key: b"1", "y.cls": b"2"}), ["member"])
    assert not ok and f"member {key!r}" in str(error)

