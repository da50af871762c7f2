"""Real-text training data: pinned sources (fetched from a local .deb here, never downloaded),
haystack windows, random lengths across chunk offsets, eos right after the answer."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from expertmesh.cli import commands as cli
from expertmesh.model.tokenizer import ByteTokenizer
from expertmesh.pipelines import text_sources as ts
from expertmesh.pipelines.evaluate import answered
from expertmesh.pipelines.train_data import CHUNK, EOS_ID, DataSpec, make_row, pick_length

WORDS = ("harbour", "lantern", "meadow", "copper", "orchard", "glacier", "thistle", "ember", "quarry", "saffron",
         "naïve", "café", "Ørsted", "—")


def corpus(rng: random.Random, chars: int) -> str:
    """Made-up text with sentences, lines, paragraphs and some multi-byte characters."""
    out, n = [], 0
    while n < chars:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        s = words[0].upper() + words[1:] + rng.choice((". ", ".\n", ".\n\n", "; ", ", "))
        out.append(s)
        n += len(s)
    return "".join(out)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(corpus(random.Random(0), 60_000), encoding="utf-8")
    return path


def test_sources_are_pinned_with_versions_and_a_held_out_split():
    assert set(ts.SETS) == {ts.TRAIN, ts.HELDOUT}
    assert len(ts.SETS[ts.TRAIN]) >= 3 and len(ts.SETS[ts.HELDOUT]) >= 2
    packages = {}
    for s in ts.SOURCES.values():
        for p in s.packages:
            assert p.version and len(p.sha256) == 64
            packages.setdefault(p.name, s.split)
            assert packages[p.name] == s.split, f"{p.name} feeds both splits"
    assert ts.resolve("heldout") == ts.SETS[ts.HELDOUT]
    with pytest.raises(ValueError, match="unknown text source"):
        ts.resolve("no-such-source")


def test_haystack_windows_have_exact_length_valid_utf8_and_line_alignment(text_file):
    text = ts.load(str(text_file))
    other = ts.Text("other", "local", "other", corpus(random.Random(1), 9_000).encode())
    hay = ts.Haystack([text, other], mix_share=0.5)
    rng = random.Random(0)
    for n in (1, 2, 3, 100, 5000, 8999, 20_000, 150_000):  # beyond a source's size too (it repeats)
        for end_at_line in (True, False, None):
            w = hay.window(rng, n, end_at_line)
            assert len(w) == n
            w.decode("utf-8")
    single = ts.Haystack([text], mix_share=0.0)
    ends = [single.window(rng, 3000, end_at_line=True) for _ in range(20)]
    assert all(w.endswith(b"\n") for w in ends)


def test_rows_on_real_text_end_with_the_answer_then_eos(text_file):
    tok, rng = ByteTokenizer(), random.Random(0)
    spec = DataSpec(text=(str(text_file),), eos=True, length_range=(700, 6000), max_keys=6, synthetic_share=0.2)
    hay = ts.Haystack.load(spec.text, spec.text_cache)
    tasks_seen = set()
    for _ in range(80):
        length = pick_length(rng, spec)
        row = make_row(rng, length, spec, tok, hay)
        ids = row["input_ids"]
        assert len(ids) == length and ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
        assert row["answer_start"] + row["answer_len"] == length
        answer = tok.decode(ids[row["answer_start"]:-1].tolist())
        assert answer.startswith(" ") and answer.endswith(".")
        number = answered(answer)
        before = tok.decode(ids[:row["answer_start"]].tolist())
        assert before.endswith(" is") and number in before
        tasks_seen.add(row["task"])
    assert tasks_seen == {"passkey", "multikey"}


def test_boundary_share_ends_groups_just_past_a_chunk_boundary():
    """The question or the answer at or across a chunk boundary: random lengths put it there in
    a few percent of the groups; `boundary_share` in that share on top, at every tail length."""
    rng = random.Random(1)
    lengths = np.array([pick_length(rng, DataSpec(length_range=(1100, 16383), boundary_share=1.0))
                        for _ in range(3000)])
    tail = lengths % CHUNK
    assert lengths.min() >= 1100 and lengths.max() <= 16383
    assert tail.min() >= 1 and tail.max() <= 160 and len(set(tail)) > 160 * 0.9
    assert set((lengths - 1) // CHUNK) == set(range(1, 8))  # in every chunk the range reaches
    mixed = np.array([pick_length(rng, DataSpec(length_range=(1100, 16383), boundary_share=0.3))
                      for _ in range(3000)])
    assert 0.28 < ((mixed % CHUNK) <= 160).mean() < 0.36
    # aimed at the answer (a passkey answer + eos is 8 tokens, a multi-key one 10)
    aimed = np.array([pick_length(rng, DataSpec(length_range=(1100, 16383), boundary_share=1.0, boundary_tail=10))
                      for _ in range(500)])
    assert set(aimed % CHUNK) == set(range(1, 11))
    with pytest.raises(ValueError, match="boundary_share must be within 0..1"):
        DataSpec(boundary_share=1.5)
    with pytest.raises(ValueError, match="boundary_tail must be within 1..2047 tokens, got 0"):
        DataSpec(boundary_tail=0)


def test_random_lengths_put_the_question_at_every_offset_within_a_chunk():
    spec = DataSpec(length_range=(1100, 16383))
    rng = random.Random(0)
    lengths = np.array([pick_length(rng, spec) for _ in range(4000)])
    assert lengths.min() >= 1100 and lengths.max() <= 16383
    assert not (lengths % CHUNK == 0).any()
    # the question (~40-150 tokens before the end) at every eighth of a chunk, and sequences
    # that end in every chunk (1..8)
    question = (lengths - 60) % CHUNK
    assert set(question // (CHUNK // 8)) == set(range(8))
    assert set((lengths - 1) // CHUNK) == set(range(8))


def test_data_command_writes_real_text_rows_with_eos(text_file, tmp_path):
    out = tmp_path / "data"
    rc = cli.main(["data", "--out", str(out), "--text", str(text_file), "--eos", "--lengths", "700-4000",
                   "--rows", "40", "--group-rows", "8", "--files", "2", "--max-keys", "5"])
    assert rc == 0
    table = pq.read_table(out)
    assert table.num_rows == 40
    for f in sorted(out.glob("*.parquet")):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            assert len({len(x) for x in pf.read_row_group(g).column("input_ids").to_pylist()}) == 1
    for ids, start, n in zip(table.column("input_ids").to_pylist(), table.column("answer_start").to_pylist(),
                             table.column("answer_len").to_pylist()):
        assert ids[-1] == EOS_ID and start + n == len(ids) and 700 <= len(ids) <= 4000
    # the same data whatever the number of writer processes (per-file random streams)
    again = tmp_path / "again"
    spec = DataSpec(rows=40, group_rows=8, text=(str(text_file),), eos=True, length_range=(700, 4000), max_keys=5)
    from expertmesh.pipelines.train_data import write_dataset

    write_dataset(again, spec, files=2, workers=1)
    assert pq.read_table(again).equals(table)


def test_data_command_keeps_held_out_sources_out_of_training(tmp_path, capsys):
    rc = cli.main(["data", "--out", str(tmp_path / "d"), "--text", "train,kjv", "--rows", "8"])
    assert rc == 2 and "held out" in capsys.readouterr().err


def test_list_sources_names_packages_with_versions(capsys):
    assert cli.main(["data", "--list-sources"]) == 0
    out = capsys.readouterr().out
    for s in ts.SOURCES.values():
        assert s.name in out and all(p.spec in out for p in s.packages)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_checks_the_pinned_hash_and_extracts_text(tmp_path, monkeypatch):
    """The fetch path on a locally built .deb (no download): hash check, unpack, extract, manifest."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text("Package: demo-text\nVersion: 1.0-1\nArchitecture: all\n"
                                         "Maintainer: nobody <n@example.org>\nDescription: test text\n")
    doc = root / "usr/share/doc/demo-text"
    doc.mkdir(parents=True)
    (doc / "a.txt.gz").write_bytes(gzip.compress(b"First line.\r\nSecond\x0c line.\n\n\n\nThird.\n"))
    (doc / "b.html").write_text("<html><style>x{}</style><p>Hello &amp; <b>bye</b></p></html>")
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    deb = cache / "debs" / "demo-text_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True)
    digest = ts._sha256(deb.read_bytes())

    def no_download(pkg, into):
        raise AssertionError("must not download")

    monkeypatch.setattr(ts, "_download", no_download)
    src = ts.Source("demo", ts.TRAIN, (ts.Package("demo-text", "1.0-1", digest),), "test text",
                    lambda r: ts._files(r, "usr/share/doc/demo-text/*"))
    monkeypatch.setitem(ts.SOURCES, "demo", src)
    manifest = ts.fetch(["demo"], cache, keep_debs=True, log=lambda s: None)
    text = (cache / "demo.txt").read_text()
    assert text == "First line.\nSecond line.\n\nThird.\n\n\nHello & bye\n"
    assert manifest["demo"]["packages"][0]["version"] == "1.0-1"
    assert json.loads((cache / "manifest.json").read_text())["demo"]["text_sha256"] == ts._sha256(text.encode())
    assert ts.load("demo", cache).cite == "demo (demo-text=1.0-1)"
    bad = ts.Source("demo", ts.TRAIN, (ts.Package("demo-text", "1.0-1", "0" * 64),), "", src.extract)
    monkeypatch.setitem(ts.SOURCES, "demo", bad)
    with pytest.raises(ValueError, match="sha256"):
        ts.fetch(["demo"], cache, force=True, log=lambda s: None)


def test_plain_trainer_trains_on_real_text_rows_and_writes_a_loadable_model(text_file, tmp_path):
    """scripts/train_plain.py (the no-Ray trainer for the GPU machines): a few tiny steps."""
    import importlib.util
    from pathlib import Path

    from expertmesh.model.checkpoint import load_model

    data = tmp_path / "data"
    assert cli.main(["data", "--out", str(data), "--text", str(text_file), "--eos", "--lengths", "650-900",
                     "--rows", "8", "--group-rows", "4", "--files", "1"]) == 0
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_plain.py"
    spec = importlib.util.spec_from_file_location("train_plain", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
    out = tmp_path / "out"
    assert mod.main(["--config", str(config), "--data", str(data), "--output", str(out), "--max-steps", "3",
                     "--device", "cpu"]) == 0
    assert json.loads((out / "training.json").read_text())["step"] == 3
    assert load_model(out).cfg.num_layers == 2


def test_data_command_runs_without_ray_through_the_stand_in(tmp_path, text_file):
    """scripts/no_ray.py: the data command on a machine without Ray (as the lent GPU machines)."""
    import os
    import sys
    from pathlib import Path

    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoRay(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('no Ray here')\n"
        "sys.meta_path.insert(0, NoRay())\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), str(root)]))
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0
    res = subprocess.run([sys.executable, str(root / "scripts" / "no_ray.py"), "data", "--out", str(tmp_path / "d"),
                          "--text", str(text_file), "--eos", "--lengths", "650-900", "--rows", "8",
                          "--group-rows", "4", "--files", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert pq.read_table(tmp_path / "d").num_rows == 8
