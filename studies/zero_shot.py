"""Zero-shot perplexity: checkpoints evaluated on corpora they were not trained on.

    python studies/zero_shot.py --checkpoint RUN_ID_OR_PATH                  # wikitext, ptb, lambada, lm1b
    python studies/zero_shot.py --checkpoint PATH --task corpora=a.txt,b.jsonl
    python studies/zero_shot.py --preset smoke --data train.txt --task corpora=other.txt

Each block gets its own posterior (the checkpoint's inference steps unless --task steps=N);
metrics `zeroshot/<corpus>/{ppl_bound, ppl_iw, nll, kl, ...}`, exact perplexity for AR runs.
Hub corpora are read from their test splits; local files whole. Without --checkpoint the preset
trains its models on --data (text) first.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402
exit_on_signal(__name__)  # first: a signal while torch and Ray load exits 3 with a message
from ltm.names import BOUND, PPL_BOUND, PPL_IW, ZERO_SHOT, metric  # noqa: E402
from studies.launcher import main  # noqa: E402
from studies.study import Preset, Study, ZeroShotTask  # noqa: E402


TEXT = {"data.name": "wikitext-103", "data.tokenizer": "bpe"}
STUDY = Study(
    name="zero_shot",
    description="Zero-shot perplexity bounds of LTM and AR checkpoints on other corpora.",
    summary_metrics=(metric(ZERO_SHOT, "*", BOUND), metric(ZERO_SHOT, "*", PPL_BOUND), metric(ZERO_SHOT, "*", PPL_IW)),
    presets={
        "smoke": Preset("smoke", [{**TEXT, "data.bpe_vocab_size": 512, "model.ctx": 64, "model.window": 32,
                                   "model.kind": kind, "inference.steps": steps, "train.eval_every": 0}
                                  for kind, steps in (("ltm", 4), ("ar", 0))],
                        description="tiny LTM and AR, 8 blocks per corpus",
                        task=ZeroShotTask(max_blocks=8, iw_samples=2)),
        "micro": Preset("micro", [{**TEXT, "data.bpe_vocab_size": 4096, "model.kind": kind, "inference.steps": steps}
                                  for kind, steps in (("ltm", 16), ("ar", 0))],
                        description="micro LTM (T=16) and AR trained on --data, 64 blocks per corpus (2 CPUs)",
                        task=ZeroShotTask()),
        "paper": Preset("ltm-l", [{"inference.steps": 64}], description="evaluate LTM checkpoints (--checkpoint)",
                        cpus=8, gpus=1, profile="gpu", task=ZeroShotTask(max_blocks=1024)),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))
