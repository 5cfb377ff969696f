"""torch.distributed helpers: ranks, rank-aware seeds, a sharded bank build, ``set_epoch``.

Everything works without an initialised process group (then this process is rank 0 of 1
and the helpers fall back to single-process behaviour). Nothing here pickles: tensors
travel with ``dist.all_gather`` / ``dist.broadcast`` (padded to equal sizes), settings as
JSON bytes in a ``uint8`` tensor.

* :func:`get_rank`, :func:`get_world_size`, :func:`is_distributed`.
* :func:`rank_seed`, :func:`rank_generator`: seeds from ``(seed, epoch, rank)`` with the
  splitmix64 hash the entry points use for ``(seed, epoch, rank, index)``. The entry
  points (:class:`~cmda_data.CMDACollate`, :class:`~cmda_data.CrossModalAugmentedDataset`,
  :class:`~cmda_data.CMDAugment`, :class:`~cmda_data.CandidateBuffer`) take this
  process's rank by default (``rank=None``), so ranks draw differently for the same index.
* :func:`shard_indices`: the interleaved indices of a rank (``rank::world_size``, no padding).
* :func:`build_bank_distributed`: each rank embeds its shard, the embeddings are
  all-gathered, rank ``src`` fits the Gaussian mixture and broadcasts the bank: every rank
  ends with the same bank, equal to a single-process :meth:`EmbeddingBank.build`.
* :func:`set_epoch`: one call per epoch for samplers, datasets, collate functions, pipelines.

Examples:
    >>> get_rank(), get_world_size()
    (0, 1)
    >>> shard_indices(5, rank=1, world_size=2)
    tensor([1, 3])
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .bank._bank import EmbeddingBank
from .bank._build import embed_dataset
from .bank._fit import gmm_from_state, gmm_state
from .core._seeding import get_rank, get_world_size, hash_ints, is_distributed
from .core._validation import check_int, fail
from .exceptions import CMDAError, ShapeError

__all__ = [
    "all_gather_rows",
    "broadcast_bank",
    "build_bank_distributed",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "rank_generator",
    "rank_seed",
    "set_epoch",
    "shard_indices",
]

_STREAM_RANK = 0x5EED_0002  # stream tag of rank seeds (the entry points' row streams use 0x5EED_0001)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 6


# --------------------------------------------------------------------------- ranks and seeds
def _resolve_rank(rank: Optional[int]) -> int:
    return get_rank() if rank is None else check_int("rank", rank, minimum=0)


def rank_seed(seed: int, *, epoch: int = 0, rank: Optional[int] = None) -> int:
    """A 64-bit seed from ``(seed, epoch, rank)`` (rank: this process's when None).

    Same hash (splitmix64 over the integers, never Python's salted ``hash``) as the
    entry points' per-row streams, with its own stream tag so the two never coincide.

    Examples:
        >>> rank_seed(0, epoch=1, rank=0) == rank_seed(0, epoch=1, rank=0)
        True
        >>> rank_seed(0, epoch=1, rank=0) == rank_seed(0, epoch=1, rank=1)
        False
    """
    seed = check_int("seed", seed)
    epoch = check_int("epoch", epoch, minimum=0)
    return hash_ints(_STREAM_RANK, seed, epoch, _resolve_rank(rank))


def rank_generator(seed: int, *, epoch: int = 0, rank: Optional[int] = None,
                   device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`rank_seed` (for your own per-rank draws).

    Examples:
        >>> a = torch.rand(2, generator=rank_generator(0, rank=0))
        >>> bool(torch.equal(a, torch.rand(2, generator=rank_generator(0, rank=0))))
        True
        >>> bool(torch.equal(a, torch.rand(2, generator=rank_generator(0, rank=1))))
        False
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(rank_seed(seed, epoch=epoch, rank=rank))
    return generator


def shard_indices(n: int, *, rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """Dataset indices of one rank: ``rank, rank + world_size, ...`` (interleaved, no padding).

    Like ``DistributedSampler(shuffle=False)`` but without the padding duplicates: the
    shards of all ranks are disjoint and cover ``range(n)`` exactly once.

    Examples:
        >>> [shard_indices(5, rank=r, world_size=3).tolist() for r in range(3)]
        [[0, 3], [1, 4], [2]]
    """
    n = check_int("n", n, minimum=0)
    world_size = get_world_size() if world_size is None else check_int("world_size", world_size, minimum=1)
    rank = _resolve_rank(rank)
    if rank >= world_size:
        fail("rank", f"an integer in [0, {world_size})", rank)
    return torch.arange(rank, max(n, rank), world_size, dtype=torch.long)


def set_epoch(epoch: int, *objects: Any) -> List[Any]:
    """Call ``set_epoch(epoch)`` on every object that has it; return those objects.

    A ``DataLoader`` is searched too: its sampler (``DistributedSampler``), its batch
    sampler's sampler, its dataset (:class:`~cmda_data.CrossModalAugmentedDataset`, a
    ``wds.DataPipeline`` whose stages have ``set_epoch``) and its ``collate_fn``
    (:class:`~cmda_data.CMDACollate`). Call it before ``iter(loader)`` every epoch.

    Examples:
        >>> from torch.utils.data import DataLoader, DistributedSampler
        >>> sampler = DistributedSampler(range(8), num_replicas=2, rank=0)
        >>> loader = DataLoader(range(8), sampler=sampler, batch_size=2)
        >>> [type(o).__name__ for o in set_epoch(3, loader)], sampler.epoch
        (['DistributedSampler'], 3)
    """
    epoch = check_int("epoch", epoch, minimum=0)
    found: List[Any] = []
    seen: set = set()

    def visit(obj: Any) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            found.append(obj)
        if isinstance(obj, torch.utils.data.DataLoader):
            batch_sampler = getattr(obj, "batch_sampler", None)
            for part in (obj.sampler, batch_sampler, getattr(batch_sampler, "sampler", None), obj.dataset,
                         obj.collate_fn):
                visit(part)
        for stage in getattr(obj, "pipeline", None) or ():  # webdataset DataPipeline stages
            visit(stage)

    for obj in objects:
        visit(obj)
    if objects and not found:
        fail("objects", "at least one object with set_epoch (a sampler, dataset, collate_fn or DataLoader)",
             list(objects))
    return found


# --------------------------------------------------------------------------- collectives
def _comm_device(group: Any = None) -> torch.device:
    """Where collective tensors live: CUDA for NCCL, the CPU otherwise."""

    if str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe_shape(tensor: torch.Tensor) -> torch.Tensor:
    """``[ndim, dtype code, size 0, ..., size 5]`` (-1 padded) as int64."""
    if tensor.ndim < 1 or tensor.ndim > _MAX_DIMS:
        fail("tensor", f"a tensor with 1 to {_MAX_DIMS} dimensions", tensor, ShapeError)
    if tensor.dtype not in _DTYPES:
        fail("tensor", "a tensor of dtype " + ", ".join(str(d) for d in _DTYPES), tensor)
    sizes = list(tensor.shape) + [-1] * (_MAX_DIMS - tensor.ndim)
    return torch.tensor([tensor.ndim, _DTYPES.index(tensor.dtype)] + sizes, dtype=torch.long)


def all_gather_rows(tensor: torch.Tensor, *, group: Any = None) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (any number of rows, same trailing shape and dtype), rank order.

    Rows are padded to the largest count for ``dist.all_gather`` and cut back; no pickle.
    Without a process group this returns ``[tensor]``. Results are on the CPU.

    Examples:
        >>> all_gather_rows(torch.ones(2, 3))[0].shape
        torch.Size([2, 3])
    """
    if not isinstance(tensor, torch.Tensor):
        fail("tensor", "a torch.Tensor", tensor)
    if get_world_size(group) == 1:
        return [tensor.detach().cpu()]

    device = _comm_device(group)
    world = get_world_size(group)
    meta = _describe_shape(tensor).to(device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = [m.cpu() for m in metas]
    first = metas[0]
    for rank, other in enumerate(metas):
        if not torch.equal(other[:2], first[:2]) or not torch.equal(other[3:], first[3:]):
            fail("all_gather_rows", "the same dtype and trailing shape on every rank",
                 f"rank 0: {first.tolist()}, rank {rank}: {other.tolist()} ([ndim, dtype, sizes])",
                 ShapeError, raw=True)
    counts = [int(m[2]) for m in metas]
    padded = torch.zeros((max(counts),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [part[:count].cpu() for part, count in zip(parts, counts)]


def _broadcast_bytes(data: Optional[bytes], *, src: int, group: Any) -> bytes:
    """Broadcast a byte string from ``src`` (others pass None) as a uint8 tensor."""

    device = _comm_device(group)
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=group)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if data is not None:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=src, group=group)
    return bytes(buffer.cpu().numpy().tobytes())


def _bank_payload(bank: Any) -> tuple:
    """``(header dict, tensors dict)`` describing a bank (JSON-safe header, CPU tensors)."""
    tensors: Dict[str, torch.Tensor] = dict(bank._tensors())
    gmm_config, gmm_tensors = gmm_state(bank.gmm)
    tensors.update({f"gmm.{k}": v for k, v in gmm_tensors.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"student": bank.student, "teachers": list(bank.teachers), "modalities": list(bank.modalities),
              "gmm": gmm_config, "metadata": bank.metadata,
              "tensors": [[k, str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in tensors.items()]}
    return header, tensors


def _broadcast_bank(bank: Any, error: Optional[BaseException], *, src: int, group: Any) -> Any:
    """Broadcast ``bank`` (or ``error``) from ``src``; every rank returns the bank or raises."""

    rank = get_rank()  # global rank: src is global too
    header: Optional[Dict[str, Any]] = None
    tensors: Dict[str, torch.Tensor] = {}
    data = None
    if rank == src:
        if error is None:
            try:
                header, tensors = _bank_payload(bank)
                data = json.dumps(header).encode("utf-8")
            except Exception as caught:  # e.g. metadata that is not JSON: tell the others, then raise
                error = caught
        if error is not None:
            data = json.dumps({"error": f"{type(error).__name__}: {error}"}).encode("utf-8")
    received = json.loads(_broadcast_bytes(data, src=src, group=group).decode("utf-8"))
    if "error" in received:
        if rank == src and error is not None:
            raise error
        fail("build_bank_distributed", f"a bank from rank {src}", f"a failure there: {received['error']}",
             CMDAError, raw=True)
    device = _comm_device(group)
    out: Dict[str, torch.Tensor] = {}
    for name, dtype, shape in received["tensors"]:
        if rank == src:
            buffer = tensors[name].to(device)
        else:
            buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(buffer, src=src, group=group)
        out[name] = buffer.cpu()
    if rank == src:
        return bank
    gmm = gmm_from_state(received.get("gmm"), {k[4:]: v for k, v in out.items() if k.startswith("gmm.")})
    pca = (out["pca.mean"], out["pca.components"]) if "pca.mean" in out else None
    return EmbeddingBank({m: out[f"embeddings.{m}"] for m in received["modalities"]}, student=received["student"],
                         teachers=received["teachers"], responsibilities=out.get("responsibilities"), gmm=gmm,
                         indices=out.get("indices"), pca=pca, metadata=received.get("metadata"))


def broadcast_bank(bank: Any = None, *, src: int = 0, group: Any = None) -> Any:
    """Send the :class:`~cmda_data.EmbeddingBank` of rank ``src`` to every rank (no pickle).

    Rank ``src`` passes its bank (and gets it back); the others pass None and get an
    equal bank (embeddings, responsibilities, the fitted GMM's tensors, PCA, metadata).
    Without a process group the bank is returned as is. ``src`` is a global rank.
    """
    if get_world_size(group) == 1:
        if not isinstance(bank, EmbeddingBank):
            fail("bank", "an EmbeddingBank", bank)
        return bank
    error = None
    if get_rank() == src and not isinstance(bank, EmbeddingBank):
        error = CMDAError(f"bank: expected an EmbeddingBank on rank {src}, got {type(bank).__name__}")
    return _broadcast_bank(bank, error, src=src, group=group)


# --------------------------------------------------------------------------- the sharded build
def build_bank_distributed(dataset: Any, aligner: Any, *, student: str, teachers: Union[str, Sequence[str]],
                           fields: Optional[Dict[str, Union[str, int]]] = None, batch_size: int = 256,
                           device: Optional[Union[str, torch.device]] = None, progress: bool = False,
                           src: int = 0, group: Any = None, **options: Any) -> Any:
    """:meth:`EmbeddingBank.build` with the embedding work split across ranks.

    Rank ``r`` embeds :func:`shard_indices` (``r::world_size``, no duplicates); the
    embeddings are all-gathered (padded ``dist.all_gather`` of tensors, never pickle) into
    the full table on every rank; rank ``src`` fits the Gaussian mixture
    (:meth:`EmbeddingBank.from_embeddings` with ``options``) and broadcasts
    responsibilities and GMM parameters. Every rank returns the same bank, equal to a
    single-process ``EmbeddingBank.build`` with the same settings. A failure on any rank is
    raised on every rank (no hang). Without a process group this is ``EmbeddingBank.build``.

    Call it on every rank with the same arguments (a collective call).

    Args:
        dataset: as in :meth:`EmbeddingBank.build`.
        aligner: as in :meth:`EmbeddingBank.build`.
        student: as in :meth:`EmbeddingBank.build`.
        teachers: as in :meth:`EmbeddingBank.build`.
        fields: as in :meth:`EmbeddingBank.build`.
        batch_size: as in :meth:`EmbeddingBank.build`.
        device: where this rank's batches go (as in :meth:`EmbeddingBank.build`).
        progress: as in :meth:`EmbeddingBank.build`.
        src: the (global) rank that fits the GMM.
        group: the process group (default: the world).
        **options: :meth:`EmbeddingBank.from_embeddings` options (``n_components``,
            ``fit_on``, ``reduce_dim``, ``fit_gmm``, ``random_state``, GMM settings).

    Examples:
        >>> from cmda_data.aligners import PrecomputedAligner
        >>> z = torch.nn.functional.normalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> aligner = PrecomputedAligner({"image": z, "text": z})
        >>> bank = build_bank_distributed(range(6), aligner, student="image", teachers="text", fit_gmm=False)
        >>> len(bank), bank.dim
        (6, 3)
    """
    world = get_world_size(group)
    if world == 1:
        return EmbeddingBank.build(dataset, aligner, student=student, teachers=teachers, fields=fields,
                                   batch_size=batch_size, device=device, progress=progress, **options)

    rank = get_rank(group)
    roles = [student] + ([teachers] if isinstance(teachers, str) else list(teachers))
    roles = list(dict.fromkeys(roles))  # the bank reports duplicates; keep the exchange well-formed
    error: Optional[BaseException] = None
    n, local = -1, None
    try:
        n = len(dataset)
        mine = shard_indices(n, rank=rank, world_size=world)
        if len(mine):
            local, _ = embed_dataset(dataset, aligner, roles, fields=fields, batch_size=batch_size, device=device,
                                     progress=progress, indices=mine.tolist())
    except Exception as caught:  # reported to every rank below, then raised here
        error = caught
    width = next(iter(local.values())).shape[1] if local else 0
    status = torch.tensor([0 if error is None else 1, n, width], dtype=torch.long, device=_comm_device(group))
    statuses = [torch.empty_like(status) for _ in range(world)]
    dist.all_gather(statuses, status, group=group)
    statuses = [s.cpu().tolist() for s in statuses]
    failed = [r for r, s in enumerate(statuses) if s[0]]
    if failed:
        if error is not None:
            raise error
        fail("build_bank_distributed", "every rank to embed its shard",
             f"a failure on rank(s) {failed} (see the error raised there)", CMDAError, raw=True)
    if len({s[1] for s in statuses}) != 1:
        fail("dataset", "the same length on every rank", f"lengths {[s[1] for s in statuses]} by rank",
             ShapeError, raw=True)
    widths = {s[2] for s in statuses if s[2] > 0}
    if len(widths) > 1:
        fail("aligner", "the same embedding dimension on every rank", f"{[s[2] for s in statuses]} by rank",
             ShapeError, raw=True)
    d = widths.pop() if widths else 0
    packed = torch.cat([local[m] for m in roles], dim=1) if local else torch.zeros(0, d * len(roles))
    parts = all_gather_rows(packed.float(), group=group)
    del packed, local
    # each rank's rows go straight into one [n, d] table per modality, and its part is dropped at
    # once: at most the gathered parts + the tables (2x the embeddings), no third full copy
    embeddings = {m: torch.empty(n, d) for m in roles}
    for r in range(len(parts)):
        part, parts[r] = parts[r], None
        rows = shard_indices(n, rank=r, world_size=world)
        for i, m in enumerate(roles):
            embeddings[m][rows] = part[:, i * d:(i + 1) * d]
        del part
    bank, error = None, None
    if get_rank() == src:
        try:
            bank = EmbeddingBank.from_embeddings(embeddings, student=student, teachers=teachers, **options)
        except Exception as caught:  # every rank raises, none waits for a bank that never comes
            error = caught
    return _broadcast_bank(bank, error, src=src, group=group)
