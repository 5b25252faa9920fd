"""The development evaluation set: sizes, kinds, fixed windows, and disjointness from calibration."""
import pytest
import torch

from qcompile.methods import calibration
from qcompile.tools import devset


def _shingles(text: str, n: int = 60, step: int = 20) -> set[str]:
    """60-character passages with some words in them (rule lines of dashes are not text)."""
    t = " ".join(text.split())
    return {p for p in (t[i:i + n] for i in range(0, len(t) - n, step)) if sum(c.isalpha() for c in p) >= n // 2}


@pytest.fixture(scope="module")
def tok(smollm2_loader):
    return smollm2_loader()[1]


@pytest.mark.parametrize("split,min_tokens", [("report", 16_000), ("tune", 8_000), ("calib", 8_000)])
def test_each_split_has_three_kinds_and_enough_tokens(tok, split, min_tokens):
    w = devset.windows(tok, split)
    assert w.ids.shape[1] == 512 and w.ids.numel() >= min_tokens
    assert set(w.kinds) == {"legal", "python-docs", "debian-project"}
    assert len(set(w.documents)) >= 6


def test_windows_are_consecutive_tokens_of_one_document(tok):
    w = devset.windows(tok, "report")
    for doc in devset.documents("report"):
        ids = tok(doc.text, return_tensors="pt").input_ids[0]
        mine = w.ids[[i for i, d in enumerate(w.documents) if d == doc.name]]
        assert torch.equal(mine.reshape(-1), ids[: mine.numel()])  # from the start, no gap, no overlap
    quick = devset.windows(tok, "report", per_document=1)
    assert len(quick) == len(devset.documents("report")) and torch.equal(quick.ids[0], w.ids[0])


def test_splits_and_shipped_calibration_and_training_text_share_no_passage():
    report = "\n".join(d.text for d in devset.documents("report"))
    norm = " ".join(report.split())
    for other in ("tune", "calib"):
        for doc in devset.documents(other):
            shared = sum(s in norm for s in _shingles(doc.text))
            # licences quote a few stock phrases (the FSF's address, "WITHOUT ANY WARRANTY");
            # MPL-1.1 (calib) shares about 7% of its 60-character passages with MPL-2.0 (report)
            assert shared <= 0.07 * len(_shingles(doc.text)), (other, doc.name, shared)
    cal = " ".join(calibration.default_text().split())
    training = " ".join(calibration.training_text().split())  # DL-QAT's: the calibration text and more
    for doc in devset.documents("report") + devset.documents("tune"):
        if doc.split == "report":
            assert sum(s in cal for s in _shingles(doc.text)) <= 2, doc.name
        assert sum(s in training for s in _shingles(doc.text)) <= 2, doc.name  # a cross-reference title or two


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        devset.documents("test")
