"""Perplexity (standard convention) and the `qcompile eval` command, on tiny models (fast)."""
import math
import re
from types import SimpleNamespace

import pytest
import torch

import qcompile
from qcompile import RTNConfig
from qcompile.tools import evaluate
from qcompile.tools.cli import main
from qcompile.tools.models import load_model
from tests.conftest import save_tiny_model, tiny_llama, tiny_tokenizer

TEXT = " ".join(f"Sentence {i} says that the quick brown fox jumps over {i % 7} lazy dogs." for i in range(40))


class Uniform(torch.nn.Module):
    """Logits all equal: every token has probability 1/vocab, so perplexity is exactly vocab."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.windows = vocab, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        self.windows.append(ids.clone())
        return SimpleNamespace(logits=torch.zeros(1, ids.shape[1], self.vocab))


def test_perplexity_windows_drop_the_remainder():
    model = Uniform(50)
    ids = torch.arange(2 * 8 + 5).reshape(1, -1)
    assert perplexity_close(evaluate.perplexity(model, ids=ids, seqlen=8, max_tokens=None, progress=False), 50)
    assert [w.tolist() for w in model.windows] == [[list(range(8))], [list(range(8, 16))]]  # no overlap, no tail
    model.windows.clear()
    evaluate.perplexity(model, ids=ids, seqlen=4, max_tokens=10, progress=False)
    assert len(model.windows) == 2  # the first 10 tokens: two windows of 4
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.perplexity(model, ids=ids, seqlen=64, progress=False)


def perplexity_close(a, b):
    return math.isclose(a, b, rel_tol=1e-6)  # float32 cross-entropy


def test_perplexity_is_exp_mean_nll_over_all_windows():
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = evaluate.token_ids(tok, TEXT)[:, :200]
    nll = []
    with torch.no_grad():
        for start in (0, 64, 128):  # 3 windows of 64; tokens 192..199 dropped
            w = ids[:, start:start + 64]
            logp = torch.log_softmax(model(w).logits[0, :-1].double(), dim=-1)
            nll.append(-logp.gather(1, w[0, 1:, None]).squeeze(1))
    expect = torch.cat(nll).mean().exp().item()
    got = evaluate.perplexity(model, tok, TEXT, seqlen=64, max_tokens=200, progress=False)
    assert math.isclose(got, expect, rel_tol=1e-5)
    halves = [TEXT[:300], TEXT[300:]]  # several texts are joined with a blank line
    joined = evaluate.perplexity(model, tok, halves[0] + "\n\n" + halves[1], seqlen=64, progress=False)
    assert evaluate.perplexity(model, tok, halves, seqlen=64, progress=False) == joined


def _table_row(out: str, label: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(label))
    return line[len(label):].split()


@pytest.fixture
def tiny_dir(tmp_path):
    path = save_tiny_model(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    return path


def test_eval_command_prints_float_and_quantized_side_by_side(tiny_dir, capsys):
    rc = main(["eval", "--model", str(tiny_dir), "--config", "minmax", "--text", str(tiny_dir.parent / "text.txt"),
               "--seqlen", "64", "--max-tokens", "256", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    float_model, tok = load_model(str(tiny_dir))
    ids = evaluate.token_ids(tok, TEXT)
    f = evaluate.perplexity(float_model, ids=ids, seqlen=64, max_tokens=256, progress=False)
    qcompile.quantize(float_model, RTNConfig(search="minmax"), progress=False)
    q = evaluate.perplexity(float_model, ids=ids, seqlen=64, max_tokens=256, progress=False)
    ppl = _table_row(out, "perplexity")
    assert ppl[0::3] == [f"{f:.2f}", f"{q:.2f}", f"{q / f:.3f}"]  # each with ± its standard error
    linear_ratio = float(_table_row(out, "weight bytes, linears (MiB)")[-1].rstrip("x"))
    assert linear_ratio < 0.3  # int4 + scales against float32
    assert "256 tokens in 4 windows of 64" in out


def test_eval_command_reads_a_gptq_checkpoint_and_compiles(tiny_dir, capsys):
    model, tok = load_model(str(tiny_dir))
    qcompile.quantize(model, RTNConfig(search="minmax"), progress=False)
    qcompile.save(model, tiny_dir.parent / "gptq", format="gptq")
    expect = evaluate.perplexity(model, tok, TEXT, seqlen=64, max_tokens=128, progress=False)
    rc = main(["eval", "--model", str(tiny_dir), "--config", str(tiny_dir.parent / "gptq"), "--text",
               str(tiny_dir.parent / "text.txt"), "--seqlen", "64", "--max-tokens", "128", "--compile", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert math.isclose(float(_table_row(out, "perplexity")[3]), expect, abs_tol=0.011)
    assert "torch.compile, backend=qcompile" in out


def test_eval_command_interrupt_and_bad_input(tiny_dir, capsys, monkeypatch):
    text = ["--text", str(tiny_dir.parent / "text.txt"), "--no-progress"]
    assert main(["eval", "--model", str(tiny_dir), "--config", "nonsense", *text]) == 2
    assert "neither a method" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--seqlen", "100000", "--max-tokens", "0", *text]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--text", "/nonexistent/file.txt"]) == 2

    real = evaluate.window_nll
    calls = []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the quantized model's evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "window_nll", interrupted_second_time)
    assert main(["eval", "--model", str(tiny_dir), "--config", "minmax", "--seqlen", "64", "--max-tokens", "128", *text]) == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.err
    row = _table_row(captured.out, "perplexity")
    assert re.fullmatch(r"\d+\.\d\d", row[0]) and row[3:] == ["-", "-"]  # the float row survives


def test_spread_is_the_standard_error_over_windows_and_the_ratio_is_paired():
    f = evaluate.Perplexity(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    q = evaluate.Perplexity(torch.tensor([2.1, 3.3, 4.2], dtype=torch.float64))
    assert math.isclose(f.ppl, math.exp(3.0)) and math.isclose(f.se, math.exp(3.0) * 1.0 / math.sqrt(3))
    r, se = q.ratio_to(f)  # differences 0.1, 0.3, 0.2: mean 0.2, sample std 0.1
    assert math.isclose(r, math.exp(0.2)) and math.isclose(se, math.exp(0.2) * 0.1 / math.sqrt(3))
    assert se < q.se / q.ppl  # pairing removes the windows' own spread
    with pytest.raises(ValueError, match="different windows"):
        q.ratio_to(evaluate.Perplexity(torch.zeros(2, dtype=torch.float64)))


def test_perplexity_takes_prepared_windows_as_they_are():
    model = Uniform(50)
    windows = torch.arange(3 * 8).reshape(3, 8)
    assert perplexity_close(evaluate.perplexity(model, ids=windows, progress=False), 50)
    assert [w[0].tolist() for w in model.windows] == windows.tolist()
