"""ltm/names.py is the only place a metric key, an MLflow tag or a run status is spelled.

A name spelled twice can drift: a renamed metric that one reader still asks for under the old name
reads as missing (NaN), not as an error. The scan reads every string in ltm/, studies/, analysis/
and benchmarks/ (docstrings aside) and flags the ones that spell such a name.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from ltm import names

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("ltm", "studies", "analysis", "benchmarks")

_PREFIXES = (names.VAL, names.TRAIN, "eval", names.GENERATION, names.GSM8K, names.ZERO_SHOT, names.FINAL, "system")
_METRIC = re.compile(rf"^({'|'.join(_PREFIXES)})/")
_TAGS = {v for k, v in vars(names).items() if k.endswith("_TAG")}
_TAG_IN_FILTER = re.compile(r"`(ltm|mlflow)\.")
_STATUSES = {s.value for s in names.Status} | {"SCHEDULED"}
# the measures that follow a composed prefix, as in f"{prefix}/nll" or f"{task}/seconds"
_MEASURES = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_]+", v)}
_WORD_METRICS = {names.TOKENS_PER_S, names.FLOPS_PAPER}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (of modules, classes, functions) or bare
    strings standing as statements (attribute docstrings)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def _is_name(text: str, in_fstring: bool) -> bool:
    tag = text in _TAGS or text.startswith(names.COUNT_TAG_PREFIX) or bool(_TAG_IN_FILTER.search(text))
    metric = bool(_METRIC.match(text)) or text in _WORD_METRICS
    # a measure joined to a composed prefix: f"{prefix}/nll", f"{name}/seconds"
    composed = in_fstring and text.startswith("/") and text[1:].split("/")[0] in _MEASURES
    return tag or metric or composed or text in _STATUSES


def spelled_names(source: str) -> list[tuple[int, str]]:
    """(line, string) of each string in `source` that spells a metric key, a tag or a status."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    pieces = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if _is_name(node.value, id(node) in pieces):
                found.append((node.lineno, node.value))
    return sorted(found)


def test_names_are_spelled_only_in_names_py():
    spelled = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "ltm" / "names.py":
                continue
            spelled += [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                        for line, text in spelled_names(path.read_text())]
    assert not spelled, "spell these with ltm.names (add the name there if it is new):\n" + "\n".join(spelled)


def test_the_scan_finds_each_kind_of_name():
    source = '''
"""A docstring may say val/nll, ltm.run_key and FINISHED."""
a = "val/ppl_bound"
b = {"ltm.run_key": 1}
c = f"{prefix}/nll"
d = f"gsm8k/k{k}/{m}"
e = "tags.`ltm.role` = 'eval'"
f = run.info.status == "FINISHED"
g = "tokens_per_s"
h = f"{root}/checkpoints"
i = "openai/gsm8k"
j = "the run FINISHED at 10 tokens"
k = "mlflow.db"
l = "ltm.memory.update"
m = f"ltm.count.{status}"
'''
    assert [line for line, _ in spelled_names(source)] == [3, 4, 5, 6, 7, 8, 9, 15]


def test_composed_names_match_the_ones_analysis_reads():
    assert names.metric(names.VAL, names.NLL) == names.VAL_NLL == "val/nll"
    assert names.gsm8k_metric(8, "accuracy") == "gsm8k/k8/accuracy"
    assert names.metric(names.ZERO_SHOT, "wikitext", names.PPL_BOUND) == "zeroshot/wikitext/ppl_bound"
    assert names.tag_is(names.ROLE_TAG, names.ROLE_EVAL) == "tags.`ltm.role` = 'eval'"
    assert names.status_is(names.Status.FINISHED) == "attributes.status = 'FINISHED'"


def test_every_commands_help_states_the_exit_statuses_of_exit():
    from ltm.train import build_parser
    from studies.inference_scaling import STUDY
    from studies.options import build_parser as study_parser

    for epilog in (build_parser().epilog, study_parser(STUDY).epilog):
        stated = re.findall(r"(\d) [a-z]", epilog.split("Exit status:")[1])
        assert stated == [str(int(code)) for code in names.Exit]
        assert f"{int(names.Exit.USAGE)} bad options (nothing started)" in epilog


@pytest.mark.parametrize("module", ["studies.rekey", "ltm.kl_floor"])
def test_the_helper_commands_help_states_the_exit_statuses_too(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main(["--help"])
    epilog = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    stated = re.findall(r"(\d) [a-z]", epilog.split("Exit status:")[1])
    assert stated == [str(int(code)) for code in names.Exit]
