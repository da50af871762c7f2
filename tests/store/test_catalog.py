"""The catalog: model binding, atomic manifests, orphan clean-up, URI stores; the page table's policy."""

import json

import numpy as np
import pytest

from expertmesh.store.catalog import Catalog
from expertmesh.store.location import StoreLocation, StoreMismatch
from expertmesh.store.manifest import Manifest, SegmentEntry
from expertmesh.store.tiers import PageTable


def manifest(cid, files, fp="fp-a"):
    segs = tuple(SegmentEntry(i, i * 10, i * 10 + 10, f, 5, f"t{i}", f"p{i}") for i, f in enumerate(files))
    return Manifest(cid, 10 * len(files), "blockwise", segs, "acme", "private", None, 1.0, "float32", 64, fp, "x")


def test_store_bound_to_its_model(tmp_path):
    Catalog.open(str(tmp_path), "fp-a", {"architecture": "A"})
    Catalog.open(str(tmp_path), "fp-a", {"architecture": "A"})  # same model: fine
    with pytest.raises(StoreMismatch, match="written by another model"):
        Catalog.open(str(tmp_path), "fp-b", {"architecture": "B"})


def test_orphans_removed_and_shared_files_kept_until_last_user(tmp_path):
    cat = Catalog.open(str(tmp_path), "fp-a", {})
    for name in ("a.0.kv", "a.1.kv", "b.0.kv", "orphan.0.kv"):
        (tmp_path / "segments" / name).write_bytes(b"x")
    (tmp_path / "tmp" / "half.kv.part").write_bytes(b"x")
    cat.add(manifest("a", ["a.0.kv", "a.1.kv"]))
    cat.add(manifest("b", ["a.0.kv", "b.0.kv"]))  # b reuses a's first segment
    cat.close()  # the only member leaves: drops delete at once
    cat = Catalog.open(str(tmp_path), "fp-a", {})
    assert sorted(cat.manifests) == ["a", "b"] and cat.removed_orphans == 2
    assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == ["a.0.kv", "a.1.kv", "b.0.kv"]
    assert cat.remove("a") == ["a.1.kv"]  # a.0.kv is still b's
    assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == ["a.0.kv", "b.0.kv"]
    assert cat.remove("b") == ["a.0.kv", "b.0.kv"]
    assert not list((tmp_path / "contexts").iterdir())


def _expire(root, cat):
    """Make a member's lease look like a dead mesh's (not renewed for two minutes)."""
    path = root / "members" / f"{cat.member.id}.json"
    lease = json.loads(path.read_text())
    lease["renewed"] -= 120
    path.write_text(json.dumps(lease))


@pytest.fixture(params=["directory", "uri"])
def shared(request, tmp_path, monkeypatch):
    """(store location, its root directory on disk, the scratch directory): a local directory, or
    the same through pyarrow.fs as an object store is reached (scratch in the host's cache)."""
    if request.param == "directory":
        return str(tmp_path), tmp_path, tmp_path / "tmp"
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path / 'remote'}"
    return uri, tmp_path / "remote", StoreLocation(uri).scratch


def test_a_live_members_registration_in_flight_survives_anothers_start(shared):
    store, root, scratch = shared
    a = Catalog.open(store, "fp-a", {})
    a.begin_pending("x", ["x.0.kv", "x.1.kv"])
    (root / "segments" / "x.0.kv").write_bytes(b"published, manifest not yet")
    (scratch / "x.1.kv.1a2b3c4d.part").write_bytes(b"being written")
    (root / "segments" / "stray.0.kv").write_bytes(b"no one's")
    b = Catalog.open(store, "fp-a", {})  # another mesh starts on the store
    assert b.removed_orphans == 1 and not (root / "segments" / "stray.0.kv").exists()
    assert (root / "segments" / "x.0.kv").exists() and (scratch / "x.1.kv.1a2b3c4d.part").exists()
    assert b.exists("x")  # the id is taken while a registers it
    _expire(root, a)  # a dies mid-registration: the next clean-up removes what it left
    c = Catalog.open(store, "fp-a", {})
    assert c.removed_orphans == 2 and not b.exists("x")
    assert not list((root / "segments").iterdir()) and not list((root / "pending").iterdir())


def test_contexts_of_one_mesh_appear_and_drops_wait_for_the_others(shared):
    store, tmp_path, _ = shared
    a = Catalog.open(store, "fp-a", {})
    b = Catalog.open(store, "fp-a", {})
    for name in ("a.0.kv", "b.1.kv"):
        (tmp_path / "segments" / name).write_bytes(b"x")
    a.add(manifest("ctx-a", ["a.0.kv"]))
    added, removed = b.sync()
    assert [m.id for m in added] == ["ctx-a"] and not removed
    b.add(manifest("ctx-b", ["a.0.kv", "b.1.kv"]))  # b's context reuses a's segment file
    assert a.load("ctx-b").segments[1].file == "b.1.kv"  # a lookup by id reads the store at once
    assert a.remove("ctx-a") == []  # b is live: nothing deleted now
    added, removed = b.sync()
    assert removed == {"ctx-a"} and (tmp_path / "dropped" / "ctx-a.json").exists()
    assert a.collect(grace_s=0.0) == []  # past the grace period: a.0.kv is still ctx-b's
    assert (tmp_path / "segments" / "a.0.kv").exists() and not (tmp_path / "dropped" / "ctx-a.json").exists()
    assert b.remove("ctx-b") == []  # a is live
    assert sorted(a.collect(grace_s=0.0)) == ["a.0.kv", "b.1.kv"]
    assert not list((tmp_path / "segments").iterdir())


def test_a_drop_is_seen_even_where_a_lookup_lost_its_entry_to_a_concurrent_reload(shared):
    """A lookup (`load`) writing into `manifests` while a reload in another thread replaces the
    dict loses its entry; the next sync then saw no drop. What the caller serves is checked."""
    store, tmp_path, _ = shared
    a = Catalog.open(store, "fp-a", {})
    b = Catalog.open(store, "fp-a", {})
    (tmp_path / "segments" / "a.0.kv").write_bytes(b"x")
    a.add(manifest("ctx-a", ["a.0.kv"]))
    a.add(manifest("ctx-c", ["a.0.kv"]))
    assert b.load("ctx-a") is not None and b.load("ctx-c") is not None
    b.manifests = {}  # the lost update (as a reload that listed the store before ctx-a's manifest)
    a.remove("ctx-a")
    added, removed = b.sync(served={"ctx-a", "ctx-c"})
    assert removed == {"ctx-a"}  # dropped elsewhere: reported
    assert "ctx-c" in b.manifests and "ctx-c" not in removed  # still stored: taken back, not dropped
    assert b.sync(served={"ctx-c"}) == ([], set())


def test_unreadable_manifest_is_reported_by_name_others_load(tmp_path):
    cat = Catalog.open(str(tmp_path), "fp-a", {})
    cat.add(manifest("good", ["g.0.kv"]))
    (tmp_path / "contexts" / "bad.json").write_text("{not json")
    m = json.loads(manifest("other", ["o.0.kv"], fp="fp-z").to_json())
    (tmp_path / "contexts" / "other.json").write_text(json.dumps(m))
    cat = Catalog.open(str(tmp_path), "fp-a", {})
    assert list(cat.manifests) == ["good"]
    assert "contexts/bad.json is unreadable" in cat.unavailable["bad"]
    assert "computed by another model" in cat.unavailable["other"]


def test_reusable_segment_rules(tmp_path):
    cat = Catalog.open(str(tmp_path), "fp-a", {})
    cat.add(manifest("a", ["a.0.kv", "a.1.kv"]))
    assert cat.reusable_segment("blockwise", 10, 20, "t1", "zzz", "float32", 64).file == "a.1.kv"
    assert cat.reusable_segment("blockwise", 10, 20, "t1", "p1", "bfloat16", 64) is None  # other dtype
    assert cat.reusable_segment("blockwise", 0, 10, "t1", "p1", "float32", 64) is None  # other position
    assert cat.reusable_segment("exact", 10, 20, "t1", "p1", "float32", 64) is None  # other mode


def test_uri_store_round_trips_through_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path / 'remote'}"
    loc = StoreLocation(uri)
    assert loc.local is None  # the pyarrow.fs path, as for s3:// and gs://
    cat = Catalog.open(uri, "fp-a", {})
    tmp = loc.scratch_file("a.0.kv")
    tmp.write_bytes(b"segment bytes")
    loc.publish(tmp, "a.0.kv")
    cat.add(manifest("a", ["a.0.kv"]))
    (tmp_path / "cache").rename(tmp_path / "cache-old")  # a host that never saw the file
    loc2 = StoreLocation(uri)
    assert Catalog.open(uri, "fp-a", {}).manifests["a"].segments[0].file == "a.0.kv"
    assert loc2.segment_path("a.0.kv").read_bytes() == b"segment bytes"  # downloaded to the cache
    assert (tmp_path / "remote" / "segments" / "a.0.kv").is_file()


def test_page_table_evicts_once_used_pages_first_and_scans_never_evict():
    t = PageTable(4)
    t.add_segment(1, 1, 10)
    got = t.admit(1, 0, np.array([0, 1, 2, 3]), evict=True)
    assert sorted(got.tolist()) == [0, 1, 2, 3]
    t.lookup(1, 0, np.array([0, 1]))  # pages 0 and 1 used again
    assert (t.admit(1, 0, np.array([4, 5]), evict=False) == -1).all()  # a scan takes only free slots
    t.admit(1, 0, np.array([4, 5]), evict=True)
    hot = t.lookup(1, 0, np.arange(6))
    assert (hot[[0, 1, 4, 5]] >= 0).all() and (hot[[2, 3]] == -1).all()
    t.remove_segment(1, 1)
    assert t.used == 0


def test_page_table_gives_a_new_segment_ascending_slots_after_a_drop():
    """A segment admitted after another was removed gets its pages in ascending slots again
    (one run: the shard attends over a view of the pool; reversed slots would cost a copy)."""
    t = PageTable(16)
    for rounds in range(3):
        t.add_segment(rounds, 2, 8)
        first = t.admit(rounds, 0, np.arange(8), evict=False)
        second = t.admit(rounds, 1, np.arange(8), evict=False)
        assert first.tolist() == list(range(8)) and second.tolist() == list(range(8, 16))
        t.remove_segment(rounds, 2)


class _Registration:
    """A registration by another live member, one store write per `step`, in the order the router
    writes: pending entry, a segment's scratch file, its publication, a second segment file, the
    manifest, the end of the pending entry."""

    def __init__(self, catalog, root, scratch, cid):
        self.cat, self.root, self.scratch, self.cid = catalog, root, scratch, cid
        self.files = [f"{cid}.0.kv", f"{cid}.1.kv"]
        self.part = scratch / f"{self.files[0]}.1a2b3c4d.part"
        self.done, self.lost = 0, []

    def step(self):
        writes = [lambda: self.cat.begin_pending(self.cid, self.files),
                  lambda: self.part.write_bytes(b"being written"),
                  self._publish,
                  lambda: (self.root / "segments" / self.files[1]).write_bytes(b"published"),
                  lambda: self.cat.add(manifest(self.cid, self.files)),
                  lambda: self.cat.end_pending(self.cid)]
        if self.done < len(writes):
            writes[self.done]()
            self.done += 1

    def _publish(self):
        if not self.part.exists():  # deleted under the registration: its shard would fail here
            self.lost.append(self.part)
            return
        self.part.rename(self.root / "segments" / self.files[0])

    def expected(self):
        """The files this registration has written so far, where they should be now."""
        if self.done == 2:
            return [self.part]
        return [self.root / "segments" / f for f in self.files[:{3: 1}.get(self.done, 2)]] if self.done > 2 else []


def test_registrations_starting_inside_the_clean_up_window_lose_no_file(shared):
    """Clean-up lists, reads what is in use and deletes; another member's registrations begin,
    write and finish between any two of its reads of the store. None of their files goes."""
    store, root, scratch = shared
    cleaner = Catalog.open(store, "fp-a", {})
    writer = Catalog.open(store, "fp-a", {})
    (root / "segments" / "stray.0.kv").write_bytes(b"no one's")  # an orphan of a dead registration
    started = []

    def tick():  # every read the clean-up makes: a new registration begins, each running one moves on
        started.append(_Registration(writer, root, scratch, f"r{len(started)}"))
        for r in started:
            r.step()

    loc = cleaner.location
    for method in ("list", "read_bytes"):
        real = getattr(loc, method)
        setattr(loc, method, lambda *a, _real=real, **k: (tick(), _real(*a, **k))[1])
    real_live = cleaner.member.live
    cleaner.member.live = lambda: (tick(), real_live())[1]
    cleaner.clean_orphans()
    assert len(started) >= 6, len(started)
    lost = [str(p) for r in started for p in [*r.lost, *(p for p in r.expected() if not p.exists())]]
    assert not lost, f"{len(lost)} files of registrations in flight deleted: {lost[:4]}"
    assert not (root / "segments" / "stray.0.kv").exists()  # the orphan still goes


def test_a_rewritten_manifest_is_read_again_by_every_other_catalog(shared):
    """`relocate` (a rebalance) rewrites a manifest in place: another mesh's next read of the
    directory reports it, with the new layout, and reads no unchanged manifest twice."""
    store, root, _ = shared
    a = Catalog.open(store, "fp-a", {}, group="mesh-a")
    b = Catalog.open(store, "fp-a", {}, group="mesh-b")
    a.add(manifest("moved", ["m.0.kv", "m.1.kv"]))
    a.add(manifest("still", ["s.0.kv"]))
    published, removed = b.sync()
    assert sorted(m.id for m in published) == ["moved", "still"] and not removed
    assert a.relocate("moved", [3, 2])
    published, removed = b.changes()
    assert [(m.id, [e.shard for e in m.segments]) for m in published] == [("moved", [3, 2])] and not removed
    assert b.changes() == ([], set())
    reads = []
    real = b.location.read_bytes
    b.location.read_bytes = lambda rel: (reads.append(rel), real(rel))[1]
    b._listed += 60  # as if the last listing came a minute after the writes: stamps are sure then
    b.reload()
    assert reads == [], reads


def test_a_mesh_alone_on_its_store_need_not_re_read_it(tmp_path):
    """`tend` says whether another mesh's member is live: the routers of one mesh (one group)
    do not count; a lease without a group (a mesh of its own) does."""
    a = Catalog.open(str(tmp_path), "fp-a", {}, group="mesh-a")
    sibling = Catalog.open(str(tmp_path), "fp-a", {}, group="mesh-a")
    assert a.tend() is False
    other = Catalog.open(str(tmp_path), "fp-a", {})
    assert a.tend() is True and sibling.tend() is True
    other.close()
    assert a.tend() is False
