"""Generation: unconditional samples over a prior-temperature sweep and continuations of prefixes.

    python studies/generation.py                                      # micro LTM and AR, synthetic corpus
    python studies/generation.py --preset smoke                       # seconds, for tests
    python studies/generation.py --checkpoint PATH --task reference=REF_RUN_OR_PATH

Unconditional: z ~ N(0, s^2 I) for each prior temperature s, decoded from [BOS]. Conditional: the
posterior fitted on each of the first validation blocks' prefix, z sampled from it. Metrics
`gen/<setting>/entropy` (mean per-sample unigram entropy, nats) and, with a reference checkpoint
of the same tokenizer, `gen/<setting>/gen_ppl` (the reference's perplexity, a bound if it is an
LTM, of the generated tokens); the samples are logged as the artifact samples.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402
exit_on_signal(__name__)  # first: a signal while torch and Ray load exits 3 with a message
from ltm.names import ENTROPY, GEN_PPL, GENERATION, metric  # noqa: E402
from studies.launcher import main  # noqa: E402
from studies.study import GenerationTask, Preset, Study  # noqa: E402


STUDY = Study(
    name="generation",
    description="Unconditional (prior temperature sweep) and conditional generation of LTM and AR checkpoints.",
    summary_metrics=(metric(GENERATION, "*", ENTROPY), metric(GENERATION, "*", GEN_PPL)),
    presets={
        "smoke": Preset("smoke", [{"model.kind": kind, "inference.steps": steps, "train.eval_every": 0}
                                  for kind, steps in (("ltm", 4), ("ar", 0))],
                        description="tiny LTM and AR, 4 samples of 16 tokens",
                        task=GenerationTask(samples=4, length=16, prefix=8)),
        "micro": Preset("micro", [{"model.kind": kind, "inference.steps": steps}
                                  for kind, steps in (("ltm", 16), ("ar", 0))],
                        description="micro LTM (T=16) and AR on the synthetic corpus, 16 samples of 96 tokens",
                        task=GenerationTask()),
        "paper": Preset("ltm-l", [{"inference.steps": 64}], description="evaluate LTM checkpoints (--checkpoint)",
                        cpus=8, gpus=1, profile="gpu", task=GenerationTask(samples=64, length=1023, prefix=256)),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))
