"""The two seed reproductions in bench/ (scaling_rule.py, adagrad_batch.py): each runs in quick
mode and writes its PNG and a Markdown table of the expected shape; the functions that turn
numbers into a verdict are checked on hand-made numbers. Whether a claim holds is measured by
the full runs (bench/results), never asserted here."""

from __future__ import annotations

import math

import pytest

from bench import adagrad_batch, scaling_rule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table of ``markdown``: rows of cells, header first, separator dropped."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_scaling_rule_quick_writes_plot_and_table(tmp_path, capsys):
    assert scaling_rule.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "[scaling_rule] seed 0 galore linear B= 64" in capsys.readouterr().out
    _assert_png(tmp_path / "scaling_rule.png")
    text = (tmp_path / "scaling_rule.md").read_text()
    [table] = _tables(text)
    assert table[0] == ["optimizer", "rule", "final @ B=4", "final @ B=16", "final @ B=64",
                        "spread", "relative spread", "curve spread"]
    body = table[1:]
    assert [(r[0], r[1]) for r in body] == [(o, rule) for o in scaling_rule.OPTIMIZERS
                                            for rule in scaling_rule.RULES]
    for row in body:
        finals = [float(v) for v in row[2:5]]
        assert all(math.isfinite(v) and v > 0 for v in finals)
        # every cell is rounded to 4 significant digits
        assert float(row[5]) == pytest.approx(max(finals) - min(finals), abs=1e-3 * max(finals))
        assert row[6].endswith("%") and row[7].endswith("%")
    # κ = 1 is the same run under every rule
    assert len({row[2] for row in body if row[0] == "adamw"}) == 1
    assert "not judged: a --quick smoke run" in text
    assert "Noise-to-signal ratio" in text


def test_adagrad_batch_quick_writes_plot_and_tables(tmp_path, capsys):
    assert adagrad_batch.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "[adagrad_batch] adagrad  B=  256" in capsys.readouterr().out
    _assert_png(tmp_path / "adagrad_batch.png")
    text = (tmp_path / "adagrad_batch.md").read_text()
    iterations, gains = _tables(text)
    assert iterations[0] == ["optimizer", "B", "tuned lr", "median iters", "per seed"]
    batches = adagrad_batch.QUICK["batches"]
    assert [(r[0], int(r[1])) for r in iterations[1:]] == [
        (o, b) for o in adagrad_batch.OPTIMIZERS for b in batches]
    for row in iterations[1:]:
        cap = adagrad_batch.QUICK["max_iters"]
        assert row[3] == f">{cap}" or 1 <= int(row[3]) <= cap
        if not row[3].startswith(">"):
            assert float(row[2]) in adagrad_batch.GRIDS[row[0]]
    assert gains[0] == ["optimizer", f"{batches[0]}→{batches[1]}", "critical B"]
    assert [r[0] for r in gains[1:]] == list(adagrad_batch.OPTIMIZERS)
    assert "not judged: a --quick smoke run" in text


def test_critical_batch_and_verdict():
    batches = [1, 4, 16, 64]
    # 4× per step until 16, then only 1.25×: flattens from 16
    assert adagrad_batch.speedups(batches, [640, 160, 40, 32]) == [4.0, 4.0, 1.25]
    assert adagrad_batch.critical_batch(batches, [640, 160, 40, 32]) == 16
    assert adagrad_batch.critical_batch(batches, [640, 160, 40, 10]) is None  # never flattens
    # a missed target (inf) is no evidence of flattening
    assert adagrad_batch.critical_batch(batches, [math.inf, 160, 40, 10]) is None
    assert adagrad_batch.judge({"sgd": 4, "adagrad": None}, batches).startswith("held")
    assert adagrad_batch.judge({"sgd": 4, "adagrad": 16}, batches).startswith("held")
    assert adagrad_batch.judge({"sgd": 16, "adagrad": 4}, batches).startswith("did not hold")
    assert adagrad_batch.judge({"sgd": None, "adagrad": None}, batches).startswith(
        "did not hold")


def test_lowrank_verdict_compares_critical_batch_and_iterations_with_adagrads():
    batches = [1, 4, 16]

    def rows(adagrad, lowrank):
        return [{"optimizer": name, "median_iters": it}
                for name, iters in (("adagrad", adagrad), ("lowrank_adagrad", lowrank))
                for it in iters]

    judge = adagrad_batch.judge_lowrank
    same = rows([100, 30, 9], [110, 33, 10])
    assert judge({"adagrad": None, "lowrank_adagrad": None}, same, batches).startswith(
        "kept (critical batch ≥ 16 vs Adagrad's ≥ 16; iterations at most 1.11×")
    assert judge({"adagrad": None, "lowrank_adagrad": 4}, same, batches).startswith("not kept")
    slow = rows([100, 30, 9], [100, 30, 20])  # 2.2× Adagrad's count at B = 16
    assert judge({"adagrad": None, "lowrank_adagrad": None}, slow, batches).startswith(
        "not kept")
    assert judge({"adagrad": None}, same, batches).startswith("not measured")


def test_critical_batch_ratio_prefers_the_spiked_spectrum():
    # isotropic: the two bounds' critical batches coincide
    assert adagrad_batch.critical_batch_ratio(adagrad_batch.torch.ones(64)) == pytest.approx(1)
    spiked = adagrad_batch.critical_batch_ratio(adagrad_batch.feature_scales("spiked"))
    log = adagrad_batch.critical_batch_ratio(adagrad_batch.feature_scales("log"))
    assert spiked > 10 and 3 < log < spiked
    with pytest.raises(ValueError, match="spectrum"):
        adagrad_batch.feature_scales("flat")


def test_scaling_rule_summary_and_verdict():
    curves = {1: [4.0] * 8, 4: [4.0] * 4 + [5.0] * 4, 16: [3.0] * 8}
    s = scaling_rule.summarize(curves)
    assert s["final_1B"] == 4.0 and s["final_4B"] == 5.0 and s["final_16B"] == 3.0
    assert s["spread"] == 2.0 and s["relative_spread"] == pytest.approx(0.5)
    assert s["curve_spread"] == pytest.approx(0.5)  # the second half: 5, 4, 3 at every point

    def row(rule, rel, curve):
        return {"optimizer": "adamw", "rule": rule, "relative_spread": rel,
                "curve_spread": curve}

    assert scaling_rule.judge([row("none", 0.3, 0.3), row("sqrt", 0.05, 0.04),
                               row("linear", 0.6, 0.7)], "adamw").startswith("held")
    # smallest final spread but a curve spread above 10 %: the curves did not stay together
    assert scaling_rule.judge([row("none", 0.3, 0.3), row("sqrt", 0.05, 0.2),
                               row("linear", 0.6, 0.7)], "adamw").startswith("did not hold")
    assert scaling_rule.judge([row("none", 0.03, 0.3), row("sqrt", 0.05, 0.04),
                               row("linear", 0.6, 0.7)], "adamw").startswith("did not hold")
