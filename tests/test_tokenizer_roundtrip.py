"The byte-level tokenizer never produces <unk> and round-trips every task's prompts and answers exactly (issue #15)."
import random

import pytest

from flanmoe_nb import data as D


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    "A small tokenizer trained on prose only (most task symbols unseen), saved and reloaded the way runs load it."
    t = D.train_tokenizer(D.corpus_paragraphs("pydoc")[:1500], vocab_size=800)
    path = tmp_path_factory.mktemp("tok")
    t.save_pretrained(str(path))
    return D.load_tokenizer(path)


def _roundtrip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids, (text[:80], "produced <unk>")
    back = tok.decode(ids, skip_special_tokens=True)
    assert back == text, (text[:200], back[:200])
    return ids


def test_t5_ids_after_reload(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (0, 1, 2, 800)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 799 and tok.convert_tokens_to_ids("<extra_id_99>") == 700


@pytest.mark.parametrize("task", sorted(D.TASKS))
def test_every_task_round_trips_in_every_template_kind(tok, task):
    sp = D.generate_task(task, seed=0, n_train=6, n_validation=0, n_test=3)
    cfg = D.get_config("tiny", shots=(1, 2))
    rng = random.Random(task)
    for i, ex in enumerate(sp["test"]):
        _roundtrip(tok, ex["question"])
        _roundtrip(tok, ex["answer"])
        for o in D.answer_options(ex): _roundtrip(tok, o)
        for kind in D.TEMPLATE_KINDS:
            r = D.make_prompt(ex, kind, sp["train"], rng, cfg, template=i + D.TEMPLATE_KINDS.index(kind))
            _roundtrip(tok, r["inputs"])
            for o in r["options"]: _roundtrip(tok, o)


def test_symbols_that_used_to_be_unk(tok):
    for s in ["│&&─┘┌───│&&", "⊕⊕ ↑↑ >o ++", "A' ∧ B ≤ ½ → ∞", "naïve café — “quoted”", "tabs\tand\n\nnewlines  ", " leading space",
              "emoji 🙂 and CJK 漢字", "x" * 3 + "   " + "1,234.50e-3"]:
        _roundtrip(tok, s)
    ids = tok("│─┘", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3   # unseen characters fall back to their UTF-8 bytes


def test_sentinels_are_single_tokens_and_round_trip(tok):
    for i in (0, 1, 50, 99):
        assert tok(f"<extra_id_{i}>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(f"<extra_id_{i}>")]
    s = "The <extra_id_0> fox jumps<extra_id_1> over the dog <extra_id_2>"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids if i >= 700] == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    assert tok.decode(ids) == s
    assert tok.decode(ids, skip_special_tokens=True) == "The  fox jumps over the dog "


def test_yes_no_tokens(tok):
    yes, no = (tok(w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No"))
    assert tok.decode(yes) == "Yes" and tok.decode(no) == "No"
    assert 1 <= len(yes) <= 3 and 1 <= len(no) <= 2
