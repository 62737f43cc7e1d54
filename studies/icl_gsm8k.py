"""GSM8K in-context learning: k-shot accuracy (pass@k, substring and exact final number) of checkpoints.

    python studies/icl_gsm8k.py --data data:gsm8k    # micro: train on GSM8K train, test few-shot ($LTM_DATA_DIR/gsm8k)
    python studies/icl_gsm8k.py --preset smoke --data DIR           # about a minute, for tests
    python studies/icl_gsm8k.py --checkpoint RUN_ID --data DIR      # evaluate trained checkpoints instead
    python studies/icl_gsm8k.py --checkpoint PATH --task shots_from=test   # the paper's test-split shots

--data is the hub name gsm8k (the default) or a folder with train.jsonl and test.jsonl; the
presets train their model on its train split, formatted as the prompts are. The prompt format,
shot selection and scoring are in `ltm.gsm8k`; metrics are `gsm8k/k<shots>/...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402
exit_on_signal(__name__)  # first: a signal while torch and Ray load exits 3 with a message
from ltm.names import GSM8K, metric  # noqa: E402
from studies.launcher import main  # noqa: E402
from studies.study import Gsm8kTask, Preset, Study  # noqa: E402


def data_option(source: str) -> tuple[dict, dict]:
    """Train on the source's train split (a folder's train.jsonl, or the hub's) and evaluate on its test split."""
    from ltm.data import DataNotFoundError
    from ltm.data.paths import expand

    folder = Path(expand(source)).expanduser()
    if folder.is_dir():
        return {"data.name": str(folder.resolve() / "train.jsonl")}, {"data": str(folder.resolve())}
    if source == "gsm8k":
        return {"data.name": "gsm8k"}, {"data": "gsm8k"}
    raise DataNotFoundError(f"--data {source!r} is not a folder with train.jsonl and test.jsonl, nor the hub name "
                            "gsm8k")


TEXT = {"data.name": "gsm8k", "data.tokenizer": "bpe"}
STUDY = Study(
    name="icl_gsm8k",
    description="GSM8K few-shot accuracy (docs/METHOD.md section 8) of LTM and AR checkpoints.",
    summary_metrics=(metric(GSM8K, "*", "pass*"),),
    data_option=data_option,
    presets={
        "smoke": Preset("smoke", [{**TEXT, "data.bpe_vocab_size": 512, "model.ctx": 256, "model.window": 32,
                                   "train.tokens": 16_384, "train.eval_every": 0, "model.kind": kind,
                                   "inference.steps": steps} for kind, steps in (("ltm", 4), ("ar", 0))],
                        description="tiny LTM and AR on GSM8K train, 4 test problems, 0/1 shots",
                        task=Gsm8kTask(shots=[0, 1], pass_k=2, problems=4, max_new_tokens=8)),
        "micro": Preset("micro", [{**TEXT, "data.bpe_vocab_size": 2048, "model.ctx": 512, "train.batch_size": 8,
                                   "train.tokens": 409_600, "train.eval_every": 102_400,
                                   "train.checkpoint_every": 102_400, "train.eval_blocks": 16,
                                   "data.val_blocks": 16, "model.kind": kind, "inference.steps": steps}
                                  for kind, steps in (("ltm", 16), ("ar", 0))],
                        description="micro LTM (T=16) and AR trained on GSM8K train (410k tokens, context 512), "
                                    "30 test problems at 0/5/10 shots, pass@5 (2 CPUs, about 13 minutes)",
                        task=Gsm8kTask(problems=30)),
        "paper": Preset("ltm-l", [{"inference.steps": 64}], description="evaluate LTM-L checkpoints (--checkpoint)",
                        cpus=8, gpus=1, profile="gpu", task=Gsm8kTask()),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))
