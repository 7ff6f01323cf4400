"""Shipped corpora: present, sized as documented, match their manifest, and calib/held-out are disjoint."""

import hashlib
import json
import subprocess
import sys

from compressor.assets import CALIB_TEXT, CORPORA_DIR, HELDOUT_TEXTS


def test_assets_module_is_light():
    code = "import sys, compressor.assets; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_corpora_present_and_match_manifest():
    manifest = json.loads((CORPORA_DIR / "manifest.json").read_text())
    paths = {"calib.txt": CALIB_TEXT} | {p.name: p for p in HELDOUT_TEXTS.values()}
    assert set(manifest["files"]) == set(paths)
    total = 0
    for name, path in paths.items():
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"], name
        total += len(data)
        lo, hi = (250_000, 400_000) if name == "calib.txt" else (90_000, 160_000)
        assert lo <= len(data) <= hi, (name, len(data))
    assert total < 1_000_000
    assert (CORPORA_DIR / "SOURCES.md").exists()


def test_calib_and_heldout_disjoint():
    def paragraphs(path):
        return {p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 200}

    calib = paragraphs(CALIB_TEXT)
    texts = {name: paragraphs(p) for name, p in HELDOUT_TEXTS.items()}
    for name, paras in texts.items():
        assert len(paras) > 50, name
        assert not (paras & calib), f"held-out {name} shares paragraphs with calib.txt"
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not (texts[a] & texts[b]), (a, b)
