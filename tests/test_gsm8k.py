"""GSM8K in-context learning: answer extraction and scoring, prompts, shots, data errors, the evaluation loop."""

import json

import pytest
import torch

import ltm
import ltm.gsm8k as gsm8k
from ltm.data import DataError, DataNotFoundError
from ltm.gsm8k import (Problem, build_prompt, draw_shots, evaluate_gsm8k, final_number, is_correct, load_problems,
                       normalise_number)



class ByteTokenizer:
    """Bytes as ids 0..255, BOS 256, EOS 257: enough of the TextTokenizer protocol for prompts."""

    vocab_size, bos_id, eos_id, cache_key = 258, 256, 257, "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


PROBLEMS = [Problem(f"What is {i} + {i}?", f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}")
            for i in range(1, 9)]


@pytest.mark.parametrize("text, number", [("18", "18"), ("$1,234.50", "1234.5"), ("7.00 dollars", "7"),
                                          ("-3", "-3"), ("no number", "")])
def test_normalise_number(text, number):
    assert normalise_number(text) == number


def test_final_number_prefers_the_marked_answer_then_the_last_number():
    assert final_number("3 + 4 = 7\n#### 7") == "7"
    assert final_number("he has 3, then 12 apples") == "12"
    assert final_number("nothing") == ""


def test_substring_match_is_looser_than_exact_match():
    assert is_correct("16 - 3 = 13 then 18 #### 9", "18") == (True, False)
    assert is_correct("#### 18", "18") == (True, True)
    assert is_correct("#### 180", "18") == (False, False)  # numbers, not characters, are matched


def test_problem_final_reads_the_gold_answer():
    assert PROBLEMS[2].final == "6"


def test_prompt_format_and_shots_that_do_not_fit_are_left_out():
    tok = ByteTokenizer()
    ids, used = build_prompt(tok, PROBLEMS[:2], "What is 9 + 9?", max_tokens=10_000)
    assert used == 2
    shot = f"Question: {PROBLEMS[0].question} Answer: {PROBLEMS[0].answer}"
    assert ids[0] == tok.bos_id and ids[1 + len(shot)] == tok.eos_id
    assert tok.decode(ids).endswith("Question: What is 9 + 9? Answer:")
    assert ids.count(tok.bos_id) == 3
    query = len("Question: What is 9 + 9? Answer:") + 1
    shot_tokens = (len(ids) - query) // 2  # both shots have the same length
    ids1, used1 = build_prompt(tok, PROBLEMS[:2], "What is 9 + 9?", max_tokens=query + shot_tokens)
    assert used1 == 1 and ids1 == ids[len(ids) - len(ids1):]  # the last shot stays, the first goes
    long = Problem("What is a very long question " + "and " * 200 + "?", "#### 1")
    ids2, used2 = build_prompt(tok, [PROBLEMS[0], long], "What is 9 + 9?", max_tokens=query + shot_tokens)
    assert used2 == 1 and tok.decode(ids2).startswith(f"Question: {PROBLEMS[0].question}")  # too long: skipped
    with pytest.raises(ValueError, match="question alone takes .* longer model.ctx"):
        build_prompt(tok, [], "What is 9 + 9?", max_tokens=5)


def test_shots_are_a_seeded_draw_that_never_includes_the_problem():
    a = draw_shots(PROBLEMS, 3, index=0, seed=0, exclude=PROBLEMS[0])
    assert a == draw_shots(PROBLEMS, 3, index=0, seed=0, exclude=PROBLEMS[0]) and len(a) == 3
    assert PROBLEMS[0] not in a
    assert draw_shots(PROBLEMS, 3, index=1, seed=0) != a or draw_shots(PROBLEMS, 3, index=0, seed=1) != a
    assert draw_shots(PROBLEMS, 0, index=0, seed=0) == []


def test_load_problems_from_a_folder_and_clear_errors(tmp_path):
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps({"question": p.question, "answer": p.answer})
                                                   for p in PROBLEMS[:3]) + "\n")
    assert load_problems(str(tmp_path), "test") == PROBLEMS[:3]
    with pytest.raises(DataNotFoundError, match="has no train.jsonl"):
        load_problems(str(tmp_path), "train")
    with pytest.raises(DataError, match="unknown GSM8K source 'gsm9k'"):
        load_problems("gsm9k", "test")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match="record 0: need fields question and answer"):
        load_problems(str(tmp_path), "train")


def test_real_gsm8k_loads_with_numeric_answers(local_data):
    test = load_problems(str(local_data("gsm8k")), "test")
    assert len(test) == 1319 and all(p.final for p in test)
    assert test[0].final == "18"


def _model(kind: str) -> ltm.LatentThoughtModel:
    torch.manual_seed(0)
    cfg = ltm.model_preset("smoke", vocab_size=258, ctx=256, kind=kind, n_latents=4 if kind == "ltm" else 0)
    return ltm.build_model(cfg)


def test_pass_at_k_counts_a_problem_right_when_any_inference_is(monkeypatch):
    tok = ByteTokenizer()
    replies = {"right": tok.encode(" 1 + 1 = 2\n#### 2") + [tok.eos_id], "wrong": tok.encode(" #### 3")}

    def fake_decode(model, prompt, z, max_new):
        return [replies["wrong"], replies["right"], replies["wrong"]][: prompt.shape[0]]

    monkeypatch.setattr(gsm8k, "greedy_answers", fake_decode)
    metrics, records = evaluate_gsm8k(_model("ltm"), tok, ltm.InferenceConfig(steps=1), PROBLEMS[:1], PROBLEMS,
                                      shots=1, pass_k=3, max_new_tokens=4)
    assert metrics["pass3_exact"] == 1.0 and metrics["pass3_substring"] == 1.0
    assert metrics["pass1_exact"] == pytest.approx(1 / 3) and metrics["format_rate"] == 1.0
    assert records[0]["answers"][1] == "1 + 1 = 2\n#### 2"  # cut at EOS, stripped
    assert records[0]["exact"] == [False, True, False] and records[0]["shots_used"] == 1


@pytest.mark.parametrize("kind", ["ltm", "ar"])
def test_evaluation_is_deterministic_and_leaves_the_model_alone(kind):
    tok, model = ByteTokenizer(), _model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    run = dict(shots=2, pass_k=2, max_new_tokens=3, seed=5)
    m1, r1 = evaluate_gsm8k(model, tok, ltm.InferenceConfig(steps=2), PROBLEMS[:2], PROBLEMS, **run)
    m2, r2 = evaluate_gsm8k(model, tok, ltm.InferenceConfig(steps=2), PROBLEMS[:2], PROBLEMS, **run)
    assert (m1, r1) == (m2, r2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert m1["problems"] == 2 and 0 <= m1["pass1_exact"] <= m1["pass2_exact"] <= 1
    assert all(len(r["answers"]) == 2 for r in r1)
    if kind == "ar":  # greedy AR decoding is deterministic: one decode stands for every inference
        assert all(r["answers"][0] == r["answers"][1] for r in r1)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="pass_k >= 1"):
        evaluate_gsm8k(_model("ar"), ByteTokenizer(), ltm.InferenceConfig(), PROBLEMS, PROBLEMS, shots=0, pass_k=0)
    with pytest.raises(ValueError, match="no problems"):
        evaluate_gsm8k(_model("ar"), ByteTokenizer(), ltm.InferenceConfig(), [], PROBLEMS, shots=0)
