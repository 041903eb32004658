"Evaluation: normalisation, exact match, task scorers, rank classification math, aggregates (hand-built examples)."
import json, math
import pytest, torch
from flanmoe_nb import eval as ev


class FixedLogits(torch.nn.Module):
    "Same logits row at every decoder position; records the batches it sees."
    def __init__(self, row):
        super().__init__(); self.row = torch.tensor(row, dtype=torch.float32); self.calls = []
    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        self.calls.append((input_ids.clone(), labels.clone()))
        return self.row.expand(labels.shape[0], labels.shape[1], -1)


class GenB(FixedLogits):
    "Generates `b` then EOS."
    def generate(self, input_ids, attention_mask=None, max_new_tokens=8):
        return torch.tensor([[0, 3, 1, 0]] * input_ids.shape[0])


class PerPosition(torch.nn.Module):
    "Logits depend on the decoder position and on the first input token (so batching mistakes show)."
    def __init__(self, table):  # table [P, V]
        super().__init__(); self.table = torch.tensor(table, dtype=torch.float32)
    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        L = labels.shape[1]
        base = self.table[:L][None].expand(labels.shape[0], -1, -1).clone()
        return base + input_ids[:, :1, None].float()  # a per-row constant shift: log-softmax invariant


class CharTok:
    def encode(self, s): return [ord(c) - 95 for c in s if "a" <= c <= "z"]
    def decode(self, ids, skip_special_tokens=True): return "".join(chr(i + 95) for i in ids if 1 < i < 28)


@pytest.mark.parametrize("a,b,want", [
    ("  Big   dog ", "big dog", 1.0), ("Yes", "yes", 1.0), ("no", "yes", 0.0), ("42", "42.0", 0.0),
    ("-3", "3", 0.0), ("1/2", "12", 0.0), ("3.5", "35", 0.0), ("The cat.", "cat", 0.0), ("Paris", ["London", "paris"], 1.0)])
def test_exact_match(a, b, want):
    assert ev.exact_match(a, b) == want


def test_one_exact_match_shared_with_data():
    from flanmoe_nb import data
    assert ev.exact_match is data.exact_match and ev.normalize_answer is data.normalize_answer
    assert ev.normalize_answer("  The  Quick, brown fox!") == "the quick, brown fox!"
    assert ev.normalize_answer(3) == "3"


def test_task_scorer_priority_and_errors():
    ex = dict(task="t", target="5")
    assert ev.score_prediction("5", ex) == 1.0                       # exact-match fallback
    assert ev.score_prediction("5.0", ex) == 0.0
    num = lambda p, e: float(float(p) == float(e["target"]))
    assert ev.score_prediction("5.0", ex, {"t": num}) == 1.0         # task's own scorer wins
    errs = []
    assert ev.score_prediction("oops", ex, {"t": num}, errors=errs) == 0.0   # scorer raising -> 0, reported
    assert len(errs) == 1 and "could not convert" in errs[0] and "'t'" in errs[0]
    assert ev.score_prediction("x", ex, {"t": lambda p, e: 7.0}, errs) == 0.0 and "outside [0, 1]" in errs[-1]
    assert ev.score_prediction("x", ex, {"t": lambda p, e: float("nan")}, errs) == 0.0 and len(errs) == 3
    with pytest.raises(ValueError, match="could not convert"):      # without an errors list: raises, never silent
        ev.score_prediction("oops", ex, {"t": num})


def test_tokenize_eos_and_truncation():
    tok = CharTok()
    assert ev.tokenize(tok, "abc", eos_id=1) == [2, 3, 4, 1]
    assert ev.tokenize(tok, "abcdef", eos_id=1, max_len=3) == [2, 3, 1]
    assert ev.detokenize(tok, [3, 4, 1, 5, 0]) == "bc"
    assert ev.tokenize(tok, "abcdef", eos_id=1, max_len=3, keep="end") == [6, 7, 1]   # few-shot: the question is last
    assert ev.tokenize(tok, "abcdef", max_len=2, keep="end") == [6, 7] and ev.tokenize(tok, "abc") == [2, 3, 4]


def test_rank_classification_matches_hand_computation():
    row = [0.0, 1.0, 2.0, 0.0]
    ls = torch.log_softmax(torch.tensor(row), -1)
    m = FixedLogits(row)
    opts = [[[2, 1], [3, 1], [1]], [[2, 2, 2, 1]]]
    got = ev.score_options(m, [[3, 3, 1], [2, 1]], opts, batch_size=2)
    want = [[ls[2] + ls[1], ls[3] + ls[1], ls[1]], [3 * ls[2] + ls[1]]]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g), torch.stack(w), atol=1e-5)
    # batching: shortest prompt first, 4 pairs in batches of 2 -> 2 forward calls; label padding is -100 (ignored)
    assert len(m.calls) == 2
    assert m.calls[0][1].tolist() == [[2, 2, 2, 1], [2, 1, -100, -100]] and m.calls[1][1].tolist() == [[3, 1], [1, -100]]
    mean = ev.score_options(FixedLogits(row), [[3, 1]], [opts[1][0:1] + opts[0][0:1]], normalize="mean")
    with pytest.raises(ValueError, match="normalize"): ev.score_options(FixedLogits(row), [[3, 1]], [[[2, 1]]], normalize="max")
    assert math.isclose(mean[0][0], float(3 * ls[2] + ls[1]) / 4, rel_tol=1e-5)
    assert math.isclose(mean[0][1], float(ls[2] + ls[1]) / 2, rel_tol=1e-5)


def test_rank_classification_position_dependent_and_batch_invariant():
    # position 0 prefers token 2, position 1 prefers EOS: option "a"=[2,1] must win over "b"=[3,1] and "ab"
    table = [[0, 0, 5, 1], [0, 4, 0, 0], [0, 0, 0, 3]]
    m = PerPosition(table)
    lp = torch.log_softmax(torch.tensor(table, dtype=torch.float32), -1)
    opts = [[[2, 1], [3, 1], [2, 3, 1]]] * 3
    xs = [[5, 1], [9, 9, 1], [2, 1]]
    s1 = ev.score_options(m, xs, opts, batch_size=1)
    s9 = ev.score_options(m, xs, opts, batch_size=9)
    assert torch.allclose(torch.tensor(s1), torch.tensor(s9), atol=1e-5)
    want = [lp[0, 2] + lp[1, 1], lp[0, 3] + lp[1, 1], lp[0, 2] + lp[1, 3] + lp[2, 1]]
    assert torch.allclose(torch.tensor(s1[0]), torch.stack(want), atol=1e-5)


def test_evaluate_rank_generate_and_aggregates(tmp_path):
    class PrefersB(FixedLogits):
        def generate(self, input_ids, attention_mask=None, max_new_tokens=8):
            return torch.tensor([[0, 3, 1, 0]] * input_ids.shape[0])
    m = PrefersB([0.0, 1.0, 0.0, 3.0] + [0.0] * 26)
    rows = [dict(inputs="pick", targets="b", options=["a", "b"], task="c1", cluster="nli"),
            dict(inputs="pick", targets="a", options=["a", "b"], task="c1", cluster="nli"),
            dict(inputs="pick", targets="b", options=["a", "b"], task="c2", cluster="nli"),
            dict(prompt="x", target="b", task="g1", cluster="gen"),
            dict(prompt="y", target=" B ", task="g1", cluster="gen"),
            dict(prompt="z", target="c", task="g2", cluster="qa")]
    r = ev.evaluate(m, CharTok(), rows, held_out=["gen", "qa", "missing"])
    assert r["per_task"] == {"c1": 0.5, "c2": 1.0, "g1": 1.0, "g2": 0.0}
    assert r["per_cluster"] == {"gen": 1.0, "nli": 0.75, "qa": 0.0}
    assert r["held_out"] == 0.5 and r["score"] == 0.625 and r["num_examples"] == 6
    assert [e["method"] for e in r["examples"]] == ["rank"] * 3 + ["generate"] * 3
    g = ev.evaluate(m, CharTok(), rows, mode="generate")
    assert all(e["method"] == "generate" for e in g["examples"]) and g["per_task"]["c1"] == 0.5
    with pytest.raises(ValueError, match="mode"):
        ev.evaluate(m, CharTok(), rows, mode="beam")
    with pytest.raises(ValueError, match="g1"):
        ev.evaluate(m, CharTok(), rows, mode="rank")
    p = ev.write_eval({"zero_shot": r}, tmp_path / "eval.json", max_examples=2)
    back = json.loads(p.read_text())
    assert back["zero_shot"]["per_cluster"]["nli"] == 0.75 and len(back["zero_shot"]["examples"]) == 2
    t = back["zero_shot"]["tasks"]
    assert t["c1"]["chance"] == 0.5 and t["c1"]["majority"] == 0.5 and t["c1"]["method"] == "rank"
    assert t["g1"]["chance"] is None and t["g1"]["majority"] == 1.0 and t["g1"]["method"] == "generate"
    assert back["zero_shot"]["scorer_errors"] == 0 and back["zero_shot"]["truncated"] == 0


def test_primary_ranking_is_length_normalised():
    "Each `b` is likely but EOS is not: '" + "bbbbb</s>' wins per token and loses in sum to the shorter 'a</s>'."
    m = FixedLogits([0.0, 1.0, 0.0, 3.0] + [0.0] * 26)
    rows = [dict(prompt="pick", target="bbbbb", options=["a", "bbbbb"], task="len", cluster="c"),
            dict(prompt="pick", target="a", options=["a", "bbbbb"], task="len", cluster="c")]
    r = ev.evaluate(m, CharTok(), rows)
    assert [e["pred"] for e in r["examples"]] == ["bbbbb", "bbbbb"] and [e["pred_sum"] for e in r["examples"]] == ["a", "a"]
    assert (r["score"], r["score_sum"], r["per_task"]["len"], r["per_task_sum"]["len"]) == (0.5, 0.5, 0.5, 0.5)
    assert [e["score"] for e in r["examples"]] == [1.0, 0.0] and [e["score_sum"] for e in r["examples"]] == [0.0, 1.0]
    ranked = ev.rank_answers(m, CharTok(), [ev.as_example(rows[0])])[0]
    lp = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0, 3.0] + [0.0] * 26), -1)
    assert math.isclose(ranked["scores_sum"][1], float(5 * lp[3] + lp[1]), rel_tol=1e-5)
    assert math.isclose(ranked["scores"][1], float(5 * lp[3] + lp[1]) / 6, rel_tol=1e-5)


def test_report_baselines_truncation_and_scorer_errors():
    m = GenB([0.0, 1.0, 0.0, 3.0] + [0.0] * 26)
    def picky(pred, ex):
        if pred == "b": raise RuntimeError("scorer exploded")
        return float(pred == ex["target"])
    rows = [dict(prompt="x" * 20, target=t, options=["a", "b", "c"], task="r", cluster="c") for t in ("a", "a", "c", "b")]
    rows += [dict(prompt="short", target="b", task="g", cluster="c")]
    r = ev.evaluate(m, CharTok(), rows, max_input_len=10, scorers={"r": picky})
    rep = r["tasks"]["r"]
    assert rep["n"] == 4 and rep["n_options"] == 3 and math.isclose(rep["chance"], 1 / 3)
    assert rep["majority"] == 0.5 and rep["majority_option"] == 0.5           # "a" (position 0) is gold twice
    assert rep["truncated"] == 4 and r["tasks"]["g"]["truncated"] == 0 and r["truncated"] == 4
    assert rep["scorer_errors"] == 4 and "scorer exploded" in rep["scorer_error_messages"][0] and len(rep["scorer_error_messages"]) == 3
    assert rep["score"] == 0.0 and r["scorer_errors"] == 4
    assert all(e["truncated"] for e in r["examples"][:4]) and r["examples"][0]["scorer_errors"]
    with pytest.raises(ValueError, match="max_input_len"): ev.evaluate(m, CharTok(), rows, max_input_len=True)


def test_data_rows_of_closed_tasks_are_ranked_over_their_whole_set():
    from flanmoe_nb import data
    import random
    cfg = data.get_config("tiny")
    rows = []
    for t in ("syllogism", "knights_knaves", "self_reference", "aiw"):
        sp = data.generate_task(t, seed=0, n_train=5, n_validation=0, n_test=3)
        rows += [data.make_prompt(ex, "zs_opt", sp["train"], random.Random(0), cfg) for ex in sp["test"]]
    m = FixedLogits([0.0] * 30)
    r = ev.evaluate(m, CharTok(), rows)
    assert {e["method"] for e in r["examples"]} == {"rank"}
    assert {t: v["n_options"] for t, v in r["tasks"].items()} == {"aiw": 6, "knights_knaves": 4, "self_reference": 8, "syllogism": 2}
    assert r["tasks"]["knights_knaves"]["chance"] == 0.25


def test_evaluate_real_tiny_model_rank_equals_manual():
    from flanmoe_nb.model import ModelConfig, EncoderDecoder
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_heads=2,
                                       num_encoder_layers=1, num_decoder_layers=1, dropout=0.0)).eval()
    tok = CharTok()
    rows = [dict(prompt="which", target="yes", options=["yes", "no", "maybe"], task="t", cluster="c")]
    r = ev.evaluate(model, tok, rows)
    x = torch.tensor([ev.tokenize(tok, "which", 1)])
    manual = []
    torch.set_grad_enabled(False)
    for o in ["yes", "no", "maybe"]:
        y = torch.tensor([ev.tokenize(tok, o, 1)])
        lp = torch.log_softmax(model(x, labels=y).logits, -1)[0]
        manual.append(float(lp.gather(-1, y[0][:, None]).sum()))
    torch.set_grad_enabled(True)
    best = ["yes", "no", "maybe"][max(range(3), key=manual.__getitem__)]
    assert r["examples"][0]["pred"] == best
    assert r["examples"][0]["score"] == float(best == "yes")


def test_few_shot_prompt():
    ex = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    assert ev.few_shot_prompt("q", ex, k=0) == "q"
    assert ev.few_shot_prompt("q", ex, k=2) == "q1\nAnswer: a1\n\nq2\nAnswer: a2\n\nq"
    with pytest.raises(ValueError, match="k=4"):
        ev.few_shot_prompt("q", ex, k=4)


def test_registry_scorer_from_data_module():
    data = pytest.importorskip("flanmoe_nb.data")
    ex = data.generate_task("gcd", seed=0, n_train=1, n_validation=1, n_test=2)["test"][0]
    row = ev.as_example(ex)   # a raw data row: task/cluster/question/answer + generator coordinates
    assert ev.score_prediction(ex["answer"], row) == 1.0
    assert ev.score_prediction(" " + ex["answer"] + " ", row) == 1.0
    # the generator's own scorer (partial credit is its business), not exact match
    assert ev.score_prediction("12345", row) == data.score_answer(ex, "12345") < 1.0
    assert ev.task_scorer("not_a_registered_task") is ev._em_scorer


def test_score_options_encodes_each_prompt_once_with_the_same_scores():
    "An encoder-decoder's options are scored against one encoder pass per prompt; the scores equal the per-pair forward's."
    import torch
    from flanmoe_nb.model import ModelConfig, EncoderDecoder
    torch.manual_seed(0)
    m = EncoderDecoder(ModelConfig.preset("tiny", vocab_size=64, moe=dict(num_experts=4, eval_capacity_factor=None))).eval()
    xs = [[5, 6, 7, 1], [9, 1], [3, 4, 5, 6, 7, 8, 1], [2, 1]]
    opts = [[[10, 1], [11, 12, 1]], [[13, 1]], [[14, 1], [15, 1], [16, 17, 18, 1]], [[19, 20, 1], [21, 1]]]
    pairs = [(i, o) for i, os in enumerate(opts) for o in os]
    ref = ev.sequence_logprobs(m, [xs[i] for i, _ in pairs], [o for _, o in pairs]).tolist()
    calls = []
    enc = m.encode
    m.encode = lambda *a, **k: (calls.append(a[0].shape[0]), enc(*a, **k))[1]
    for bs in (1, 3, 64):
        calls.clear()
        got = [s for row in ev.score_options(m, xs, opts, batch_size=bs) for s in row]
        assert got == pytest.approx(ref, abs=1e-4)
        assert sum(calls) == len(xs)          # every prompt encoded exactly once


def test_validation_ce_is_token_weighted_and_order_free():
    "Batched in length order, the token-weighted CE equals the per-row computation in any row order."
    import random, torch
    from types import SimpleNamespace
    from flanmoe_nb.model import ModelConfig, EncoderDecoder
    torch.manual_seed(0)
    m = EncoderDecoder(ModelConfig.preset("tiny", vocab_size=40)).eval()
    rng = random.Random(0)
    rows = [dict(input_ids=[rng.randrange(3, 40) for _ in range(rng.randrange(2, 30))] + [1],
                 labels=[rng.randrange(3, 40) for _ in range(rng.randrange(1, 6))] + [1]) for _ in range(23)]
    tok = SimpleNamespace(pad_token_id=0)
    tot = n = 0.0
    with torch.no_grad():
        for r in rows:
            x, y = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            tot += float(m(input_ids=x, attention_mask=x.ne(0), labels=y).ce_loss) * y.numel(); n += y.numel()
    got = ev.validation_ce(m, rows, tok, torch.device("cpu"), batch_size=5)
    assert got == pytest.approx(tot / n, abs=2e-5)
    assert ev.validation_ce(m, rows[::-1], tok, torch.device("cpu"), batch_size=7) == pytest.approx(got, abs=2e-5)
    assert ev.validation_ce(m, [], tok, torch.device("cpu")) is None
