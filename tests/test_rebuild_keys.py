"""`python -m analysis.rebuild_keys`: every run key docs/RESULTS.md quotes is rebuilt from a command the
document gives, and a key no command produces is named with its line (exit 1)."""

from pathlib import Path

from analysis import rebuild_keys
from ltm.config import run_preset

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_in_results_is_rebuilt_from_its_documented_command(capsys):
    assert rebuild_keys.main([str(ROOT / "docs" / "RESULTS.md")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "CANNOT" not in out and "unreadable" not in out
    assert "rebuilt 41552ab061e83988" in out  # the 7.1 row that needed its inner lr_min


def test_a_key_no_command_produces_is_named_with_its_line(tmp_path, capsys):
    key = run_preset("micro-rf").with_overrides(["inference.steps=4"]).run_key()
    encoder = run_preset("micro-rf").with_overrides(["inference.start=encoder", "inference.steps=16"]).run_key()
    doc = tmp_path / "doc.md"
    doc.write_text(f"A run:\n\n    python -m ltm.train --preset micro-rf --set inference.steps=4\n\n"
                   f"gives `{key}`; a typo gives `0123456789abcdef`.\n\n"
                   "Runs, `python -m ltm.train --preset micro-rf --experiment x --set ...` with the options in the "
                   "first columns:\n\n| run key | start | T |\n|---|---|---|\n"
                   f"| `{encoder}` | encoder | 16 |\n"
                   "| `fedcba9876543210` | somewhere | 4 |\n")
    assert rebuild_keys.main([str(doc)]) == 1
    out = capsys.readouterr().out
    assert f"rebuilt {key}  (line 3: python -m ltm.train --preset micro-rf --set inference.steps=4)" in out
    assert "CANNOT rebuild 0123456789abcdef (line 5)" in out
    assert "table row: start 'somewhere' is none of" in out  # a cell it cannot read, named
    assert "2 of 4 run keys rebuilt" in out
    assert rebuild_keys.main([str(tmp_path / "nothing.md")]) == 2
    assert "is not a file" in capsys.readouterr().err
