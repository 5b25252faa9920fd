"""How `qcompile/data/qat_text.txt` was made: more English for DL-QAT's default training text.

DL-QAT trains on qcompile's calibration text plus this file (`qcompile.qat.distill.default_text`).
The calibration text alone (~49k tokens, 85 training windows of 512) is seen almost twice by the
default recipe, and the trained model over-fits it (training KL 0.08 against 0.135 on its held-out
windows at W3 g64); this file adds ~110k tokens of other documents, so the default recipe sees each
window about once. The documents are Python 3.11 documentation and Debian documentation that
Debian installs (`python3.11-doc doc-debian debian-reference-en`) and CC0's text — none of them a
development-set document (`qcompile/data/dev/`, checked by tests/test_devset.py); licence texts that
share passages with the development set's (GPL/LGPL/MPL families, older constitutions) are left out.

Usage: python benchmarks/build_qat_text.py   (rewrites qcompile/data/qat_text.txt)
"""
from __future__ import annotations

import re
from pathlib import Path

from build_devset import SEQLEN, excerpt, read

PY = "/usr/share/doc/python3.11/html/_sources/"
DEB = "/usr/share/doc/debian/"
REF = "/usr/share/debian-reference/debian-reference.en.txt.gz"

# (source file, max windows of 512, regex of where to start or None)
DOCUMENTS = [
    (PY + "faq/general.rst.txt", 8, None),
    (PY + "faq/programming.rst.txt", 14, None),
    (PY + "faq/library.rst.txt", 8, None),
    (PY + "howto/functional.rst.txt", 10, None),
    (PY + "howto/regex.rst.txt", 10, None),
    (PY + "howto/descriptor.rst.txt", 8, None),
    (PY + "howto/enum.rst.txt", 6, None),
    (PY + "howto/urllib2.rst.txt", 6, None),
    (PY + "howto/argparse.rst.txt", 4, None),
    (PY + "tutorial/introduction.rst.txt", 6, None),
    (PY + "tutorial/datastructures.rst.txt", 6, None),
    (PY + "tutorial/modules.rst.txt", 6, None),
    (PY + "tutorial/inputoutput.rst.txt", 6, None),
    (PY + "tutorial/errors.rst.txt", 6, None),
    (PY + "tutorial/stdlib.rst.txt", 4, None),
    (PY + "tutorial/floatingpoint.rst.txt", 4, None),
    (DEB + "FAQ/debian-faq.en.txt.gz", 16, r"Chapter\s+7\.\s+Basics of the Debian package"),
    (DEB + "bug-maint-info.txt.gz", 3, None),
    (DEB + "bug-log-access.txt", 2, None),
    (REF, 12, r"Chapter\s+1\.\s+GNU/Linux tutorials"),
    (REF, 8, r"Chapter\s+3\.\s+The system initialization"),
    (REF, 8, r"Chapter\s+4\.\s+Authentication and access"),
    (REF, 8, r"Chapter\s+5\.\s+Network setup"),
    (REF, 8, r"Chapter\s+9\.\s+System tips"),
    (REF, 8, r"Chapter\s+10\.\s+Data management"),
    (REF, 8, r"Chapter\s+12\.\s+Programming"),
    ("/usr/share/common-licenses/CC0-1.0", 4, None),
]


def main():
    from transformers import AutoTokenizer

    from qcompile.tools.models import _smollm2_dir

    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    parts, total = [], 0
    for src, windows, start in DOCUMENTS:
        text = read(src)
        if start is not None:
            text = text[re.search(start, text).start():]
        cut = excerpt(text, tok, windows * SEQLEN)
        n = len(tok(cut).input_ids)
        total += n
        parts.append(cut)
        print(f"{src.split('/')[-1]:32s} {start or '':45.45s} {len(cut):7d} chars {n:6d} tokens")
    out = Path(__file__).parents[1] / "qcompile" / "data" / "qat_text.txt"
    out.write_text("\n\n".join(parts))
    print(f"{total} tokens, {out.stat().st_size} bytes -> {out}")


if __name__ == "__main__":
    main()
