"""Runs to frames to figures: analysis/plot_scaling.py end to end on tracked smoke runs."""

import logging
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import ltm.train as train
from analysis import plot_scaling
from analysis.runs import NoRunsError, dedupe, load_histories, load_runs
from ltm.config import run_preset
from ltm.tracking import Tracker, default_tracking_uri


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Four LTM runs (T = 1, 2, 3, 4) and their AR twin, tracked in one experiment."""
    tmp = tmp_path_factory.mktemp("analysis")
    base = run_preset("smoke").with_overrides([f"data.cache_dir={tmp / 'cache'}", "train.tokens=4096",
                                               "train.eval_every=2048"])
    for overrides in (["inference.steps=1"], ["inference.steps=2"], ["inference.steps=3"], ["inference.steps=4"],
                      ["model.kind=ar"]):
        result = train.run(base.with_overrides(overrides), runs_dir=tmp / "runs", experiment="a", progress=False)
        assert result.status == "FINISHED"
    return tmp / "runs"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A store as the README's paths leave it: sample_efficiency, then inference_scaling twice (the later
    invocation with T = 2, 4), each a parent run tagged as studies/launcher.py tags it with its runs as
    children, and last a quick-start run (`python -m ltm.train`, experiment `ltm`). Returns
    (runs dir, parent run id by (study, invocation))."""
    tmp = tmp_path_factory.mktemp("studies")
    runs_dir = tmp / "runs"
    base = run_preset("smoke").with_overrides([f"data.cache_dir={tmp / 'cache'}", "train.tokens=2048",
                                               "train.eval_every=2048"])
    parents = {}
    for study, invocation, points in (("sample_efficiency", "old", [["model.kind=ar"]]),
                                      ("inference_scaling", "old", [["inference.steps=1"]]),
                                      ("inference_scaling", "new", [["inference.steps=2"], ["inference.steps=4"]])):
        tracker = Tracker(default_tracking_uri(runs_dir), study, artifact_root=runs_dir / "artifacts")
        parent = tracker.client.create_run(tracker.experiment_id, tags={
            "ltm.role": "study", "ltm.study": study, "ltm.study_key": f"{study}-{invocation}"}).info.run_id
        for overrides in points:
            result = train.run(base.with_overrides(overrides), runs_dir=runs_dir, experiment=study,
                               parent_run_id=parent, progress=False)
            assert result.status == "FINISHED"
        tracker.client.set_terminated(parent)
        parents[study, invocation] = parent
    quick_start = train.run(base.with_overrides(["inference.steps=3"]), runs_dir=runs_dir, progress=False)
    assert quick_start.status == "FINISHED"
    return runs_dir, parents


def _error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("error: "))


def test_plot_scaling_plots_the_latest_study_by_default_not_the_quick_start_run(studies, capsys):
    runs_dir, parents = studies
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--bootstrap", "0"]) == 0
    out, err = capsys.readouterr()
    assert "analysing inference_scaling (experiment 'inference_scaling', " in err  # a note, on stderr
    assert f"parent run {parents['inference_scaling', 'new']}: the most recent study in the store" in err
    assert " figure files and " in out and "analysing" not in out  # the summary, on stdout
    figures = runs_dir / "figures" / "inference_scaling"
    assert (figures / "inference_scaling.png").exists() and (figures / "sample_efficiency.png").exists()
    table = pd.read_csv(figures / "runs.csv")  # the latest invocation's children only: no T=1, no quick start
    assert sorted(table["inference.steps"]) == [2, 4]
    assert not (runs_dir / "figures" / "ltm").exists()
    client = MlflowClient(default_tracking_uri(runs_dir))
    analysis = client.search_runs([client.get_experiment_by_name("inference_scaling").experiment_id],
                                  filter_string="tags.`ltm.analysis` = 'plot_scaling'")
    assert len(analysis) == 1 and analysis[0].data.tags["ltm.n_runs"] == "2"


def test_a_study_by_name_is_its_latest_invocation_and_experiment_and_parent_run_still_work(studies, capsys, caplog,
                                                                                           tmp_path):
    caplog.set_level(logging.INFO)
    runs_dir, parents = studies
    uri = default_tracking_uri(runs_dir)
    assert plot_scaling.select(uri, "inference_scaling", None, None) == (
        "inference_scaling", parents["inference_scaling", "new"], "inference_scaling")
    assert plot_scaling.select(uri, "sample_efficiency", None, None) == (
        "sample_efficiency", parents["sample_efficiency", "old"], "sample_efficiency")
    assert "the most recent invocation of that study" in caplog.text
    caplog.clear()
    # --parent-run: that invocation, in its own experiment; --experiment: every run of it, no study chosen
    assert plot_scaling.select(uri, None, None, parents["inference_scaling", "old"]) == (
        "inference_scaling", parents["inference_scaling", "old"], "inference_scaling")
    assert plot_scaling.select(uri, None, "ltm", None) == ("ltm", None, "ltm")
    assert capsys.readouterr().out == "" and "analysing" not in caplog.text
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--study", "sample_efficiency", "--bootstrap", "0"]) == 0
    assert list(pd.read_csv(runs_dir / "figures" / "sample_efficiency" / "runs.csv")["model.kind"]) == ["ar"]
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--experiment", "ltm", "--out", str(tmp_path),
                              "--bootstrap", "0"]) == 0
    assert list(pd.read_csv(tmp_path / "runs.csv")["inference.steps"]) == [3]  # the quick start alone


def test_wrong_study_or_experiment_names_exit_2_listing_what_exists(studies, capsys):
    runs_dir, _ = studies
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--study", "inference_scalin"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "no study 'inference_scalin'" in line
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d"
    # each study once (its latest invocation), latest first, with its experiment and date
    assert re.search(rf"inference_scaling \(experiment 'inference_scaling', {when}\), "
                     rf"sample_efficiency \(experiment 'sample_efficiency', {when}\)$", line)
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--study", "inference_scaling", "--experiment", "ltm"]) == 2
    assert "no study 'inference_scaling' in experiment 'ltm'" in _error_line(capsys.readouterr().err)
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--experiment", "inference_scalin"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "no experiment 'inference_scalin'" in line
    assert "experiments: Default, inference_scaling, ltm, sample_efficiency)" in line
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--parent-run", "0" * 32]) == 2
    assert f"no run '{'0' * 32}'" in _error_line(capsys.readouterr().err)
    assert not (runs_dir / "figures" / "inference_scalin").exists()


def test_without_a_study_the_default_says_so_and_names_the_experiments(tracked, capsys):
    assert plot_scaling.main(["--runs-dir", str(tracked)]) == 2  # only runs of `python -m ltm.train` here
    line = _error_line(capsys.readouterr().err)
    assert "no study in" in line and re.search(r"\(experiments: Default, a[,)]", line)
    assert "python studies/inference_scaling.py" in line and "--experiment NAME" in line


def test_runs_load_with_params_and_final_metrics(tracked):
    runs = load_runs(default_tracking_uri(tracked), "a")
    assert len(runs) == 5 and set(runs["model.kind"]) == {"ltm", "ar"}
    assert sorted(runs.loc[runs["model.kind"] == "ltm", "inference.steps"]) == [1, 2, 3, 4]
    assert (runs["final/val/ppl_bound"] > 1).all()


def test_histories_are_tidy_and_cached(tracked, tmp_path):
    uri = default_tracking_uri(tracked)
    runs = load_runs(uri, "a")
    hist = load_histories(uri, runs, cache_dir=tmp_path)
    assert set(hist.dropna(subset=["val/ppl_bound"])["step"]) == {2048, 4096}
    assert not hist.duplicated(["run_id", "step"]).any()
    assert len(list(tmp_path.glob("*.parquet"))) == 5
    again = load_histories("sqlite:////nonexistent/never/read.db", runs, cache_dir=tmp_path)  # served from cache
    pd.testing.assert_frame_equal(hist.sort_values(["run_id", "step"]).reset_index(drop=True),
                                  again.sort_values(["run_id", "step"]).reset_index(drop=True), check_like=True)


def test_a_replayed_step_keeps_its_last_value():
    tidy = pd.DataFrame({"run_id": ["r"] * 3, "key": ["k"] * 3, "step": [1, 2, 1], "timestamp": [1, 2, 3],
                         "value": [10.0, 20.0, 11.0]})
    assert dedupe(tidy).set_index("step")["value"].to_dict() == {1: 11.0, 2: 20.0}


def test_plot_scaling_writes_figures_tables_and_an_analysis_run(tracked, tmp_path):
    assert plot_scaling.main(["--runs-dir", str(tracked), "--experiment", "a", "--out", str(tmp_path),
                              "--bootstrap", "10"]) == 0
    for name in ("inference_scaling", "bound_decomposition", "sample_efficiency", "compute_efficiency"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.pdf").exists()
    fits = pd.read_csv(tmp_path / "fits.csv")
    assert set(fits["parameter"]) == {"E", "A", "gamma"} and fits["ci_low"].notna().all()
    table = pd.read_csv(tmp_path / "runs.csv")
    assert len(table) == 5
    ltm_rows = table[table["model.kind"] == "ltm"]
    latent_cols = ["kl_floor", "nll_other_z", "z_reliance", "z_info_lb", "z_info_lb_ci", "z_info_cap", "nll_prior",
                   "reuse_gap"]
    assert ltm_rows[latent_cols].notna().all().all()
    assert (ltm_rows["kl_above_floor"] == ltm_rows["kl"] - ltm_rows["kl_floor"]).all()
    assert table.loc[table["model.kind"] == "ar", ["kl_floor", "nll_other_z", "z_info_lb"]].isna().all().all()
    client = MlflowClient(default_tracking_uri(tracked))
    analysis = client.search_runs([client.get_experiment_by_name("a").experiment_id],
                                  filter_string="tags.`ltm.analysis` = 'plot_scaling'")
    assert len(analysis) == 1
    assert {"fits.csv", "inference_scaling.png"} <= {a.path for a in client.list_artifacts(analysis[0].info.run_id)}
    # the analysis run is not mistaken for a training run
    assert len(load_runs(default_tracking_uri(tracked), "a")) == 5


def test_no_runs_says_which_study_to_run(tmp_path, capsys):
    with pytest.raises(NoRunsError, match="python studies/inference_scaling.py"):
        load_runs(default_tracking_uri(tmp_path), "empty")
    assert plot_scaling.main(["--runs-dir", str(tmp_path), "--experiment", "empty"]) == 2
    assert "studies/inference_scaling.py" in capsys.readouterr().err


def test_evaluations_of_checkpoints_get_a_table_and_are_not_training_runs(tracked, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    from ltm.checkpoint import resolve
    from ltm.names import Status
    from studies.messages import TrialContext
    from studies.study import GenerationTask
    from studies.tasks import resolve_task, run_task, task_points

    uri = default_tracking_uri(tracked)
    task = resolve_task(GenerationTask(samples=2, length=4, prefix=4, prior_temperatures=[1.0]), uri, tracked)
    sources = [resolve(str(c), uri, tracked) for c in sorted((tracked / "checkpoints").iterdir())[:2]]
    context = TrialContext(tracking_uri=uri, experiment="e", runs_dir=str(tracked), parent_run_id=None)
    for point in task_points([], task, sources):
        assert run_task(point, context).status == Status.FINISHED
        assert run_task(point, context).status == Status.SKIPPED  # a finished evaluation is not repeated
    assert "generation: scoring cond (2/2)" in caplog.messages  # what a study's log shows meanwhile
    with pytest.raises(NoRunsError):
        load_runs(uri, "e")  # evaluations are not training runs
    assert plot_scaling.main(["--runs-dir", str(tracked), "--experiment", "e", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "eval_generation.csv")
    assert len(table) == 2 and table["gen/cond/entropy"].notna().all() and not (tmp_path / "runs.csv").exists()


def test_compare_scores_two_runs_on_the_same_blocks(tracked, tmp_path, capsys):
    from analysis import compare

    base = run_preset("smoke").with_overrides([f"data.cache_dir={tracked.parent / 'cache'}", "train.tokens=4096",
                                               "train.eval_every=2048"])
    ltm_key = base.with_overrides(["inference.steps=4"]).run_key()
    ar_key = base.with_overrides(["model.kind=ar"]).run_key()
    out = tmp_path / "compare.csv"
    assert compare.main([ltm_key, ar_key, "--runs-dir", str(tracked), "--blocks", "8", "--bootstrap", "200",
                         "--out", str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    assert row["B_kl"] == 0 and row["A_kl"] > 0 and row["blocks"] == 8
    assert row["bound_A_minus_B"] == pytest.approx(row["A_bound"] - row["B_bound"])
    assert row["bound_ci_low"] <= row["bound_A_minus_B"] <= row["bound_ci_high"]
    assert row["nll_ci_low"] <= row["nll_A_minus_B"] <= row["nll_ci_high"]
    # a run against itself: no difference, and no spread to bootstrap
    assert compare.main([ar_key, ar_key, "--runs-dir", str(tracked), "--blocks", "8", "--out", str(out)]) == 0
    same = pd.read_csv(out).iloc[0]
    assert same["bound_A_minus_B"] == 0 and same["bound_ci_low"] == same["bound_ci_high"] == 0
    assert compare.main(["no-such-run", ar_key, "--runs-dir", str(tracked)]) == 2
    assert "is neither a checkpoint file or folder, nor a run key" in capsys.readouterr().err


def test_compare_measures_an_ltm_by_its_iw_bound_against_an_ar_and_refuses_a_measure_a_side_lacks(tracked, tmp_path,
                                                                                                   capsys):
    from analysis import compare

    base = run_preset("smoke").with_overrides([f"data.cache_dir={tracked.parent / 'cache'}", "train.tokens=4096",
                                               "train.eval_every=2048"])
    ltm_key = base.with_overrides(["inference.steps=4"]).run_key()
    ar_key = base.with_overrides(["model.kind=ar"]).run_key()
    out = tmp_path / "compare.csv"
    common = ["--runs-dir", str(tracked), "--blocks", "4", "--bootstrap", "100", "--out", str(out)]
    assert compare.main([ltm_key, ar_key, "--measure", "iw", "--iw-samples", "4", *common]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("measure: iw: an LTM's importance-weighted bound at K = 4, an AR's exact NLL")
    row = pd.read_csv(out).iloc[0]
    assert row["measure"] == "iw" and row["B_iw"] == row["B_nll"] == row["B_bound"]  # an AR's are one number
    assert row["A_iw"] <= row["A_bound"] + 0.05  # the IW bound: at most the ELBO, up to its noise on 4 blocks
    assert row["iw_A_minus_B"] == pytest.approx(row["A_iw"] - row["B_iw"])
    # an LTM has no exact NLL: refused, naming what measures its likelihood
    assert compare.main([ltm_key, ar_key, "--measure", "nll", *common]) == 2
    err = capsys.readouterr().err
    assert "A is an LTM, which has no exact NLL" in err and "--measure iw --iw-samples K" in err
    assert "train.iw_samples" in err
    assert compare.main([ar_key, ltm_key, "--measure", "iw", "--iw-samples", "0", *common]) == 2
    assert "B is an LTM and --iw-samples is 0" in capsys.readouterr().err
    assert compare.main([ar_key, ar_key, "--measure", "nll", *common]) == 0
    assert capsys.readouterr().out.startswith("measure: nll: ")


def test_bayes_references_use_each_runs_receptive_field(tracked):
    from ltm.data import load_blocks, optimal_ppl

    uri = default_tracking_uri(tracked)
    runs = load_runs(uri, "a")
    refs = plot_scaling.optimal_reference(runs, uri)
    # smoke: 2 layers of a 16-token window see 2 * 15 + 1 = 31 of the 32 context tokens
    assert list(refs) == ["optimum, full context", "optimum, 31-token receptive field"]
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tracked.parent / 'cache'}"])
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    assert refs["optimum, 31-token receptive field"] == pytest.approx(optimal_ppl(blocks, window=31, n_blocks=8))
    assert refs["optimum, 31-token receptive field"] >= refs["optimum, full context"]


def test_the_ladder_fixes_each_arms_E_at_the_optimum_of_what_it_sees(tracked):
    uri = default_tracking_uri(tracked)
    runs = load_runs(uri, "a")
    refs, optimum = plot_scaling.optimal_reference(runs, uri), plot_scaling.known_optimum(runs, uri)
    ar, ltm = (runs[runs["model.kind"] == kind].iloc[0] for kind in ("ar", "ltm"))
    assert optimum(ar) == pytest.approx(np.log(refs["optimum, 31-token receptive field"]))  # nats/token
    assert optimum(ltm) == pytest.approx(np.log(refs["optimum, full context"]))  # its latents may see the rest
    assert optimum(ar.copy().replace({"synthetic": "wikitext-2"})) is None


def test_seeds_of_a_point_are_averaged_with_their_spread_and_resampled_together(tmp_path):
    T = [1, 2, 4, 8, 16]
    runs = pd.DataFrame([{"run_id": f"r{t}-{s}", "model.kind": "ltm", "inference.steps": t, "model.n_layers": 2,
                          "model.d_model": 32, "model.n_latents": 4, "train.tokens": 4096, "seed": s,
                          "config_key": f"T{t}",
                          "final/val/ppl_bound": float(np.exp(2 + 3 * t ** -0.5 + 0.05 * (s - 1))),
                          "nll": 1.0 + s, "kl": 0.5} for t in T for s in (0, 1, 2)])
    paths, rows = plot_scaling.plot_inference_scaling(runs, {}, tmp_path, bootstrap=20)
    assert (tmp_path / "inference_scaling.png").exists()
    assert {r["parameter"] for r in rows} == {"E", "A", "gamma"} and all(r["n_points"] == 5 for r in rows)
    assert "within each drawn point its runs (seeds)" in rows[0]["method"]
    seeds = plot_scaling.seed_table(runs)
    assert len(seeds) == 5 and (seeds["n_seeds"] == 3).all() and (seeds["seeds"] == "0 1 2").all()
    first = seeds.iloc[0]
    assert first["nll mean"] == 2.0 and (first["nll min"], first["nll max"]) == (1.0, 3.0)
    assert plot_scaling.seed_table(runs[runs["seed"] == 0]).empty  # one seed per config: no seeds table


def test_the_inference_cost_figure_puts_each_start_beside_the_papers_and_the_ar(tmp_path):
    base = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=2048"])
    for overrides in (["inference.steps=2"], ["inference.steps=2", "inference.init_logvar=0"],
                      ["inference.steps=0", "inference.start=encoder"], ["model.kind=ar"]):
        result = train.run(base.with_overrides(overrides), runs_dir=tmp_path / "runs", experiment="cost",
                           progress=False)
        assert result.status == "FINISHED"
    assert plot_scaling.main(["--runs-dir", str(tmp_path / "runs"), "--experiment", "cost", "--bootstrap", "0"]) == 0
    out = tmp_path / "runs" / "figures" / "cost"
    assert (out / "inference_cost.png").is_file()
    costs = pd.read_csv(out / "inference_cost.csv").set_index("label")
    assert set(costs.index) == {"paper start (logvar -5)", "fixed start, logvar 0", "encoder, 1 layer", "AR, window 16"}
    # the encoder at T = 0 skips the loop: cheaper to evaluate than T = 2; every LTM trains dearer than the AR
    assert costs.loc["encoder, 1 layer", "eval_flops_per_token"] < costs.loc["paper start (logvar -5)",
                                                                               "eval_flops_per_token"]
    assert (costs.drop("AR, window 16")["train_flops"] > costs.loc["AR, window 16", "train_flops"]).all()
    table = pd.read_csv(out / "runs.csv")
    encoder = table[table["inference.start"] == "encoder"]
    assert encoder["amortisation_gap"].notna().all() and encoder["kl_floor"].isna().all()


# -- figures that survive small studies (issue 29) and an analysis that is never half-written (issue 30) --------

def _small_runs(steps=(1, 4), latents=(2,), ar=False, sizes=(2,)) -> pd.DataFrame:
    """A runs table as load_runs makes it, without a store: LTM runs at each T, N_z and size, and an AR per size."""
    rows = [{"run_id": f"r{n}-{t}-{z}", "model.kind": "ltm", "inference.steps": t, "model.n_layers": n,
             "model.d_model": 32, "model.n_latents": z, "train.tokens": 4096, "n_params": 1000 * n + z,
             "final/val/ppl_bound": float(np.exp(2 + 1 / t + z / 10)), "nll": 2.0, "kl": 0.5}
            for n in sizes for t in steps for z in latents]
    rows += [{"run_id": f"ar{n}", "model.kind": "ar", "inference.steps": 0, "model.n_layers": n, "model.d_model": 32,
              "model.n_latents": 0, "train.tokens": 4096, "n_params": 900 * n, "final/val/ppl_bound": 9.0,
              "nll": 2.2, "kl": 0.0} for n in sizes if ar]
    return pd.DataFrame(rows).assign(**{"inference.start": "fixed"})


def _history(runs: pd.DataFrame, evaluations: int) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": r, "step": 1024 * (i + 1), "tokens": 1024 * (i + 1), "flops": 1e9 * (i + 1),
                          "val/ppl_bound": 10.0 - i} for r in runs["run_id"] for i in range(evaluations)])


@pytest.fixture
def store(tracked, tmp_path):
    """A copy of the tracked runs' folder, so that the analysis runs a test adds stay out of the others' store."""
    import shutil

    return shutil.copytree(tracked, tmp_path / "store")


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plots make, kept open (plt.close does nothing) so that a test can look at them."""
    import matplotlib.pyplot as plt

    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    yield lambda: {fig.get_suptitle() or fig.axes[0].get_title(): fig for fig in map(plt.figure, plt.get_fignums())}
    monkeypatch.undo()
    plt.close("all")


def test_a_figure_says_which_comparison_its_runs_cannot_make():
    notes = plot_scaling.figure_notes(_small_runs(), "inference_scaling")  # the smoke study: no AR, 2 values of T
    assert notes[0] == plot_scaling.NO_AR
    assert "with 4 or more values of T; these lines have only 2" in notes[1] and len(notes) == 2
    assert plot_scaling.figure_notes(_small_runs(steps=(1, 2, 3, 4), ar=True), "inference_scaling") == []
    assert plot_scaling.figure_notes(_small_runs(ar=True), "sample_efficiency") == []
    assert "some lines have only 2" in plot_scaling.figure_notes(
        pd.concat([_small_runs(steps=(1, 2, 3, 4), ar=True), _small_runs(latents=(8,))]), "inference_scaling")[0]
    only_ar = _small_runs(ar=True).query("`model.kind` == 'ar'")
    assert plot_scaling.figure_notes(only_ar, "sample_efficiency") == [
        "no LTM run among these runs: only the AR baselines are drawn"]
    size_note = plot_scaling.figure_notes(_small_runs(sizes=(2, 4), ar=True), "model_size")
    assert len(size_note) == 1 and "3 or more parameter counts" in size_note[0] and "are 2 and 1" in size_note[0]


def test_the_notes_are_written_on_the_figure_under_its_axes(tmp_path, kept_figures):
    plot_scaling.plot_inference_scaling(_small_runs(), {}, tmp_path, bootstrap=0)
    fig = kept_figures()["Inference-time scaling"]
    fig.canvas.draw()
    (note,) = fig.texts
    assert note.get_text().startswith("Note: no AR baseline among these runs")
    assert "these lines have only 2" in note.get_text()
    renderer = fig.canvas.get_renderer()
    assert note.get_window_extent(renderer).y1 < fig.axes[0].get_tightbbox(renderer).y0  # below the x label


def test_coincident_reference_lines_are_one_legend_entry():
    refs = {"optimum, full context": 7.36, "optimum, 31-token receptive field": 7.3612, "optimum, 8-token": 9.1}
    assert plot_scaling.merge_references(refs) == {"optimum, full context = 31-token receptive field": 7.36,
                                                   "optimum, 8-token": 9.1}
    assert plot_scaling.merge_references({"a": 4.29, "b": 6.25}) == {"a": 4.29, "b": 6.25}


def test_fits_md_says_why_each_law_was_not_fitted(tmp_path):
    runs = _small_runs(latents=(2, 4))
    reasons = plot_scaling.fit_reasons(runs, _history(runs, 2), "flops")
    plot_scaling.write_tables(runs, [], tmp_path, reasons)
    text = (tmp_path / "fits.md").read_text()
    assert text.startswith("No law was fitted to these 4 runs:")
    assert "4 or more values of T; the most here is 2" in text
    assert "needs 2 or more (size, N_z) lines, each with 2 or more values of T, and 2 points more than twice the " \
           "lines; here 2 line(s), 4 point(s)" in text
    assert "3 or more parameter counts" in text and "the longest here has 2 (train.eval_every" in text
    fitted = _small_runs(steps=(1, 2, 3, 4), latents=(2, 4))
    assert len(plot_scaling.fit_reasons(fitted, _history(fitted, 5), "flops")) == 1  # only L(N, D): one size


def _labelled_ticks(axis, limits) -> list[float]:
    """Positions of the ticks of `axis` in view that carry a label."""
    low, high = sorted(limits)
    index = 0 if axis.axis_name == "x" else 1
    return [t.get_position()[index] for t in axis.get_ticklabels(which="both")
            if t.get_text() and low <= t.get_position()[index] <= high]


def test_every_axis_has_labelled_ticks_across_its_range_and_legends_cover_no_data(store, tmp_path, kept_figures):
    """The tracked runs' curves span 2048 to 4096 tokens: where matplotlib labels no tick or a cluster at one end."""
    assert plot_scaling.main(["--runs-dir", str(store), "--experiment", "a", "--out", str(tmp_path / "out"),
                              "--bootstrap", "0"]) == 0
    figures = kept_figures()
    assert len(figures) == 5
    for title, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.get_visible()]
        for ax in panels:
            for name, limits in (("x", ax.get_xlim()), ("y", ax.get_ylim())):
                # panels sharing an axis label it once (the left column's y, ...): read from any of them
                shared = getattr(ax, f"get_shared_{name}_axes")().get_siblings(ax)
                ticks = [t for other in shared for t in _labelled_ticks(getattr(other, f"{name}axis"), limits)]
                assert len(ticks) >= 2, (title, name, ticks)
                if getattr(ax, f"get_{name}scale")() == "log":  # labels across the axis, not bunched at one end
                    spread = np.log(max(ticks) / min(ticks)) / np.log(max(limits) / min(limits))
                    assert spread > 0.4, (title, name, ticks, limits)
        legends = [ax.get_legend() for ax in panels if ax.get_legend() is not None]
        assert len(legends) == 1, title  # one legend per figure, each label once
        box = legends[0].get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in panels), title


def test_help_of_the_analysis_commands_states_the_exit_statuses():
    from analysis import compare
    from ltm.names import Exit

    for parser in (compare._parser(), plot_scaling._parser()):
        text = " ".join(parser.format_help().split())  # as read, whatever the line breaks
        stated = re.findall(r"(\d) [a-z]", text.split("Exit status:")[1])
        assert stated == [str(int(code)) for code in Exit]
        assert f"{int(Exit.INTERRUPTED)} interrupted" in text


def test_a_missing_store_is_refused_not_created(tmp_path, capsys):
    missing = tmp_path / "typo" / "runs"
    assert plot_scaling.main(["--runs-dir", str(missing)]) == 2
    assert f"error: no tracking store at {missing / 'mlflow.db'}" in capsys.readouterr().err
    db = tmp_path / "elsewhere" / "mlflow.db"
    assert plot_scaling.main(["--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "nothing was created" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_hint_for_an_empty_experiment_names_the_script_that_fills_it(tracked, capsys):
    assert plot_scaling.main(["--runs-dir", str(tracked), "--experiment", "icl_gsm8k"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "`python studies/icl_gsm8k.py --preset smoke`" in line and "inference_scaling" not in line
    with pytest.raises(NoRunsError, match=r"`python -m ltm\.train --preset smoke`"):
        load_runs(default_tracking_uri(tracked), "ltm")
    with pytest.raises(NoRunsError, match=r"`python studies/inference_scaling\.py --preset smoke --experiment mine`"):
        load_runs(default_tracking_uri(tracked), "mine")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_analysis_exits_3_and_leaves_the_output_folder_as_it_was(store, tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "figures"
    out.mkdir()
    (out / "runs.csv").write_text("the earlier analysis\n")
    root = Path(plot_scaling.__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "analysis" / "plot_scaling.py"), "--runs-dir", str(store),
                             "--experiment", "a", "--out", str(out), "--bootstrap", "0"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 120
    def writing() -> bool:  # a staging folder beside --out, or a first new file in it
        return bool(list(tmp_path.glob(".figures.partial-*"))) or len(list(out.iterdir())) > 1

    while not writing() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert f"interrupted ({sig}): no figure or table was written ({out} is as it was)" in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "store"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["runs.csv"]
    assert (out / "runs.csv").read_text() == "the earlier analysis\n"


def test_a_signal_while_logging_to_mlflow_keeps_the_complete_files_and_ends_the_run_killed(store, tmp_path,
                                                                                          monkeypatch, capsys):
    import os
    import signal

    logged = []

    def interrupted_upload(self, run_id, path, artifact_path=None):
        logged.append(path)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first file is uploaded

    monkeypatch.setattr(MlflowClient, "log_artifact", interrupted_upload)
    try:
        status = plot_scaling.main(["--runs-dir", str(store), "--experiment", "a", "--out", str(tmp_path / "out"),
                                    "--bootstrap", "0"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped plot_scaling as a KeyboardInterrupt")
    assert status == 3 and len(logged) == 1
    assert "interrupted (SIGINT): the figures and tables are complete in" in capsys.readouterr().err
    assert {"inference_scaling.png", "fits.md", "runs.csv"} <= {p.name for p in (tmp_path / "out").iterdir()}
    client = MlflowClient(default_tracking_uri(store))
    (run,) = client.search_runs([client.get_experiment_by_name("a").experiment_id],
                                filter_string="tags.`ltm.analysis` = 'plot_scaling' and attributes.status = 'KILLED'")
    assert "interrupted (SIGINT) while logging" in run.data.tags["ltm.status_reason"]
