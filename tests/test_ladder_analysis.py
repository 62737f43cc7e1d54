"""The ladder's figure and table (analysis/ladder.py), drawn by `python analysis/plot_scaling.py --experiment
ladder` from a tiny local MLflow store of fake runs whose losses follow known laws."""

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis import ladder, plot_scaling
from analysis.runs import load_runs
from ltm.config import run_preset
from ltm.names import (FINAL, FLOPS, FLOPS_PER_TOKEN, N_PARAMS_NONEMBEDDING, RUN_KEY_TAG, TOKENS, VAL_BOUND,
                       VAL_PPL_BOUND, Status, metric)
from ltm.tracking import default_tracking_uri

AR = {"E": 6.22, "A": 30.0, "B": 60.0, "alpha": 0.3, "beta": 0.3}
LTM = {"E": 4.20, "A": 80.0, "B": 120.0, "alpha": 0.25, "beta": 0.3, "g": 0.4}
SIZES = np.geomspace(1e5, 2e6, 5)
TOKENS_PER_PARAM = (5, 10, 20, 40)
OPTIMA = {"ar": 6.22, "ltm": 4.20}  # nats/token: the window's and the full context's, as on micro-rf


def law(p, N, D, T=1):
    return p["E"] + p["A"] * (N * T ** p.get("g", 0)) ** -p["alpha"] + p["B"] * D ** -p["beta"]


def fake_runs(ltm_steps=(8,)) -> list[dict]:
    """Post-decay (wsd) points of an AR with a 16-token window and of an LTM at each T in `ltm_steps`, and each
    size's constant-rate trunk (its loss absurdly low: it must never be fitted), as params and metrics."""
    rng = np.random.default_rng(0)
    runs = []
    for kind, Ts in (("ar", [0]), ("ltm", ltm_steps)):
        for N in SIZES:
            trunk = {"model.kind": kind, "train.schedule": "constant", "train.tokens": int(80 * N), "T": Ts[0],
                     "N": N, "loss": 1.0}
            runs.append(trunk)
            for T in Ts:
                for r in TOKENS_PER_PARAM:
                    loss = law(AR, N, r * N) if kind == "ar" else law(LTM, N, r * N, T)
                    runs.append({"model.kind": kind, "train.schedule": "wsd", "train.tokens": int(r * N), "T": T,
                                 "N": N, "loss": loss * np.exp(0.002 * rng.standard_normal())})
    return runs


def track(runs_dir, runs: list[dict]) -> str:
    """The runs as FINISHED MLflow runs of experiment "ladder", as ltm.train logs them (params: the flat
    config; metrics: the final bound and the run's size and cost)."""
    uri = default_tracking_uri(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp = client.create_experiment("ladder", artifact_location=str(runs_dir / "artifacts"))
    for i, r in enumerate(runs):
        run_id = client.create_run(exp, tags={RUN_KEY_TAG: f"key{i}"}).info.run_id
        cfg = run_preset("smoke").with_overrides([f"model.kind={r['model.kind']}", "inference.init_logvar=0",
                                                  f"inference.steps={r['T']}", f"train.tokens={r['train.tokens']}",
                                                  f"model.d_model={4 * int(r['N'] ** 0.25 / 2)}"])
        params = {**{k: str(v) for k, v in cfg.flat().items()}, "train.schedule": r["train.schedule"],
                  "data.name": "fake",  # no corpus to score: the optima come from `optimum`
                  "n_params": str(int(r["N"] * 1.1)), "n_params_nonembedding": str(int(r["N"]))}
        cost = (6 if r["model.kind"] == "ar" else 12) * r["N"]
        size = {N_PARAMS_NONEMBEDDING: r["N"], FLOPS_PER_TOKEN: cost}  # at step 0
        final = {VAL_BOUND: r["loss"], VAL_PPL_BOUND: float(np.exp(r["loss"])), TOKENS: r["train.tokens"],
                 FLOPS: cost * r["train.tokens"]}  # at the last evaluation
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in size.items()]
                         + [Metric(k, v, 0, r["train.tokens"]) for k, v in final.items()])
        client.log_dict(run_id, cfg.to_dict(), "config.json")
        client.set_terminated(run_id, Status.FINISHED)
    return uri


def optimum(row) -> float:
    return OPTIMA[row["model.kind"]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("ladder") / "runs"
    return runs_dir, track(runs_dir, fake_runs())


def test_only_post_decay_points_are_fitted_one_series_per_arm_and_T(store):
    runs = load_runs(store[1], "ladder")
    points = ladder.ladder_points(runs, optimum)
    assert len(runs) == 50 and len(points) == 40  # the 10 trunks (constant) are not points
    assert (points["loss"] > 4).all()
    assert sorted(points["series"].unique()) == ["AR, window 16", "LTM, fixed start, logvar 0, T=8"]
    ltm = points[points["kind"] == "ltm"]
    assert np.allclose(ltm["C"], 12 * ltm["N"] * ltm["D"])  # C = flops_per_token x D
    # runs before the bound metric existed: the log of the perplexity bound
    old = runs.drop(columns=[metric(FINAL, VAL_BOUND)])
    assert np.allclose(ladder.ladder_points(old, optimum)["loss"], points["loss"])


def test_the_ladder_figure_and_table_are_drawn_and_logged(store, monkeypatch):
    runs_dir, uri = store
    monkeypatch.setattr(plot_scaling, "known_optimum", lambda runs, uri: optimum)  # no corpus to score here
    out = runs_dir / "figures" / "ladder"
    assert plot_scaling.main(["--runs-dir", str(runs_dir), "--experiment", "ladder", "--bootstrap", "10",
                              "--ladder-compute", "1e19"]) == 0
    assert (out / "ladder.png").is_file() and (out / "ladder.pdf").is_file()
    table = pd.read_csv(out / "ladder.csv").set_index(["series", "quantity"])
    e = table.loc[("AR, window 16", "E (free)")]
    assert e["low"] <= 6.22 <= e["high"] and e["reference"] == 6.22 and "inside" in e["note"]
    held = table.loc["AR, window 16"].filter(like="held-out size", axis=0)  # coverage: tests/test_predict.py
    assert len(held) == 4 and held["note"].str.contains("90% interval").all() and (held["low"] < held["high"]).all()
    assert np.allclose(held["value"], held["reference"], rtol=0.01)  # predicted within 1% of the run
    cross = table.loc[("LTM, fixed start, logvar 0, T=8 vs AR, window 16", "crossover compute C (FLOPs)")]
    assert cross["low"] <= cross["value"] <= cross["high"] <= 1e19 and "P(no crossing below 1e+19" in cross["note"]
    assert "checking the steps law on a held-out T needs at least 4 values of T" in (out / "ladder.md").read_text()
    client = MlflowClient(uri)
    analysis = client.search_runs([client.get_experiment_by_name("ladder").experiment_id],
                                  filter_string="tags.`ltm.analysis` = 'plot_scaling'")
    logged = {a.path for a in client.list_artifacts(analysis[0].info.run_id)}
    assert {"ladder.png", "ladder.csv", "ladder.md"} <= logged


def test_the_figure_shows_frontiers_held_out_points_and_both_optima(store, tmp_path):
    drawn = {}

    def keep(fig, out, name, notes=()):
        drawn[name] = fig
        return [out / f"{name}.png"]

    figures, tables, _ = ladder.analyse_ladder(load_runs(store[1], "ladder"), optimum, tmp_path, save=keep,
                                               markdown=plot_scaling._markdown, bootstrap=10)
    labels = drawn["ladder"].axes[0].get_legend_handles_labels()[1]
    assert "known optimum (AR, window 16): 6.22" in labels
    assert "known optimum (LTM, fixed start, logvar 0): 4.20" in labels
    assert any(lab.startswith("held-out run (star)") for lab in labels)
    assert any(lab.startswith("crossover LTM, fixed start, logvar 0, T=8 / AR, window 16") for lab in labels)
    assert [p.name for p in tables] == ["ladder.csv", "ladder.md"]
    assert "values of T" in (tmp_path / "ladder.md").read_text()  # one T: the steps law says what it needs


def test_too_few_sizes_say_what_the_ladder_needs(store, tmp_path):
    runs = load_runs(store[1], "ladder")
    small = runs[runs["model.kind"] == "ar"]
    two = small[small[metric(FINAL, N_PARAMS_NONEMBEDDING)] <= SIZES[1]]
    assert ladder.analyse_ladder(two, optimum, tmp_path, save=None, markdown=str, bootstrap=0) == ([], [], [
        "AR, window 16: L(N, D) on the ladder needs 3 or more sizes, 2 or more budgets and 5 points; it has 2, 8 "
        "and 8"])
    three = small[small[metric(FINAL, N_PARAMS_NONEMBEDDING)] <= SIZES[2]]
    figures, _, reasons = ladder.analyse_ladder(three, optimum, tmp_path, save=lambda *a: ["fig"], markdown=str,
                                                bootstrap=0)
    assert figures == ["fig"] and reasons == [
        "AR, window 16: a rollout needs at least 4 model sizes (3 to fit, 1 to predict); got 3: add sizes to the "
        "ladder"]


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """`runs` as load_runs tables them, without a store."""
    return pd.DataFrame([{"model.kind": r["model.kind"], "model.window": "16", "inference.start": "fixed",
                          "inference.init_logvar": 0.0, "inference.steps": r["T"], "train.tokens": r["train.tokens"],
                          "train.schedule": r["train.schedule"], metric(FINAL, VAL_BOUND): r["loss"],
                          metric(FINAL, N_PARAMS_NONEMBEDDING): r["N"],
                          metric(FINAL, FLOPS_PER_TOKEN): (6 if r["model.kind"] == "ar" else 12) * r["N"]}
                         for r in runs])


def test_inference_steps_are_fitted_as_an_effective_size_and_checked_on_the_largest_T():
    points = ladder.ladder_points(runs_frame(fake_runs(ltm_steps=(1, 2, 4, 8))), optimum)
    rows, notes = ladder.steps_rows(points, bootstrap=20)
    table = pd.DataFrame(rows).set_index("quantity")
    g = table.loc["g (N_eff = N T^g)"]
    assert g["series"] == "LTM, fixed start, logvar 0" and g["low"] <= LTM["g"] <= g["high"] and notes == []
    held = table.filter(like="held-out T", axis=0)
    assert len(held) == 20 and held.index.str.endswith("T=8").all()
    assert (held["note"].str.contains("inside")).mean() >= 0.75 and (held["note"].str.contains("2.0x beyond")).all()


def test_a_bad_ladder_compute_exits_2(store, capsys):
    with pytest.raises(SystemExit) as stop:
        plot_scaling.main(["--runs-dir", str(store[0]), "--experiment", "ladder", "--ladder-compute", "-1"])
    assert stop.value.code == 2 and "must be a finite number of FLOPs > 0" in capsys.readouterr().err
