"Tests of the offline FLAN-style data pipeline (flanmoe_nb.data): determinism, leaks, scorers, loaders, span corruption."
import json, os, subprocess, sys, random, dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flanmoe_nb import data as D, tasks as TK

MICRO_TASKS = ("gcd", "chain_sum", "syllogism", "aiw", "caesar_cipher", "maze", "course_schedule", "simple_geometry")


def micro(tmp, **kw):
    "A config small enough to build a tokenizer and mixture in seconds."
    base = dict(tasks=MICRO_TASKS, n_train=30, n_validation=4, n_test=8, vocab_size=700, corpus_max_chars=60_000,
                max_pretrain_examples=40, pretrain_inputs_len=64, cache_dir=str(tmp))
    return D.get_config("tiny", **{**base, **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory): return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------- registry and names
def test_registry_size_and_clusters():
    assert len(D.TASKS) >= 60
    cl = D.clusters()
    assert sum(map(len, cl.values())) == len(D.TASKS)
    for name, t in D.TASKS.items():
        import reasoning_gym.factory as F
        assert F.DATASETS[name][0].__module__.split(".")[1] == t.cluster, name   # clusters follow generator categories
    assert all(len(v) >= 5 for v in D.TEMPLATES.values())


@pytest.mark.parametrize("call,needle", [
    (lambda: D.get_task("gcdd"), "'gcd'"),
    (lambda: D.check_clusters(["arithmatic"]), "'arithmetic'"),
    (lambda: D.get_config("tinyy"), "'tiny'"),
    (lambda: D.get_config("tiny", vocab_sise=10), "'vocab_size'"),
    (lambda: D.training_tasks(D.get_config("tiny", tasks=("chain_summ",))), "'chain_sum'"),
    (lambda: D.build_eval_sets(D.get_config("tiny"), clusters=("logik",)), "'logic'"),
])
def test_unknown_names_list_close_matches(call, needle):
    with pytest.raises(KeyError, match="did you mean") as e: call()
    assert needle in str(e.value)


@pytest.mark.parametrize("field,value,needle", [
    ("n_train", 2.5, "int >= 1"), ("n_train", 0, "int >= 1"), ("seed", -1, "int >= 0"), ("seed", True, "int >= 0"),
    ("n_options", 1, "int >= 2"), ("mixing_cap", 0, "int >= 1"), ("temperature", 0.0, "> 0"), ("temperature", float("nan"), "> 0"),
    ("shots", (3, 1), "0 <= a <= b"), ("shots", (1, 2, 3), "pair"), ("shots", (-1, 2), ">= 0"), ("shots", 2, "list"),
    ("template_kinds", {"zs_noopt": 0.0}, "positive sum"), ("template_kinds", {"zs_nopt": 1.0}, "zs_noopt"),
    ("template_kinds", {"zs_noopt": -1.0, "zs_opt": 2.0}, ">= 0"), ("template_kinds", ["zs_noopt"], "mapping"),
    ("vocab_size", 100, "int >= 400"), ("max_input_len", 0, "int >= 1"), ("noise_density", 0.0, "> 0 and < 1"),
    ("noise_density", 1.5, "< 1"), ("tokenizer_model", "wordpiece", "one of"), ("pack", 1, "True or False"),
    ("train_sizes", {"gcd": 0}, "ints >= 1"), ("mixture_size", 0, "int >= 1"), ("tasks", "gcd", "list"),
])
def test_data_config_validation(field, value, needle):
    with pytest.raises(D.ConfigError) as e: D.get_config("tiny", **{field: value})
    msg = str(e.value)
    assert f"DataConfig.{field}" in msg and f"{field}={value!r}" in msg and needle in msg, msg


def test_data_config_accepts_and_normalises():
    cfg = D.get_config("tiny", tasks=["gcd"], shots=[0, 2], cache_dir=Path("/tmp/x"), temperature=2, mixture_size=None)
    assert cfg.tasks == ("gcd",) and cfg.shots == (0, 2) and cfg.cache_dir == "/tmp/x" and cfg.temperature == 2.0
    with pytest.raises(D.ConfigError, match="n_test"): dataclasses.replace(cfg, n_test=0)   # replace re-validates


# ---------------------------------------------------------------- splits and scorers
@pytest.fixture(scope="module")
def all_splits():
    return {t: D.generate_task(t, seed=0, n_train=30, n_validation=5, n_test=10) for t in D.TASKS}


def test_no_test_example_in_train_for_any_task(all_splits):
    for t, sp in all_splits.items():
        q = {s: {TK.normalize_question(r["question"]) for r in sp[s]} for s in sp}
        assert len(sp["test"]) == 10 and len(sp["validation"]) == 5 and len(sp["train"]) >= 20, t
        assert not q["test"] & q["train"] and not q["validation"] & q["train"] and not q["test"] & q["validation"], t


def test_regenerated_entry_matches(all_splits):
    for t, sp in all_splits.items():
        ex = sp["test"][3]
        e = D.generator_entry(ex)
        assert (e["question"], str(e["answer"])) == (ex["question"], ex["answer"]), t


def test_each_scorer_accepts_gold_and_rejects_wrong(all_splits):
    for t, sp in all_splits.items():
        rows = sp["test"][:3]
        for i, ex in enumerate(rows):
            assert D.score_answer(ex, ex["answer"]) == 1.0, (t, ex["answer"])
            assert D.get_task(t).score(" " + ex["answer"] + "\n", ex) == 1.0, t
            assert D.exact_match(ex["answer"], ex["answer"]) == 1.0
            assert D.score_answer(ex, "") < 1.0, t
            wrong = next((r["answer"] for r in sp["train"] if TK.normalize_question(r["answer"]) != TK.normalize_question(ex["answer"])), None)
            if wrong is not None:
                assert D.score_answer(ex, wrong) < 1.0, (t, ex["answer"], wrong)


def test_options_contain_gold_and_distractors_are_rejected(all_splits):
    cfg = D.get_config("tiny")
    for t, sp in all_splits.items():
        rng = random.Random(t)
        for ex in sp["test"][:2]:
            r = D.make_prompt(ex, "zs_opt", sp["train"], rng, cfg)
            if not r["options"]:
                assert r["kind"] == "zs_noopt"; continue
            assert ex["answer"] in r["options"], t
            assert len(set(r["options"])) == len(r["options"])
            assert sum(D.score_answer(ex, o) == 1.0 for o in r["options"]) == 1, t   # exactly one right option
            assert all(f"- {o}" in r["inputs"] for o in r["options"])
            if D.TASKS[t].closed: assert r["options"] == D.answer_options(ex), t      # closed sets are shown whole


CLOSED = {"aiw": 6, "circuit_logic": 2, "knights_knaves": 4, "self_reference": 8, "syllogism": 2, "course_schedule": 2,
          "family_relationships": 12, "mahjong_puzzle": 3, "maze": 6, "color_cube_rotation": 16, "acre": 3}


def test_answer_options_closed_sets(all_splits):
    assert {t for t, s in D.TASKS.items() if s.closed} == set(CLOSED) | {"largest_island", "needle_haystack"}
    for t, sp in all_splits.items():
        for ex in sp["test"] + sp["train"]:
            opts = D.answer_options(ex)
            if not D.TASKS[t].closed: assert opts == [], t; continue
            assert ex["answer"] in opts and len(set(opts)) == len(opts), (t, ex["answer"], opts)
            if t in CLOSED: assert len(opts) == CLOSED[t], (t, opts)
    kk = all_splits["knights_knaves"]["test"][0]
    names = [str(n) for n in D.generator_entry(kk)["metadata"]["names"]]
    assert all(o.startswith(names[0] + " is ") and f", and {names[1]} is " in o and o.endswith(".") for o in D.answer_options(kk))
    isl = all_splits["largest_island"]["test"][0]
    g = D.generator_entry(isl)["metadata"]["grid"]
    assert D.answer_options(isl) == [str(i) for i in range(len(g) * len(g[0]) + 1)]
    with pytest.raises(ValueError, match="not in its closed answer set"): D.answer_options(dict(kk, answer="Nobody is a knight."))
    with pytest.raises(ValueError, match="generator coordinates"): D.answer_options(dict(kk, source_index=-1))


def test_tiny_preset_fills_200_test_items_for_every_task():
    cfg = D.get_config("tiny")
    assert cfg.n_test == 200 == D.PRESETS["tiny"]["n_test"]
    for t in D.TASKS:
        sp = D.generate_task(t, cfg.seed, cfg.n_train, cfg.n_validation, cfg.n_test)
        assert (len(sp["test"]), len(sp["validation"]), len(sp["train"])) == (200, 10, 200), t
    with pytest.raises(ValueError, match="'coin_flip' yields only"):     # 980 distinct questions at most
        D.generate_task("coin_flip", n_train=1, n_validation=0, n_test=1000)


def test_different_seeds_different_examples():
    a = D.generate_task("gcd", seed=0, n_train=20, n_validation=0, n_test=5)
    b = D.generate_task("gcd", seed=1, n_train=20, n_validation=0, n_test=5)
    assert {r["question"] for r in a["train"]} != {r["question"] for r in b["train"]}
    assert a == D.generate_task("gcd", seed=0, n_train=20, n_validation=0, n_test=5)


def test_generation_independent_of_hash_seed():
    code = ("import hashlib, json; from flanmoe_nb import data as D; "
            "cfg = D.get_config('tiny', n_train=6, n_validation=1, n_test=2); "
            "print(hashlib.sha256(json.dumps(D.raw_mixture(cfg), sort_keys=True).encode()).hexdigest())")
    outs = []
    for hs in ("1", "2"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED=hs))
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]


# ---------------------------------------------------------------- mixture, cache, held-out clusters
def test_mixing_rates():
    assert D.mixture_counts({"a": 100, "b": 1000, "c": 5000}, cap=2000) == {"a": 100, "b": 1000, "c": 2000}
    r = D.mixing_rates({"a": 100, "b": 400}, cap=10_000, temperature=2.0)
    assert r["b"] / r["a"] == pytest.approx(2.0)
    assert sum(D.mixture_counts({"a": 3, "b": 5, "c": 9}, cap=6, temperature=3.0, total=101).values()) == 101
    with pytest.raises(ValueError, match="temperature"): D.mixing_rates({"a": 1}, cap=1, temperature=0)


def test_same_config_byte_identical_and_seed_changes(tmp_path):
    cfg = micro(tmp_path / "a")
    m1 = D.build_mixture(cfg)
    D._MIX.clear(); D._SPLITS.clear()
    m2 = D.build_mixture(dataclasses.replace(cfg, cache_dir=str(tmp_path / "b")))   # rebuilt from scratch
    assert D.dataset_digest(m1) == D.dataset_digest(m2)
    assert D.tokenizer_fingerprint(D.build_tokenizer(cfg)) == D.tokenizer_fingerprint(D.build_tokenizer(dataclasses.replace(cfg, cache_dir=str(tmp_path / "b"))))
    m3 = D.build_mixture(dataclasses.replace(cfg, seed=1))
    assert D.dataset_digest(m3) != D.dataset_digest(m1)
    assert set(m3["train"]["question"]) != set(m1["train"]["question"])
    assert D.dataset_digest(D.build_mixture(cfg)) == D.dataset_digest(m1)   # cache hit
    assert len(list((tmp_path / "a").glob("mixture-*"))) == 2


def test_mixture_rows_are_well_formed(cache):
    cfg = micro(cache)
    m = D.build_mixture(cfg)
    tok = D.build_tokenizer(cfg)
    tr = m["train"]
    assert set(tr["task"]) == set(MICRO_TASKS)
    assert set(tr["kind"]) <= set(D.TEMPLATE_KINDS) and {"zs_noopt", "fs_noopt"} <= set(tr["kind"])
    for r in tr.select(range(50)):
        assert r["input_ids"][-1] == tok.eos_token_id and r["labels"][-1] == tok.eos_token_id
        assert len(r["input_ids"]) <= cfg.max_input_len and len(r["labels"]) <= cfg.max_target_len
        assert tok.decode(r["labels"], skip_special_tokens=True) == r["targets"]
        assert r["targets"] == r["answer"]
        if r["kind"].endswith("_opt"): assert r["answer"] in r["options"]
        if r["kind"].startswith("fs"): assert r["inputs"].count("\n\n") >= 1
    # few-shot exemplars are train questions of the same task, never test ones
    tests = {TK.normalize_question(x["question"]) for t in MICRO_TASKS for x in D.task_splits(t, cfg)["test"]}
    assert not any(TK.normalize_question(q) in tests for q in tr["question"])


def test_held_out_clusters_never_reach_training(cache):
    cfg = micro(cache, tasks=(), clusters=("arithmetic", "logic", "graphs"), held_out_clusters=("logic", "graphs"))
    m = D.build_mixture(cfg)
    assert set(m["train"]["task"]) == set(D.clusters()["arithmetic"])
    assert not {"syllogism", "aiw", "course_schedule"} & set(m["train"]["task"]) and not {"logic", "graphs"} & set(m["train"]["cluster"])
    assert not {"logic", "graphs"} & set(m["validation"]["cluster"])
    held_q = {TK.normalize_question(r["question"]) for t in D.held_out_tasks(cfg) for s in ("train", "validation", "test") for r in D.task_splits(t, cfg)[s]}
    assert not any(TK.normalize_question(q) in held_q for q in m["train"]["question"])
    ev = D.build_eval_sets(cfg, shots=0)
    assert set(ev["cluster"]) == {"logic", "graphs"} and set(ev["task"]) == set(D.held_out_tasks(cfg))
    # asking for a held-out task in training, or a leaked row, raises
    with pytest.raises(D.LeakError): D.training_tasks(dataclasses.replace(cfg, tasks=("syllogism", "gcd")))
    with pytest.raises(D.LeakError, match="'aiw'"):
        D.check_no_leak({"task": ["gcd", "aiw"], "cluster": ["arithmetic", "logic"], "question": ["x", "y"]}, cfg)
    leaked = next(iter(held_q))
    with pytest.raises(D.LeakError, match="held-out question"):
        D.check_no_leak({"task": ["gcd"], "cluster": ["arithmetic"], "question": [leaked]}, cfg, held_questions=[leaked])


def test_eval_sets_zero_and_few_shot(cache):
    cfg = micro(cache, tasks=tuple(t for t in MICRO_TASKS if D.TASKS[t].cluster != "logic"), held_out_clusters=("logic",))
    zs, fs = D.build_eval_sets(cfg, shots=0), D.build_eval_sets(cfg, shots=2)
    assert len(zs) == len(fs) == cfg.n_test * len(D.clusters()["logic"])
    assert set(zs["kind"]) == {"zs_opt"}                              # every logic task has a closed answer set
    assert set(fs["kind"]) <= {"fs_opt", "zs_opt"}
    tok = D.build_tokenizer(cfg)
    for r in fs:   # exemplars are dropped until the prompt fits max_input_len tokens
        assert r["kind"] == "zs_opt" or len(tok(r["inputs"])["input_ids"]) <= cfg.max_input_len
    assert np.mean([k.startswith("fs") for k in fs.filter(lambda r: r["task"] == "syllogism")["kind"]]) == 1.0
    for ds in (zs, fs):
        for r in ds: assert r["options"] == D.answer_options(r) and r["answer"] in r["options"], r["task"]
    syl = [r for r in zs if r["task"] == "syllogism"]
    assert all(r["options"] == ["No", "Yes"] for r in syl)
    train_q = {t: [x["question"] for x in D.task_splits(t, cfg)["train"]] for t in D.held_out_tasks(cfg)}
    for r in fs.select(range(0, len(fs), 7)):
        assert r["inputs"].rstrip().endswith(("", ":", "?")) and r["question"] in r["inputs"]
        shots = [q for q in train_q[r["task"]] if q in r["inputs"]]
        assert len(shots) == (2 if r["kind"].startswith("fs") else 0) or (r["kind"].startswith("fs") and len(shots) == 1)
    assert len(set(zs["template"])) >= 3   # templates rotate over the test examples


def test_task_split_for_setups_1_and_3(cache):
    cfg = micro(cache)
    dd = D.build_task_split("gcd", cfg)
    assert set(dd) == {"train", "validation", "test"} and set(dd["test"]["task"]) == {"gcd"}
    assert not set(dd["test"]["question"]) & set(dd["train"]["question"])
    assert set(dd["train"]["kind"]) == {"zs_noopt"}


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_t5_ids_and_reload(cache):
    cfg = micro(cache)
    tok = D.build_tokenizer(cfg)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == cfg.vocab_size
    assert tok.convert_tokens_to_ids("<extra_id_0>") == cfg.vocab_size - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == cfg.vocab_size - 100
    s = "Find the GCD of 12 and 18.\nAnswer: 6"
    ids = tok(s)["input_ids"]
    assert ids[-1] == 1 and tok.decode(ids, skip_special_tokens=True) == s
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == list("1234")   # digits one by one
    assert tok.convert_ids_to_tokens(tok(" 250", add_special_tokens=False)["input_ids"])[-3:] == list("250")
    again = D.build_tokenizer(dataclasses.replace(cfg, tokenizer_path=str(D.tokenizer_dir(cfg))))
    assert again(s)["input_ids"] == ids
    with pytest.raises(FileNotFoundError, match="tokenizer_path"): D.load_tokenizer(cache / "nope")


def test_tokenizer_models():
    texts = D.corpus_paragraphs("pydoc")[:300]
    assert D.tokenizer_fingerprint(D.train_tokenizer(texts, 600)) == D.tokenizer_fingerprint(D.train_tokenizer(texts, 600))  # BPE: reproducible
    tok = D.train_tokenizer(texts, vocab_size=600, model="unigram")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (0, 1, 2, 600)
    odd = "│&&─┘ ⊕⊕ ↑↑ x≤y ½ 🙂"                       # byte-level: no <unk>, exact round trip, for unigram too
    for m in (tok, D.train_tokenizer(texts, 600)):
        ids = m(odd)["input_ids"]
        assert 2 not in ids and m.decode(ids, skip_special_tokens=True) == odd
    with pytest.raises(ValueError, match="vocab_size must be"): D.train_tokenizer(["a"], 399)
    with pytest.raises(ValueError, match="model must be"): D.train_tokenizer(["a"], 600, model="wordpiece")


# ---------------------------------------------------------------- span corruption and pretraining corpus
def test_compute_lengths_matches_t5():
    assert D.compute_lengths(512) == (568, 114)      # the numbers T5 / HF run_t5_mlm_flax use for inputs_length=512


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 600), st.integers(0, 2**31 - 1))
def test_noise_mask_structure(length, seed):
    m = D.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
    n_noise = min(max(int(np.round(length * 0.15)), 1), length - 1)
    assert m.sum() == n_noise and not m[0] and m[-1]                  # starts with non-noise, ends with noise
    starts = int((m[1:] & ~m[:-1]).sum())
    assert starts == max(int(np.round(n_noise / 3.0)), 1)             # number of noise spans
    ids = np.arange(10_000, 10_000 + length)
    sent = np.arange(9_999, 9_899, -1)
    inp, tgt = D.span_corrupt(ids, m, sent)
    assert D.reassemble(inp, tgt, sent) == ids.tolist()               # inputs + targets reassemble the original
    assert [t for t in inp if t in set(sent)] == sent[:starts].tolist() == [t for t in tgt if t in set(sent)]
    assert len(inp) == length - n_noise + starts and len(tgt) == n_noise + starts


def test_noise_statistics():
    rng = np.random.default_rng(0)
    masks = [D.random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(300)]
    dens = np.mean([m.mean() for m in masks])
    spans = [int((m[1:] & ~m[:-1]).sum()) for m in masks]
    assert dens == pytest.approx(0.15, abs=0.002)
    assert np.sum([m.sum() for m in masks]) / np.sum(spans) == pytest.approx(3.0, abs=0.05)


def test_pretrain_corpus(cache):
    cfg = micro(cache)
    tok = D.build_tokenizer(cfg)
    pc = D.build_pretrain_corpus(cfg)
    assert len(pc) == 40
    sent = D.sentinel_ids(tok)
    assert len(sent) == 100 and sent[0] == cfg.vocab_size - 1
    for r in pc.select(range(10)):
        assert len(r["input_ids"]) <= cfg.pretrain_inputs_len and r["input_ids"][-1] == 1 and r["labels"][-1] == 1
        orig = D.reassemble(r["input_ids"][:-1], r["labels"][:-1], sent)
        assert len(orig) == D.compute_lengths(cfg.pretrain_inputs_len)[0]
        assert r["labels"][0] == sent[0]
    assert D.dataset_digest(pc) == D.dataset_digest(D.build_pretrain_corpus(cfg))


def test_corpus_sources(tmp_path):
    (tmp_path / "a.txt").write_text("This is a short paragraph of English prose written for a test of the corpus.\n\nx = 1\n")
    assert D.corpus_paragraphs(str(tmp_path)) == ["This is a short paragraph of English prose written for a test of the corpus."]
    assert len(D.corpus_paragraphs("pkg:fastcore")) > 10
    with pytest.raises(FileNotFoundError, match="nope"): D.corpus_paragraphs("nope")


# ---------------------------------------------------------------- collation, bucketing, packing
def test_collator_and_packing():
    rows = [{"input_ids": [5, 6, 7, 1], "labels": [8, 1]}, {"input_ids": [9, 1], "labels": [10, 11, 1]},
            {"input_ids": [12, 13, 1], "labels": [14, 1]}]
    b = D.Collator(pad_to_multiple_of=4)(rows)
    assert b["input_ids"].shape == (3, 4) and b["labels"].shape == (3, 4)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert b["decoder_input_ids"][1].tolist() == [0, 10, 11, 1] and b["labels"][1].tolist() == [10, 11, 1, -100]
    from datasets import Dataset
    pk = D.pack_dataset(Dataset.from_list(rows), 7, 6)
    assert len(pk) == 2
    # segments unpack to the original rows in order
    unpacked = []
    for r in pk:
        for s in sorted(set(r["input_segment_ids"])):
            unpacked.append({"input_ids": [t for t, g in zip(r["input_ids"], r["input_segment_ids"]) if g == s],
                             "labels": [t for t, g in zip(r["labels"], r["label_segment_ids"]) if g == s]})
            assert [p for p, g in zip(r["input_positions"], r["input_segment_ids"]) if g == s] == list(range(len(unpacked[-1]["input_ids"])))
    assert unpacked == rows
    bp = D.Collator()(pk.to_list())
    assert bp["decoder_input_ids"][0].tolist() == [0, 8, 0, 10, 11]
    assert bp["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]


def test_bucket_batches():
    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    bs = D.bucket_batches(lengths, 16, seed=0)
    assert sorted(i for b in bs for i in b) == list(range(1000))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs])
    assert spread < 60                                                   # similar lengths per batch
    assert bs == D.bucket_batches(lengths, 16, seed=0) and bs != D.bucket_batches(lengths, 16, seed=1)


def test_packed_mixture(cache):
    cfg = micro(cache, pack=True, tasks=("gcd", "chain_sum"))
    m = D.build_mixture(cfg)
    assert {"input_segment_ids", "label_positions"} <= set(m["train"].column_names)
    assert max(len(x) for x in m["train"]["input_ids"]) <= cfg.max_input_len
    assert max(max(s) for s in m["train"]["input_segment_ids"]) > 1


# ---------------------------------------------------------------- local FLAN-format files
def _write(p, lines): p.write_text("\n".join(lines) + "\n"); return p


def test_local_flan_files(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    j = _write(tmp_path / "a.jsonl", [json.dumps(dict(inputs=f"Q{i}?", targets=f"A{i}", task="qa", options=["A1", "A2"] if i % 2 else None))
                                     for i in range(6)] + ["", json.dumps(dict(inputs="v", targets="w", task="qa", split="validation"))])
    pq.write_table(pa.table({"inputs": ["x", "y"], "targets": ["1", "2"], "task": ["p", "p"], "cluster": ["nli", "nli"]}), tmp_path / "b.parquet")
    ds = D.load_flan_files([j, tmp_path / "b.parquet"])
    assert len(ds) == 9 and ds[1]["options"] == ["A1", "A2"] and ds[0]["options"] == [] and ds[7]["cluster"] == "nli"
    cfg = micro(tmp_path / "c", tasks=("gcd",), local_files=(str(j), str(tmp_path / "b.parquet")))
    m = D.build_mixture(cfg)
    assert {"gcd", "qa", "p"} == set(m["train"]["task"]) and "v" in m["validation"]["inputs"]
    assert D.score_answer(m["train"].filter(lambda r: r["task"] == "qa")[0], "A0") in (0.0, 1.0)
    held_cfg = dataclasses.replace(cfg, held_out_clusters=("nli",))
    assert "p" not in set(D.build_mixture(held_cfg)["train"]["task"])
    _write(tmp_path / "t.jsonl", [json.dumps(dict(inputs="z", targets="1", task="p2", cluster="nli", split="test"))])
    ev = D.build_eval_sets(dataclasses.replace(held_cfg, local_files=held_cfg.local_files + (str(tmp_path / "t.jsonl"),)))
    assert ev["inputs"] == ["z"] and ev["kind"] == ["local"]


@pytest.mark.parametrize("lines,msg", [
    (['{"inputs": "a", "targets": "b", "task": "t"}', '{"inputs": "a", "targets": "b", "task": "t"', ''], ":2: invalid JSON"),
    (['{"inputs": "a", "targets": "b", "task": "t"}', '', '{"inputs": "a", "task": "t"}'], ":3: missing required field 'targets'"),
    (['{"inputs": "a", "targets": 3, "task": "t"}'], ":1: field 'targets' must be a string"),
    (['{"inputs": "a", "targets": "b", "task": "t", "options": "b"}'], ":1: field 'options' must be a list"),
    (['[1, 2]'], ":1: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, msg):
    p = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as e: D.load_flan_files([p])
    assert str(p) + msg in str(e.value)


def test_malformed_parquet_and_paths(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({"inputs": ["x", "y"], "task": ["p", "p"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet:row 0: missing required field 'targets'"): D.load_flan_files([tmp_path / "b.parquet"])
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"c\.parquet: unreadable parquet"): D.load_flan_files([tmp_path / "c.parquet"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"): D.load_flan_files([tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="unsupported suffix"): D.load_flan_files([_write(tmp_path / "d.csv", ["a"])])
