"""evals/data/build_corpora.py: the shipped calibration and held-out texts change only on purpose."""
import json

import pytest

from evals.data import build_corpora as bc


@pytest.fixture
def sources(monkeypatch):
    """Three synthetic sources of 12 documents each, small targets: a few documents per split."""
    docs = {s: [bc.Doc(s, f"{s}-{i}", f"{s} document {i}. " * 20) for i in range(12)]
            for s in ("pydocs", "austen", "shakespeare")}
    monkeypatch.setattr(bc, "HELDOUT_TARGET", 1000)
    monkeypatch.setattr(bc, "CALIB_TARGET", {s: 800 for s in docs})
    for s in docs:
        monkeypatch.setattr(bc, f"load_{s}", lambda s=s: list(docs[s]))
    monkeypatch.setattr(bc, "installed_versions", lambda: "installed: python3.11-doc X")
    return docs


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_build_that_would_change_the_shipped_texts_is_refused_and_writes_nothing(tmp_path, sources, monkeypatch):
    out, train = tmp_path / "corpora", tmp_path / "cache" / "train.txt"
    manifest = bc.build(out, train)  # nothing shipped yet: written
    assert {p.name for p in out.iterdir()} == {"calib.txt", "heldout_pydocs.txt", "heldout_austen.txt",
                                                 "heldout_shakespeare.txt", "manifest.json"}
    assert manifest["train"]["documents"] > 0 and train.read_text().count("document") > 0
    bc.build(out, train, check=True)  # the same sources: up to date
    before, train_before = snapshot(out), train.read_bytes()

    # another package version: one held-out document's text differs
    heldout_id = json.loads((out / "manifest.json").read_text())["documents"]["austen"]["heldout"][0]
    sources["austen"] = [bc.Doc("austen", d.doc_id, d.text + " Amended.") if d.doc_id == heldout_id else d
                         for d in sources["austen"]]
    with pytest.raises(SystemExit, match=r"differs from the shipped corpora in heldout_austen.txt.*"
                                         r"installed: python3.11-doc X.*--write-shipped"):
        bc.build(out, train)
    assert snapshot(out) == before and train.read_bytes() == train_before
    with pytest.raises(SystemExit, match="heldout_austen.txt"):
        bc.build(out, train, check=True)

    bc.build(out, train, write_shipped=True)  # on purpose
    assert "Amended." in (out / "heldout_austen.txt").read_text()
    assert snapshot(out)["manifest.json"] != before["manifest.json"]


def test_a_different_training_text_is_written_with_a_warning_and_the_manifest_kept(tmp_path, sources, capsys):
    out, train = tmp_path / "corpora", tmp_path / "train.txt"
    bc.build(out, train)
    before = snapshot(out)
    shipped = json.loads((out / "manifest.json").read_text())["documents"]["pydocs"]
    train_id = next(d.doc_id for d in sources["pydocs"] if d.doc_id not in shipped["heldout"] + shipped["calib"])
    sources["pydocs"] = [bc.Doc("pydocs", d.doc_id, d.text + " Changed.") if d.doc_id == train_id else d
                         for d in sources["pydocs"]]
    bc.build(out, train)
    assert "Changed." in train.read_text() and not (tmp_path / "train.txt.tmp").exists()
    assert snapshot(out) == before  # the manifest still records the shipped build's training text
    assert "warning: the training text differs" in capsys.readouterr().err
