"""The repository stands on its own: one setting for the local data sets ($LTM_DATA_DIR, `ltm.data.paths`), no
other path out of the repository, and the method it cites (docs/METHOD.md) inside it, every cited section there."""

import json
import re
from pathlib import Path

import pytest

from ltm import train
from ltm.data import DataNotFoundError, resolve_source
from ltm.data.paths import DATA_DIR_ENV, data_dir, data_path, expand
from ltm.gsm8k import load_problems
from ltm.names import Exit

ROOT = Path(__file__).resolve().parents[1]
OUT_OF_REPO = "../" + "shared"  # spelled in two pieces so that this file does not match its own scan


def _gsm8k(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    return folder


# -- the setting ---------------------------------------------------------------------------------------

def test_without_the_variable_the_data_folder_is_shared_data_beside_the_repository(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    default = data_dir()
    assert default.parents[1] == ROOT.parent and default.parts[-2:] == ("shared", "data")
    monkeypatch.setenv(DATA_DIR_ENV, "")  # set but empty: the default too
    assert data_dir() == default


def test_the_variable_overrides_the_default_everywhere_data_is_named(monkeypatch, tmp_path):
    gsm8k = _gsm8k(tmp_path / "gsm8k")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text(" = A =\n\n text\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path and data_path("gsm8k") == gsm8k
    assert expand("data:gsm8k") == str(gsm8k)
    assert expand("gsm8k") == "gsm8k" and expand("corpus/x.txt") == "corpus/x.txt"  # hub names, paths: as given
    assert load_problems("data:gsm8k", "test")[0].final == "2"
    assert resolve_source("data:wikitext-2/valid.txt").path == tmp_path / "wikitext-2" / "valid.txt"


@pytest.mark.parametrize("configured", [True, False], ids=["set", "unset"])
def test_a_missing_data_set_is_an_error_naming_the_variable(monkeypatch, tmp_path, configured):
    if configured:
        monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    else:
        monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataNotFoundError) as err:
        data_path("no-such-set")
    message = str(err.value)
    assert f"set {DATA_DIR_ENV} to the folder that holds gsm8k/" in message and "no-such-set" in message
    assert (f"{DATA_DIR_ENV}={tmp_path}" if configured else f"{DATA_DIR_ENV} is unset") in message
    with pytest.raises(DataNotFoundError, match=DATA_DIR_ENV):
        load_problems("data:no-such-set", "test")


def test_data_names_a_place_inside_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    for name in ("data:", "data:/etc"):
        with pytest.raises(ValueError, match="must name a file or folder inside"):
            expand(name)


def test_a_command_given_a_missing_data_set_exits_2_naming_the_variable(monkeypatch, tmp_path, capsys):
    from studies.icl_gsm8k import STUDY
    from studies.launcher import main

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    runs = tmp_path / "runs"
    common = ["--preset", "smoke", "--runs-dir", str(runs)]
    assert train.main([*common, "--data", "data:wikitext-2/test.txt"]) == Exit.USAGE
    assert main(STUDY, [*common, "--data", "data:gsm8k", "--dry-run"]) == Exit.USAGE
    err = capsys.readouterr().err
    assert err.count(f"{DATA_DIR_ENV}={tmp_path / 'data'}") == 2, err
    assert not list(runs.rglob("*.db"))  # refused before a run or a store was created


def test_a_study_reads_its_data_set_from_the_variable(monkeypatch, tmp_path):
    from studies.icl_gsm8k import STUDY
    from studies.plan import plan

    gsm8k = _gsm8k(tmp_path / "data" / "gsm8k")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    points = plan(STUDY, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--dry-run",
                          "--data", "data:gsm8k"]).points
    assert {p.task.data for p in points} == {str(gsm8k)}


# -- nothing outside the repository but the one setting ----------------------------------------------------

def _text_files(*places: str):
    for place in places:
        path = ROOT / place
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                try:
                    yield file, file.read_text(encoding="utf-8")
                except UnicodeDecodeError:  # a figure or other binary file
                    continue


def test_nothing_but_the_data_setting_points_out_of_the_repository():
    allowed = ROOT / "ltm" / "data" / "paths.py"
    found = [f"{file.relative_to(ROOT)}:{n}: {line.strip()}"
             for file, text in _text_files("README.md", "ltm", "studies", "analysis", "benchmarks", "tests")
             if file != allowed for n, line in enumerate(text.splitlines(), 1)
             if OUT_OF_REPO in line or re.search(r"""["']shared["']\s*/""", line)]
    assert not found, (f"paths out of the repository; name the data with ltm.data.paths ({DATA_DIR_ENV}, "
                       "data:NAME; tests: the local_data fixture) instead:\n" + "\n".join(found))
    assert OUT_OF_REPO in allowed.read_text()  # the one place still holds the default (the scan looks for it)


# -- the method, cited inside the repository -----------------------------------------------------------

def test_every_method_citation_names_a_section_of_docs_method():
    method = (ROOT / "docs/METHOD.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, flags=re.M)}
    assert sections == set(range(1, len(sections) + 1)), sections  # numbered 1..N, none twice or missing
    citations, stale = [], []
    for file, text in _text_files("README.md", "ltm", "studies", "analysis", "benchmarks", "tests"):
        for n, line in enumerate(text.splitlines(), 1):
            where = f"{file.relative_to(ROOT)}:{n}"
            stale += [f"{where}: {line.strip()}" for m in re.finditer(r"(\S*)METHOD\.md", line)
                      if not m.group(1).endswith("docs/")]
            citations += [(where, int(s)) for s in re.findall(r"docs/METHOD\.md section (\d+)", line)]
    assert not stale, "cite the method as docs/METHOD.md (section N):\n" + "\n".join(stale)
    missing = [f"{where}: section {s}" for where, s in citations if s not in sections]
    assert not missing, f"docs/METHOD.md has sections 1..{max(sections)}; these cite others:\n" + "\n".join(missing)
    assert len(citations) >= 10  # the docstrings of the modules that implement the method cite it
