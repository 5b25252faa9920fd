"""How `qcompile/data/dev/` was made: excerpts of English documentation that Debian installs.

Run on a Debian machine with `python3.11-doc doc-debian debian-reference-en` installed (and
base-files' /usr/share/common-licenses). Each document is cut, at a paragraph break, just after
the text its windows need with SmolLM2's tokenizer (plus a margin); `qcompile.tools.devset` then reads
windows from the start of each excerpt. Splits, kinds and window caps are fixed here, before any
method was measured on them:

- report: the documents every table and `qcompile eval` report;
- tune:   documents for choosing defaults and hyperparameters (never reported);
- calib:  documents standing for the calibration text a user passes (never evaluated).

Usage: python benchmarks/build_devset.py   (rewrites qcompile/data/dev/)
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

LIC = "/usr/share/common-licenses/"
PY = "/usr/share/doc/python3.11/html/_sources/"
DEB = "/usr/share/doc/debian/"
PSF = "PSF License Agreement (Python 3.11 documentation, python3.11-doc)"
VERBATIM = "verbatim copying permitted (the licence text itself)"
DEB_LIC = "Debian documentation (doc-debian / debian-reference-en), redistribution permitted"

# (name, split, kind, source file, max windows of 512, regex of where to start or None, licence)
DOCUMENTS = [
    ("mpl-2.0", "report", "legal", LIC + "MPL-2.0", 6, None, VERBATIM),
    ("apache-2.0", "report", "legal", LIC + "Apache-2.0", 4, None, VERBATIM),
    ("lgpl-2.1", "report", "legal", LIC + "LGPL-2.1", 6, None, VERBATIM),
    ("py-howto-unicode", "report", "python-docs", PY + "howto/unicode.rst.txt", 6, None, PSF),
    ("py-tutorial-classes", "report", "python-docs", PY + "tutorial/classes.rst.txt", 6, None, PSF),
    ("py-faq-design", "report", "python-docs", PY + "faq/design.rst.txt", 6, None, PSF),
    ("debian-constitution", "report", "debian-project", DEB + "constitution.txt.gz", 6, None, DEB_LIC),
    ("debian-faq", "report", "debian-project", DEB + "FAQ/debian-faq.en.txt.gz", 6,
     r"Chapter\s+1\.\s+Definitions and overview", DEB_LIC),
    ("debian-bug-reporting", "report", "debian-project", DEB + "bug-reporting.txt.gz", 6, None, DEB_LIC),

    ("gpl-3", "tune", "legal", LIC + "GPL-3", 6, None, VERBATIM),
    ("gfdl-1.3", "tune", "legal", LIC + "GFDL-1.3", 6, None, VERBATIM),
    ("py-howto-sorting", "tune", "python-docs", PY + "howto/sorting.rst.txt", 6, None, PSF),
    ("py-howto-sockets", "tune", "python-docs", PY + "howto/sockets.rst.txt", 6, None, PSF),
    ("debian-manifesto", "tune", "debian-project", DEB + "debian-manifesto.gz", 2, None, DEB_LIC),
    ("debian-social-contract", "tune", "debian-project", DEB + "social-contract.txt.gz", 2, None, DEB_LIC),

    ("artistic", "calib", "legal", LIC + "Artistic", 2, None, VERBATIM),
    ("mpl-1.1", "calib", "legal", LIC + "MPL-1.1", 6, None, VERBATIM),
    ("py-howto-logging", "calib", "python-docs", PY + "howto/logging.rst.txt", 6, None, PSF),
    ("py-tutorial-controlflow", "calib", "python-docs", PY + "tutorial/controlflow.rst.txt", 6, None, PSF),
    ("debian-mailing-lists", "calib", "debian-project", DEB + "mailing-lists.txt.gz", 6, None, DEB_LIC),
    ("debian-reference-ch2", "calib", "debian-project", "/usr/share/debian-reference/debian-reference.en.txt.gz", 6,
     r"Chapter\s+2\.\s+Debian package management", DEB_LIC),
]
SEQLEN = 512
MARGIN = 1.15  # extra text beyond the windows, so other tokenizers also fill them


def read(path: str) -> str:
    p = Path(path)
    return gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text()


def excerpt(text: str, tokenizer, n_tokens: int) -> str:
    """The shortest prefix, ending at a blank line, with at least `n_tokens` tokens."""
    breaks = [m.end() for m in re.finditer(r"\n\s*\n", text)] + [len(text)]
    for end in breaks:
        if len(tokenizer(text[:end]).input_ids) >= n_tokens:
            return text[:end].rstrip() + "\n"
    return text.rstrip() + "\n"


def main():
    from transformers import AutoTokenizer

    from qcompile.tools.models import _smollm2_dir

    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    out = Path(__file__).parents[1] / "qcompile" / "data" / "dev"
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, split, kind, src, windows, start, licence in DOCUMENTS:
        text = read(src)
        if start is not None:
            text = text[re.search(start, text).start():]
        cut = excerpt(text, tok, int(windows * SEQLEN * MARGIN))
        (out / f"{name}.txt").write_text(cut)
        n = len(tok(cut).input_ids)
        manifest.append(dict(name=name, split=split, kind=kind, source=src, licence=licence, max_windows=windows))
        print(f"{split:7s} {kind:15s} {name:26s} {len(cut):7d} chars {n:6d} tokens -> {min(windows, n // SEQLEN)} windows")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
