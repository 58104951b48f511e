"""The teacher cache round-trips, streams in teacher order, and refuses bad or stale data by name."""

import json
import threading
import uuid

import pytest
import torch

from distill.cache import CacheError, CacheReader, CacheWriter, list_rounds, prune_rounds, sign_index

TEACHERS = [{"name": f"t{i}", "path": f"/ckpt/t{i}", "domains": [f"d{i}"]} for i in range(3)]


def _write(root, round_id=1, policy="p", shard_rows=10, n_per_teacher=4, hidden=8, steps=1, masked=False):
    """Write samples for 3 teachers, teacher-major as the teacher forward does; returns
    {sample_id: (input_ids, prompt_len, hidden, loss_mask)}. `masked`: the second response token of
    each sample of 3 or more is not trained (a tool result, a forced `</think>`), so it has no state."""
    g = torch.Generator().manual_seed(round_id)
    want = {}
    with CacheWriter(root, round_id, TEACHERS, policy=policy, shard_rows=shard_rows) as w:
        for t in range(3):
            for step in range(steps):
                for k in range(n_per_teacher):
                    plen, rlen = 3 + k, 2 + (k * 3) % 5
                    ids = torch.randint(0, 100, (plen + rlen,), generator=g).tolist()
                    mask = [0 if masked and j == 1 and rlen >= 3 else 1 for j in range(rlen)]
                    h = torch.randn(sum(mask), hidden, generator=g)
                    sid = f"s{t}_{step}_{k}"
                    w.add(t, sid, f"d{t}", ids, plen, h, step=step, loss_mask=mask)
                    want[sid] = (ids, plen, h, mask)
    return want


@pytest.mark.parametrize("kind", ["local", "file_url", "memory"])
def test_round_trip_in_teacher_order_on_any_fsspec_url(tmp_path, kind):
    root = {"local": str(tmp_path / "cache"), "file_url": f"file://{tmp_path}/cache",
            "memory": f"memory://opd-{uuid.uuid4().hex}"}[kind]
    want = _write(root, steps=2, masked=True, shard_rows=8)
    reader = CacheReader(root, 1, policy="p", batch_tokens=20)
    assert len(reader.index["shards"]) > 6, "small shard_rows splits a group over several shards"
    seen, order = {}, []
    for b in reader:
        order.append((b.step, b.teacher))
        assert set(b.domains) == {f"d{b.teacher}"}, "a batch holds one teacher's samples only"
        assert sum(len(i) for i in b.input_ids) <= 20 or len(b.input_ids) == 1
        rows = 0
        for sid, ids, plen, n, m in zip(b.sample_ids, b.input_ids, b.prompt_lens, b.trained_lens, b.loss_masks):
            assert len(m) == len(ids) - plen
            seen[sid] = (ids.tolist(), plen, b.hidden[rows : rows + n], m.int().tolist())
            rows += n
        assert rows == b.hidden.shape[0]
    # written teacher-major, read step-major: every step walks the teachers in order
    assert order == sorted(order) and set(order) == {(s, t) for s in range(2) for t in range(3)}
    assert sum(reader.step_tokens().values()) == sum(sum(m) for *_, m in want.values())
    assert seen.keys() == want.keys()
    assert any(0 in m for *_, m in want.values())
    for sid, (ids, plen, h, mask) in want.items():
        assert seen[sid][0] == ids and seen[sid][1] == plen and seen[sid][3] == mask
        assert seen[sid][2].dtype == torch.bfloat16
        torch.testing.assert_close(seen[sid][2], h.bfloat16())
    assert list_rounds(root) == [1]


def _bad(tmp_path, damage):
    root = str(tmp_path / "cache")
    _write(root)
    reader = CacheReader(root, 1, batch_tokens=20)
    victim = reader.index["shards"][2]["file"]
    path = tmp_path / "cache" / "round_000001" / victim
    damage(path)
    got = []
    with pytest.raises(CacheError) as err:
        for b in reader:
            got.append(b.shard)
    assert victim in str(err.value)
    assert victim not in got, "no batch of the bad shard reaches training"
    return str(err.value)


def test_corrupt_shard_is_a_clear_error(tmp_path):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    assert "is corrupt: sha256" in _bad(tmp_path, flip)


def test_truncated_shard_is_a_clear_error(tmp_path):
    msg = _bad(tmp_path, lambda p: p.write_bytes(p.read_bytes()[:-7]))
    assert "is truncated" in msg


def test_missing_shard_is_a_clear_error(tmp_path):
    assert "is missing" in _bad(tmp_path, lambda p: p.unlink())


def test_stale_or_unfinished_rounds_are_refused(tmp_path):
    root = str(tmp_path / "cache")
    _write(root, round_id=1, policy="round_0")
    with pytest.raises(CacheError, match="no cache for round 2"):
        CacheReader(root, 2)
    with pytest.raises(CacheError, match="stale cache: sampled from policy 'round_0'"):
        CacheReader(root, 1, policy="round_1")
    # a round directory copied under another round's name is caught by the round id in its index
    (tmp_path / "cache" / "round_000001").rename(tmp_path / "cache" / "round_000002")
    with pytest.raises(CacheError, match="stale cache: it holds round 1, training round 2"):
        CacheReader(root, 2)

    # a writer that dies mid-round publishes nothing
    with pytest.raises(RuntimeError, match="teacher died"):
        with CacheWriter(root, 3, TEACHERS) as w:
            w.add(0, "a", "d0", [1, 2, 3], 2, torch.zeros(1, 4))
            raise RuntimeError("teacher died")
    assert list_rounds(root) == [2]
    with pytest.raises(CacheError, match="no cache for round 3"):
        CacheReader(root, 3)


def _victim(index):
    return index["shards"][2]


def _past_the_end(index):
    _victim(index)["samples"][-1]["rows"][0] += 1000


def _wrong_row_count(index):
    _victim(index)["rows"] += 3


def _relabelled_domain(index):
    _victim(index)["samples"][0]["domain"] = "d2"  # the victim is a teacher-1 shard: d2 is not its domain


def _outside_the_round_dir(index):
    _victim(index)["file"] = "../round_000002/" + _victim(index)["file"]


@pytest.mark.parametrize("resign", [False, True], ids=["edited", "edited_and_resigned"])
@pytest.mark.parametrize("tamper, structural", [
    (_past_the_end, "offsets"),
    (_wrong_row_count, "its samples hold"),
    (_relabelled_domain, "domain 'd2' is not one teacher 1 answers for"),
    (_outside_the_round_dir, "not a shard file name"),
], ids=["offset_past_end", "row_count", "relabelled_domain", "file_outside_round"])
def test_a_tampered_index_is_refused_naming_the_shard(tmp_path, tamper, structural, resign):
    """An edited index fails its entry checksum; one whose checksums were recomputed fails the
    structural checks. Either way the reader names the shard before reading anything."""
    root = str(tmp_path / "cache")
    _write(root)
    path = tmp_path / "cache" / "round_000001" / "index.json"
    index = json.loads(path.read_text())
    victim = _victim(index)["file"]
    tamper(index)
    path.write_text(json.dumps(sign_index(index) if resign else index))
    with pytest.raises(CacheError) as err:
        CacheReader(root, 1)
    msg = str(err.value)
    assert victim in msg and "index.json" in msg
    assert structural in msg if resign or tamper is _outside_the_round_dir else "checksum mismatch" in msg


def test_an_edited_index_header_is_refused(tmp_path):
    root = str(tmp_path / "cache")
    _write(root)
    path = tmp_path / "cache" / "round_000001" / "index.json"
    index = json.loads(path.read_text())
    index["teachers"][1]["path"] = "/somewhere/else"
    path.write_text(json.dumps(index))
    with pytest.raises(CacheError, match="index checksum mismatch"):
        CacheReader(root, 1)
    path.write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        CacheReader(root, 1)


def test_a_shard_that_disagrees_with_its_entry_is_named_when_read(tmp_path):
    """A consistent, signed index whose shard holds other shapes (another round's shard of the same
    group copied in, with the index re-signed to match its bytes) fails before any of it trains."""
    import hashlib

    root = str(tmp_path / "cache")
    _write(root)
    _write(str(tmp_path / "other"), n_per_teacher=2)  # same round id, step and teacher, fewer rows
    rdir = tmp_path / "cache" / "round_000001"
    index = json.loads((rdir / "index.json").read_text())
    entry = index["shards"][0]
    other = json.loads((tmp_path / "other" / "round_000001" / "index.json").read_text())["shards"][0]
    data = (tmp_path / "other" / "round_000001" / other["file"]).read_bytes()
    (rdir / entry["file"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (rdir / "index.json").write_text(json.dumps(sign_index(index)))
    with pytest.raises(CacheError, match=f"{entry['file']} holds hidden .* index says"):
        list(CacheReader(root, 1))


def test_a_loss_mask_that_disagrees_with_its_entry_is_named_when_read(tmp_path):
    """A shard whose loss mask marks a prompt token as trained (its rows then belong to other tokens),
    signed to match, is refused before any of it trains."""
    import hashlib

    from safetensors.torch import load, save

    root = str(tmp_path / "cache")
    _write(root, masked=True)
    rdir = tmp_path / "cache" / "round_000001"
    index = json.loads((rdir / "index.json").read_text())
    entry = index["shards"][0]
    raw = (rdir / entry["file"]).read_bytes()
    tensors = load(raw)
    tensors["loss_mask"][0] = 1  # the first sample's first prompt token
    data = save(tensors, metadata={"round": "1", "step": "0", "teacher": "0"})
    (rdir / entry["file"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (rdir / "index.json").write_text(json.dumps(sign_index(index)))
    with pytest.raises(CacheError, match=f"{entry['file']}: sample 's0_0_0'.s loss mask does not match"):
        list(CacheReader(root, 1))


def test_writer_refuses_states_that_do_not_match_the_mask(tmp_path):
    w = CacheWriter(str(tmp_path), 0, TEACHERS)
    with pytest.raises(ValueError, match="3 hidden rows for 2 trained tokens"):
        w.add(0, "a", "d0", [1, 2, 3, 4, 5], 2, torch.zeros(3, 4), loss_mask=[1, 0, 1])
    with pytest.raises(ValueError, match="no trained tokens"):
        w.add(0, "a", "d0", [1, 2, 3], 2, torch.zeros(0, 4), loss_mask=[0])
    with pytest.raises(ValueError, match="loss_mask must be 3 zeros and ones"):
        w.add(0, "a", "d0", [1, 2, 3, 4, 5], 2, torch.zeros(2, 4), loss_mask=[1, 1])


def test_writer_requires_each_group_together(tmp_path):
    w = CacheWriter(str(tmp_path), 0, TEACHERS)
    w.add(0, "a", "d", [1, 2, 3], 2, torch.zeros(1, 4))
    w.add(1, "b", "d", [1, 2, 3], 2, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="step 0 teacher 0 must be added together"):
        w.add(0, "c", "d", [1, 2, 3], 2, torch.zeros(1, 4))


def test_retention_keeps_newest_rounds(tmp_path):
    root = str(tmp_path / "cache")
    for r in range(4):
        _write(root, round_id=r, n_per_teacher=1)
    assert prune_rounds(root, keep=2) == [0, 1]
    assert list_rounds(root) == [2, 3]
    assert prune_rounds(root, keep=0) == [2, 3]
    assert list_rounds(root) == []


def test_next_shard_is_read_while_the_current_one_trains(tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    _write(root)
    reader = CacheReader(root, 1, batch_tokens=20)
    second = reader.index["shards"][1]["file"]
    loaded = threading.Event()
    real = CacheReader._load

    def spy(self, entry):
        out = real(self, entry)
        if entry["file"] == second:
            loaded.set()
        return out

    monkeypatch.setattr(CacheReader, "_load", spy)
    it = iter(reader)
    first = next(it)
    assert first.shard != second
    # the consumer still holds shard 0's first batch; shard 1 arrives in the background
    assert loaded.wait(timeout=10), "the next shard was not prefetched"
    list(it)


def test_one_steps_batches_and_their_count_from_the_index(tmp_path):
    """What the stage plans from a rank's index (tokens and batches per step) is what the reader yields."""
    from distill.cache import step_batches, step_tokens

    root = str(tmp_path / "cache")
    _write(root, steps=3)
    reader = CacheReader(root, 1, batch_tokens=20)
    counts = step_batches(reader.index, 20)
    for step in range(3):
        got = list(reader.batches(step))
        assert {b.step for b in got} == {step} and len(got) == counts[step]
        assert sum(b.hidden.shape[0] for b in got) == step_tokens(reader.index)[step]
        assert [b.teacher for b in got] == sorted(b.teacher for b in got)
