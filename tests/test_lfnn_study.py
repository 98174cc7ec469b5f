"""Smoke test of the LFNN study script (benchmarks/lfnn_study.py) in its quickest configuration on digits."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import load_benchmark


def _table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the first markdown table after ``heading``."""
    lines = text[text.index(heading) :].splitlines()[1:]
    rows = []
    for line in lines:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) >= 2 and set(rows[1]) <= {"---"}, rows[:2]
    return rows[0], rows[2:]


def _percent(cell: str) -> float:
    m = re.match(r"^(\d+(?:\.\d+)?)", cell)
    assert m, f"not an accuracy: {cell!r}"
    return float(m.group(1))


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_quick_digits_report(tmp_path, one_thread):
    study = load_benchmark("lfnn_study")
    out = tmp_path / "report.md"
    runs, text = study.main(
        [
            "--quick",
            "--datasets=digits",
            "--deltas=0.5",
            "--ablation-deltas=0.5",
            "--digits-epochs=1",
            "--log=",
            f"--out={out}",
        ]
    )
    assert out.read_text() == text
    assert text.splitlines()[0].startswith("# LFNN study")
    assert "python benchmarks/lfnn_study.py --quick" in text

    # every run: accuracies are fractions
    assert runs and all(0.0 <= r.test_acc <= 1.0 and 0.0 <= r.train_acc <= 1.0 for r in runs)
    # 2 models x (BP, LFNN, LFNN-l) + 3 ablation variants (the full loss at delta 0.5 is the main grid's LFNN)
    assert len(runs) == 2 * 3 + 3

    head, rows = _table(text, "## Test accuracy")
    assert head == ["dataset", "model", "method", "no δ", "50 %"]
    assert [r[:3] for r in rows] == [["digits", m, meth] for m in ("MLP", "CNN") for meth in ("BP", "LFNN", "LFNN-l")]
    for row in rows:
        cells = row[3:]
        filled = [c for c in cells if c]
        if row[2] == "BP":
            assert cells[0] and not any(cells[1:])
        else:
            assert not cells[0] and len(filled) == 1
        assert all(0.0 <= _percent(c) <= 100.0 for c in filled)

    head, rows = _table(text, "## Loss ablation")
    assert head[:6] == ["dataset", "δ", "variant", "l1", "l2", "test acc (%)"]
    assert [r[2] for r in rows] == [
        "L_g + L_leader + L_follower",
        "L_g + L_leader",
        "L_g + L_follower",
        "L_g only (followers blocked)",
        "BP, no workers",
    ]
    assert all(0.0 <= _percent(r[5]) <= 100.0 for r in rows)
