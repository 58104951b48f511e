"""The teacher cache: each round's teacher hidden states on disk (or any fsspec URL), sorted by teacher.

Why hidden states and not logits: a token's last-layer state is `hidden` numbers where its logits
are `vocab` (1024 vs 152k for Qwen2-7B), so the cache is ~100x smaller; the loss rebuilds logits a
chunk at a time with the teacher's LM head (`distill.heads`).

A round's samples are split into optimizer steps, and within a step sorted by teacher: training
walks (step, teacher) groups in order, so each teacher head is loaded once per step while every step
still sees every domain. With one step per round (the default) that is once per round.

Layout of one round (`root` is a local directory or an fsspec URL such as `s3://b/opd` or `memory://x`):

    <root>/round_000003/index.json                        written last: a round without it does not exist
    <root>/round_000003/shard_00000_s000_t000.safetensors one (step, teacher) group per shard
        hidden     [rows, hidden_t]  bf16 (cache dtype)  row i of a sample predicts its i-th trained token
        input_ids  [tokens]          int32               prompt + response of every sample, concatenated
        loss_mask  [tokens]          uint8               1 on the response tokens the student sampled
                                                         (the trained ones): 0 on the prompt, on an agent
                                                         episode's tool results, on forced `</think>`

Only trained tokens have a state: the teacher reads a whole agent episode (tool results included,
as context) but the student is distilled only on what it wrote, so the tool output, often most of
an episode, costs one byte a token rather than a state.

index.json holds the round id, the policy the rollouts were sampled from, the teachers (with the domains
each answers for), and per shard (listed in (step, teacher) order) its file, step, teacher, byte size,
sha256, and per sample its id, domain, prompt length and offsets into `hidden` (its trained tokens)
and into `input_ids` and `loss_mask`. Every file is written under a temporary name and renamed into
place, so a reader sees a whole file or none.

Nothing in a round is trusted, the index included. Each shard entry carries the sha256 of its own
canonical JSON and the index the sha256 of the rest, so an edited or corrupt entry is named; the
reader then checks the index's structure before reading anything (file names are plain shard names
inside the round directory, teachers in range, each sample's offsets contiguous and inside its shard,
row counts consistent, each domain one its teacher answers for) and each shard's size, sha256,
tensor shapes and loss mask (0 on every prompt, as many 1s as the sample has rows) against its
entry when it is read. Any mismatch is a `CacheError` naming the shard.
It refuses a round whose id or policy is not the one being trained, so training never reads stale
(off-policy) rollouts.

Shortcuts, admitted: files are not fsync'ed; a power cut can leave a short shard, which the checksum
then rejects rather than trains on. The checksums catch corruption and careless edits, not a writer
who recomputes them: against that, the structural checks keep every read inside the round's own
shards and every offset inside its shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import fsspec
import torch
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

FORMAT = 3  # 2: index and shard entries carry their own sha256; 3: a loss mask, states of trained tokens only
INDEX = "index.json"
_ROUND_RE = re.compile(r"round_(\d{6})$")
_SHARD_RE = re.compile(r"shard_\d{5}_s(\d{3,})_t(\d{3,})\.safetensors")  # what CacheWriter names them


class CacheError(RuntimeError):
    """The cache cannot be trained on: a shard is missing, truncated, corrupt, or from another round."""


@dataclass
class TeacherBatch:
    """Samples of one teacher, with that teacher's cached states for their response tokens."""

    teacher: int
    step: int  # optimizer step within the round
    sample_ids: list[str]
    domains: list[str]
    input_ids: list[torch.Tensor]  # each [prompt_len + response_len] int64
    prompt_lens: list[int]
    loss_masks: list[torch.Tensor]  # each [response_len] bool: the trained response tokens
    hidden: torch.Tensor  # [sum of trained tokens, hidden_t]: sample after sample, row i predicts trained token i
    shard: str

    @property
    def response_lens(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.input_ids, self.prompt_lens)]

    @property
    def trained_lens(self) -> list[int]:
        """Rows (trained tokens) of each sample."""
        return [int(m.sum()) for m in self.loss_masks]


def round_url(root: str, round_id: int) -> str:
    return f"{root.rstrip('/')}/round_{round_id:06d}"


class CacheWriter:
    """Write one round: `add` samples group by group, then `close` to publish the index.

    A group is a (step, teacher) pair; its samples must be added together (the teacher forward
    visits teacher after teacher, so groups arrive teacher-major and the index re-sorts them
    step-major). Starting a round removes what an interrupted attempt at that round left behind.
    """

    def __init__(
        self,
        root: str,
        round_id: int,
        teachers: Sequence[dict],  # [{"name": ..., "path": ..., "domains": [...]}], index = teacher id
        policy: str = "",
        dtype: torch.dtype = torch.bfloat16,
        shard_rows: int = 65536,
    ):
        self.fs, self.dir = fsspec.core.url_to_fs(round_url(root, round_id))
        self.round_id, self.policy, self.dtype, self.shard_rows = round_id, policy, dtype, shard_rows
        self.teachers = [dict(t) for t in teachers]
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)
        self.fs.makedirs(self.dir, exist_ok=True)
        self.shards: list[dict] = []
        self._group: tuple[int, int] | None = None  # (step, teacher) being written
        self._done: set[tuple[int, int]] = set()
        self._rows: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._samples: list[dict] = []
        self._n_rows = self._n_ids = 0

    def add(self, teacher: int, sample_id: str, domain: str, input_ids: Sequence[int], prompt_len: int,
            hidden: torch.Tensor, step: int = 0, loss_mask: Sequence[int] | None = None) -> None:
        """`loss_mask` [response_len] 0/1: which response tokens are trained (default: all);
        `hidden` [trained tokens, hidden_t]: the teacher's states predicting those tokens, in order."""
        n_resp = len(input_ids) - prompt_len
        mask = torch.as_tensor([1] * n_resp if loss_mask is None else loss_mask, dtype=torch.uint8)
        if mask.shape != (n_resp,) or bool((mask > 1).any()):
            raise ValueError(f"sample {sample_id}: loss_mask must be {n_resp} zeros and ones (one per response token)")
        n_rows = int(mask.sum())
        if n_rows == 0:
            raise ValueError(f"sample {sample_id}: no trained tokens (loss_mask is all 0); leave the sample out")
        if hidden.shape[0] != n_rows:
            raise ValueError(f"sample {sample_id}: {hidden.shape[0]} hidden rows for {n_rows} trained tokens")
        group = (step, teacher)
        if group != self._group:
            if group in self._done:
                raise ValueError(f"samples of step {step} teacher {teacher} must be added together; that group is closed")
            self._flush()
            if self._group is not None:
                self._done.add(self._group)
            self._group = group
        elif self._n_rows >= self.shard_rows:
            self._flush()
        self.teachers[teacher]["hidden_size"] = int(hidden.shape[1])
        self._samples.append(dict(id=str(sample_id), domain=domain, prompt_len=int(prompt_len),
                                  ids=[self._n_ids, len(input_ids)], rows=[self._n_rows, n_rows]))
        self._rows.append(hidden.detach().to("cpu", self.dtype))
        self._ids.append(torch.as_tensor(input_ids, dtype=torch.int32))
        self._masks.append(torch.cat([torch.zeros(prompt_len, dtype=torch.uint8), mask]))
        self._n_rows += n_rows
        self._n_ids += len(input_ids)

    def _flush(self) -> None:
        if not self._samples:
            return
        step, teacher = self._group
        name = f"shard_{len(self.shards):05d}_s{step:03d}_t{teacher:03d}.safetensors"
        tensors = {"hidden": torch.cat(self._rows).contiguous(), "input_ids": torch.cat(self._ids),
                   "loss_mask": torch.cat(self._masks)}
        data = st_save(tensors, metadata={"round": str(self.round_id), "step": str(step), "teacher": str(teacher)})
        _put(self.fs, f"{self.dir}/{name}", data)
        self.shards.append(dict(file=name, step=step, teacher=teacher, bytes=len(data),
                                sha256=hashlib.sha256(data).hexdigest(), rows=self._n_rows, samples=self._samples))
        self._rows, self._ids, self._masks, self._samples, self._n_rows, self._n_ids = [], [], [], [], 0, 0

    def close(self) -> dict:
        """Write the last shard and then the index, which makes the round visible to readers."""
        self._flush()
        shards = sorted(self.shards, key=lambda s: (s["step"], s["teacher"]))  # stable: a group keeps its order
        index = sign_index(dict(format=FORMAT, round=self.round_id, policy=self.policy,
                                dtype=str(self.dtype).removeprefix("torch."), teachers=self.teachers, shards=shards))
        _put(self.fs, f"{self.dir}/{INDEX}", json.dumps(index, indent=1).encode())
        return index

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()  # on error no index is written: the round stays invisible


class CacheReader:
    """Stream one round's batches in (step, teacher) order, verifying each shard; the next shard is
    read and checked on a background thread while the current one trains.

    Batches never mix steps or teachers, nor cross shards; each holds samples up to `batch_tokens` tokens
    (prompt + response), and at least one sample.
    """

    def __init__(self, root: str, round_id: int, policy: str | None = None, batch_tokens: int = 4096,
                 prefetch: bool = True):
        self.fs, self.dir = fsspec.core.url_to_fs(round_url(root, round_id))
        self.round_id, self.batch_tokens, self.prefetch = round_id, batch_tokens, prefetch
        where = self.fs.unstrip_protocol(f"{self.dir}/{INDEX}")
        try:
            self.index = json.loads(self.fs.cat_file(f"{self.dir}/{INDEX}"))
        except FileNotFoundError:
            raise CacheError(f"no cache for round {round_id}: {where} is missing (round never finished writing)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CacheError(f"{where}: not valid JSON ({e}); delete the round to regenerate it") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            got = self.index.get("format") if isinstance(self.index, dict) else type(self.index).__name__
            raise CacheError(f"{where}: cache format {got!r}, this reader reads {FORMAT}")
        check_index(self.index, where)
        if self.index["round"] != round_id:
            raise CacheError(f"{where}: stale cache: it holds round {self.index['round']}, training round {round_id}")
        if policy is not None and self.index["policy"] != policy:
            raise CacheError(f"{where}: stale cache: sampled from policy {self.index['policy']!r}, "
                             f"training policy {policy!r}")

    def step_tokens(self) -> dict[int, int]:
        """Trained tokens per optimizer step."""
        return step_tokens(self.index)

    def __iter__(self) -> Iterator[TeacherBatch]:
        return self.batches()

    def batches(self, step: int | None = None) -> Iterator[TeacherBatch]:
        """The round's batches in (step, teacher) order, or only those of optimizer step `step`."""
        shards = [s for s in self.index["shards"] if step is None or s["step"] == step]
        if not shards:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-cache") as pool:
            load = (lambda e: pool.submit(self._load, e)) if self.prefetch else (lambda e: _Done(self._load(e)))
            pending = load(shards[0])
            for i, entry in enumerate(shards):
                tensors = pending.result()  # a bad shard raises here, before any of it is used
                if i + 1 < len(shards):
                    pending = load(shards[i + 1])
                yield from self._batches(entry, tensors)

    def _load(self, entry: dict) -> dict[str, torch.Tensor]:
        path = f"{self.dir}/{entry['file']}"
        where = self.fs.unstrip_protocol(path)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CacheError(f"cache shard {where} is missing (listed in {INDEX} of round {self.round_id})") from None
        if len(data) != entry["bytes"]:
            raise CacheError(f"cache shard {where} is truncated or overwritten: {len(data)} bytes, index says {entry['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CacheError(f"cache shard {where} is corrupt: sha256 {digest[:12]}..., index says {entry['sha256'][:12]}...")
        try:
            meta, tensors = _parse(data)
        except Exception as e:  # checksum matched but the file is not what we wrote: a writer bug
            raise CacheError(f"cache shard {where} cannot be parsed: {e}") from None
        got = (meta.get("round"), meta.get("step"), meta.get("teacher"))
        if got != (str(self.round_id), str(entry["step"]), str(entry["teacher"])):
            raise CacheError(f"cache shard {where} holds round/step/teacher {got}, index says "
                             f"{(self.round_id, entry['step'], entry['teacher'])}")
        hidden, ids, mask = tensors.get("hidden"), tensors.get("input_ids"), tensors.get("loss_mask")
        want_hidden = (entry["rows"], self.index["teachers"][entry["teacher"]].get("hidden_size"))
        want_ids = sum(s["ids"][1] for s in entry["samples"])
        if hidden is None or ids is None or mask is None or hidden.dim() != 2 or ids.dim() != 1 \
                or mask.shape != ids.shape:
            raise CacheError(f"cache shard {where} lacks a 2-d 'hidden', or a 1-d 'input_ids' with a 'loss_mask' "
                             "beside it")
        if hidden.shape[0] != want_hidden[0] or want_hidden[1] not in (None, hidden.shape[1]) or len(ids) != want_ids:
            raise CacheError(f"cache shard {where} holds hidden {tuple(hidden.shape)} and {len(ids)} input ids, "
                             f"index says {want_hidden} and {want_ids}")
        for s in entry["samples"]:
            (i0, n), p, rows = s["ids"], s["prompt_len"], s["rows"][1]
            m = mask[i0 : i0 + n]
            if bool(m[:p].any()) or bool((m > 1).any()) or int(m.sum()) != rows:
                raise CacheError(f"cache shard {where}: sample {s['id']!r}'s loss mask does not match its entry "
                                 f"({int(m.sum())} trained tokens, {int(m[:p].sum())} of them in the prompt; "
                                 f"the index says {rows} rows)")
        tensors["loss_mask"] = mask.bool()
        return tensors

    def _batches(self, entry: dict, tensors: dict[str, torch.Tensor]) -> Iterator[TeacherBatch]:
        hidden, ids, mask = tensors["hidden"], tensors["input_ids"], tensors["loss_mask"]
        for group in _sample_groups(entry["samples"], self.batch_tokens):
            first, last = group[0]["rows"], group[-1]["rows"]
            yield TeacherBatch(
                teacher=entry["teacher"],
                step=entry["step"],
                sample_ids=[g["id"] for g in group],
                domains=[g["domain"] for g in group],
                input_ids=[ids[g["ids"][0] : g["ids"][0] + g["ids"][1]].long() for g in group],
                prompt_lens=[g["prompt_len"] for g in group],
                loss_masks=[mask[g["ids"][0] + g["prompt_len"] : g["ids"][0] + g["ids"][1]] for g in group],
                hidden=hidden[first[0] : last[0] + last[1]],
                shard=entry["file"],
            )


def _sample_groups(samples: list[dict], batch_tokens: int) -> list[list[dict]]:
    """A shard's samples in consecutive batches of at most `batch_tokens` tokens (at least one sample each)."""
    out: list[list[dict]] = []
    size = 0
    for s in samples:
        if not out or size + s["ids"][1] > batch_tokens:
            out.append([])
            size = 0
        out[-1].append(s)
        size += s["ids"][1]
    return out


def step_tokens(index: dict) -> dict[int, int]:
    """Trained tokens (cached states) per optimizer step of a round's index."""
    out: dict[int, int] = {}
    for s in index["shards"]:
        out[s["step"]] = out.get(s["step"], 0) + s["rows"]
    return out


def step_samples(index: dict, step: int) -> list[dict]:
    """The index entries of step `step`'s samples (id, domain, rows = trained tokens, ...), in the order
    `CacheReader.batches(step)` yields them."""
    return [sample for s in index["shards"] if s["step"] == step for sample in s["samples"]]


def step_batches(index: dict, batch_tokens: int) -> dict[int, int]:
    """How many batches `CacheReader(..., batch_tokens).batches(step)` yields, per step of a round's index."""
    out: dict[int, int] = {}
    for s in index["shards"]:
        out[s["step"]] = out.get(s["step"], 0) + len(_sample_groups(s["samples"], batch_tokens))
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sign_index(index: dict) -> dict:
    """Add each shard entry's sha256 (of the entry without it), then the index's (of the rest)."""
    shards = [{k: v for k, v in s.items() if k != "entry_sha256"} for s in index["shards"]]
    for s in shards:
        s["entry_sha256"] = _digest(s)
    body = {**{k: v for k, v in index.items() if k != "sha256"}, "shards": shards}
    return {**body, "sha256": _digest(body)}


def check_index(index: dict, where: str) -> None:
    """Refuse an index that was edited, or that points outside its round or its shards; names the shard."""
    try:
        teachers, shards = index["teachers"], index["shards"]
        for entry in shards:
            _check_entry(entry, teachers)
    except _EntryError as e:
        raise CacheError(f"{where}: shard {e.args[0]!r}: {e.args[1]}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CacheError(f"{where}: malformed index ({type(e).__name__}: {e}); delete the round to regenerate it") from None
    if index.get("sha256") != _digest({k: v for k, v in index.items() if k != "sha256"}):
        raise CacheError(f"{where}: index checksum mismatch (its round, policy, teachers or shard list were edited "
                         "or corrupted); delete the round to regenerate it")
    order = [(s["step"], s["teacher"]) for s in shards]
    if order != sorted(order):
        raise CacheError(f"{where}: shards are not sorted by (step, teacher): {order}")


class _EntryError(Exception):
    """(shard file, what is wrong): raised inside `_check_entry`, reported by `check_index`."""


def _check_entry(entry: dict, teachers: list[dict]) -> None:
    name = entry.get("file")
    m = _SHARD_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise _EntryError(name, "not a shard file name this writer makes (a plain shard_*.safetensors inside the "
                                "round directory); refusing to read it")
    if entry.get("entry_sha256") != _digest({k: v for k, v in entry.items() if k != "entry_sha256"}):
        raise _EntryError(name, "index entry checksum mismatch (the entry was edited or corrupted)")
    step, teacher = entry["step"], entry["teacher"]
    if (int(m[1]), int(m[2])) != (step, teacher):
        raise _EntryError(name, f"entry says step {step} teacher {teacher}, its name says otherwise")
    if not (isinstance(teacher, int) and 0 <= teacher < len(teachers)):
        raise _EntryError(name, f"teacher {teacher!r} is not one of the {len(teachers)} teachers of the round")
    domains = teachers[teacher].get("domains")
    row = n_ids = 0
    for s in entry["samples"]:
        (r0, rn), (i0, n), p = s["rows"], s["ids"], s["prompt_len"]
        if (r0, i0) != (row, n_ids):
            raise _EntryError(name, f"sample {s['id']!r}: offsets rows {r0}, ids {i0}; expected {row}, {n_ids} "
                                    "(samples are stored back to back)")
        if not (isinstance(p, int) and isinstance(n, int) and isinstance(rn, int) and 1 <= p < n and 1 <= rn <= n - p):
            raise _EntryError(name, f"sample {s['id']!r}: {rn} rows for {n} ids with prompt length {p}")
        if domains is not None and s["domain"] not in domains:
            raise _EntryError(name, f"sample {s['id']!r}: domain {s['domain']!r} is not one teacher {teacher} "
                                    f"answers for ({', '.join(domains)})")
        row, n_ids = row + rn, n_ids + n
    if row != entry["rows"]:
        raise _EntryError(name, f"its samples hold {row} rows, the entry says {entry['rows']}")


def list_rounds(root: str) -> list[int]:
    """Ids of the rounds under `root` whose index was published, ascending."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        m = _ROUND_RE.search(entry.rstrip("/"))
        if m and fs.exists(f"{entry.rstrip('/')}/{INDEX}"):
            out.append(int(m.group(1)))
    return sorted(out)


def prune_rounds(root: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` published rounds (0 deletes all); returns the deleted ids."""
    fs, _ = fsspec.core.url_to_fs(root)
    rounds = list_rounds(root)
    doomed = rounds[: max(len(rounds) - keep, 0)]
    for r in doomed:
        _, path = fsspec.core.url_to_fs(round_url(root, r))
        fs.rm(path, recursive=True)
    return doomed


def _put(fs, path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: readers never see half a file."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32, "I64": torch.int64,
           "U8": torch.uint8}


def _parse(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file in memory: one copy into a writable buffer, then
    views on it (safetensors.torch.load builds each tensor separately and is ~5x slower here)."""
    (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, JSON header, then the bytes
    header = json.loads(data[8 : 8 + n])
    buf = memoryview(bytearray(data))[8 + n :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        flat = torch.frombuffer(buf[start:end], dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return header.get("__metadata__", {}), tensors


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
