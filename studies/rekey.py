"""Give stored runs their current run keys: `python -m studies.rekey [--runs-dir runs] [--dry-run]`.

A run key hashes the fields a run uses (`RunConfig.identity`). When that definition changes, the
runs made before carry keys that no launch computes any more, so studies would train them again.
This command re-keys what is stored, and running it again changes nothing:

* a training run: its checkpoint folders runs/checkpoints/<old> and <old>.<run id> become <new> and
  <new>.<run id> (config.json updated)
  and its MLflow runs, in every experiment of the store, get ltm.run_key=<new> and
  ltm.previous_run_key=<old>; all under the run's lock, so a run being trained is left alone;
* an evaluation of a training point: re-keyed when its task, read back from its params, gives its
  old key (evaluations of a checkpoint path are not: a study reruns them, its training is kept);
* a study's parent run: ltm.study_key of its grid (grid.json) with the new keys, when the old checks.

Two old runs that map to one new key (an AR run that differed only in inference fields it never
used) keep their data; the newest MLflow run is the one found, and a second folder stays where it is.
"""

# ruff: noqa: E402 (the signal handler goes in before the imports, which load torch and MLflow)
from __future__ import annotations

from ltm.signals import exit_on_signal

exit_on_signal(__name__)  # run as a command: Ctrl-C exits 3 with a message; run again, it re-keys what is left
import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from ltm.names import (PREVIOUS_KEY_TAG, PREVIOUS_STUDY_KEY_TAG, ROLE_EVAL, ROLE_STUDY, ROLE_TAG, RUN_KEY_TAG,
                       STUDY_KEY_TAG, Exit, exit_help)
from studies.points import study_key_of
from studies.tasks import evaluation_key, logged_task

log = logging.getLogger("studies.rekey")  # by name: run as a command, __name__ is "__main__"


def new_key(config: dict) -> str:
    from ltm.config import RunConfig

    return RunConfig.from_dict(config).run_key()


def folder_keys(runs_dir: Path) -> dict[str, str]:
    """Old key -> current key of every checkpoint folder whose config reads without unpickling code
    (config.json, else its latest checkpoint); the others go by their MLflow run's config."""
    from ltm.checkpoint import latest_verified, read_config

    found = {}
    for folder in sorted((runs_dir / "checkpoints").glob("*")):
        if "." in folder.name:  # <key>.<run id>: another run of that key, moved with it (`_move`)
            continue
        file = latest_verified(folder) if folder.is_dir() else None
        try:
            found[folder.name] = new_key(read_config(file))
        except Exception:  # no checkpoint, or one saved before weights-only loading
            continue
    return found


def _artifact_json(client, run_id: str, name: str) -> dict | None:
    """A run's JSON artifact (config.json, grid.json), or None when it has none (or it is unreadable)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())
        except Exception:
            return None


class Rekey:
    """One pass over a store and a runs folder; `dry_run` reports without changing anything."""

    def __init__(self, runs_dir: Path, tracking_uri: str, dry_run: bool) -> None:
        from mlflow.tracking import MlflowClient

        self.runs_dir, self.dry_run = runs_dir, dry_run
        self.client = MlflowClient(tracking_uri)
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        self.runs = self.client.search_runs(experiments, filter_string=f"tags.`{RUN_KEY_TAG}` != ''",
                                            max_results=50_000) if experiments else []
        self.moved: dict[str, str] = {}  # old -> new, for what was (or, in a dry run, would be) re-keyed
        # what an earlier (perhaps interrupted) pass moved, so its evaluations and studies follow
        self.earlier = {r.data.tags[PREVIOUS_KEY_TAG]: r.data.tags[RUN_KEY_TAG] for r in self.runs
                        if PREVIOUS_KEY_TAG in r.data.tags}
        self.left: list[str] = []

    def training(self) -> None:
        mapping = folder_keys(self.runs_dir)
        for run in self.runs:
            key = run.data.tags[RUN_KEY_TAG]
            if run.data.tags.get(ROLE_TAG) == ROLE_EVAL or key in mapping:
                continue
            config = _artifact_json(self.client, run.info.run_id, "config.json")
            if config is None:
                self.left.append(f"training run {run.info.run_id} ({key}): no config.json artifact nor checkpoint")
            else:
                mapping[key] = new_key(config)
        for old, new in sorted(mapping.items()):
            if old != new:
                self._move(old, new, [r for r in self.runs if r.data.tags[RUN_KEY_TAG] == old
                                      and r.data.tags.get(ROLE_TAG) != ROLE_EVAL], folder=True)

    def evaluations(self) -> None:
        known = {**self.earlier, **self.moved}  # every old training key we know the new key of
        for run in self.runs:
            if run.data.tags.get(ROLE_TAG) != ROLE_EVAL:
                continue
            old, task = run.data.tags[RUN_KEY_TAG], logged_task(run.data.params)
            trained = next((o for o in known if evaluation_key(o, task) == old), None)
            if trained is not None:  # an evaluation of a training point whose key moved
                self._move(old, evaluation_key(known[trained], task), [run], folder=False)

    def studies(self) -> None:
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        parents = self.client.search_runs(experiments, filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'",
                                          max_results=50_000) if experiments else []
        for run in parents:
            if STUDY_KEY_TAG not in run.data.tags:
                continue
            grid = _artifact_json(self.client, run.info.run_id, "grid.json")
            if grid is None:
                continue
            keys = [p["key"] for p in grid["points"]]  # as the study was first started
            tags = run.data.tags
            first = tags.get(PREVIOUS_STUDY_KEY_TAG, tags[STUDY_KEY_TAG])
            known = {**self.earlier, **self.moved}
            new = study_key_of(grid["study"], grid["preset"], [known.get(k, k) for k in keys])
            if new != tags[STUDY_KEY_TAG] and study_key_of(grid["study"], grid["preset"], keys) == first:
                log.info("study %s-%s (%s): study key %s -> %s", grid["study"], grid["preset"], run.info.run_id,
                         tags[STUDY_KEY_TAG], new)
                if not self.dry_run:
                    self.client.set_tag(run.info.run_id, STUDY_KEY_TAG, new)
                    self.client.set_tag(run.info.run_id, PREVIOUS_STUDY_KEY_TAG, first)

    def _move(self, old: str, new: str, runs: list, folder: bool) -> None:
        from ltm.checkpoint import CONFIG_FILE
        from ltm.runlock import RunBusy, RunLock

        src, dst = self.runs_dir / "checkpoints" / old, self.runs_dir / "checkpoints" / new
        rename = folder and src.is_dir()
        if rename and dst.exists():
            self.left.append(f"{src}: {dst} exists already (an older run with the same key); both kept")
            rename = False
        log.info("%s -> %s: %d MLflow run(s)%s", old, new, len(runs), f", folder {src.name}" if rename else "")
        self.moved[old] = new
        if self.dry_run:
            return
        try:
            lock = RunLock(self.runs_dir, old, "re-keyed")
        except RunBusy as err:
            self.left.append(f"{old}: {err}")
            del self.moved[old]
            return
        with lock:
            # the key's own folder and those of its other runs (<key>.<run id>, `ltm.checkpoint.run_folder`)
            pairs = ([(src, dst)] if rename else []) + [
                (extra, dst.with_name(f"{new}{extra.name[len(old):]}")) for extra in sorted(src.parent.glob(f"{old}.*"))
                if folder and extra.is_dir()]
            for here, there in pairs:
                if there.exists():
                    self.left.append(f"{here}: {there} exists already; both kept")
                    continue
                here.rename(there)
                config = there / CONFIG_FILE
                if config.is_file():
                    config.write_text(json.dumps({**json.loads(config.read_text()), "run_key": new}, indent=1))
            for run in runs:
                self.client.set_tag(run.info.run_id, RUN_KEY_TAG, new)
                self.client.set_tag(run.info.run_id, PREVIOUS_KEY_TAG, old)


def main(argv: list[str] | None = None) -> int:
    import os

    from ltm.cli import add_verbosity, configure_logging, log_level
    from ltm.tracking import TrackingUnusable, tracking_uri_option

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run read: noise

    parser = argparse.ArgumentParser(prog="python -m studies.rekey", description=__doc__.split("\n\n")[0],
                                     epilog=exit_help("re-keyed (or nothing to do)", "an error (its message says why)",
                                                      "never (re-keying takes no lock)"))
    parser.add_argument("--runs-dir", default="runs", help="the runs folder (checkpoints/, the default store)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    add_verbosity(parser)
    args = parser.parse_args(argv)
    configure_logging(log_level(args))
    runs_dir = Path(args.runs_dir).resolve()
    if not runs_dir.is_dir():
        print(f"error: no runs folder {runs_dir}; pass --runs-dir", file=sys.stderr)
        return Exit.USAGE
    try:
        uri = tracking_uri_option(args.tracking_uri, runs_dir)
    except TrackingUnusable as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    rekey = Rekey(runs_dir, uri, args.dry_run)
    rekey.training()
    rekey.evaluations()
    rekey.studies()
    verb = "would re-key" if args.dry_run else "re-keyed"
    print(f"{verb} {len(rekey.moved)} run key(s)" + ("; nothing to do" if not rekey.moved else ""))
    for line in rekey.left:
        print(f"left: {line}")
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
