"Analysis: routing tables on a tiny random MoE, mutual information and its control, paired statistics, verdicts."
import math

import numpy as np
import pandas as pd
import pytest
import torch

from flanmoe_nb import analysis as an
from flanmoe_nb.model import EncoderDecoder, ModelConfig


def table_from(counts, held=(), layer=0, side="encoder", block=0):
    "A one-layer routing table from a [clusters, experts] count matrix."
    return pd.DataFrame([(layer, side, block, f"c{i}", f"c{i}" in held, e, int(v))
                         for i, row in enumerate(np.asarray(counts)) for e, v in enumerate(row)], columns=an.ROUTING_COLUMNS)


# ---------------------------------------------------------------- mutual information
@pytest.mark.parametrize("C", [2, 4, 8])
def test_mi_perfect_diagonal_is_log2_C(C):
    r = an.mutual_information(table_from(np.eye(C, dtype=int) * 100), n_shuffle=50)[0]
    assert r["mi"] == pytest.approx(math.log2(C), abs=1e-9)
    assert r["nmi_cluster"] == pytest.approx(1.0) and r["nmi_min"] == pytest.approx(1.0)
    assert r["h_cluster"] == pytest.approx(math.log2(C))


@pytest.mark.parametrize("rows,cols", [([1, 2, 3], [5, 1, 1, 9]), ([10, 10], [3, 7]), ([4], [1, 2, 3])])
def test_mi_independent_table_is_zero(rows, cols):
    r = an.mutual_information(table_from(np.outer(rows, cols)), n_shuffle=0)[0]
    assert r["mi"] == pytest.approx(0.0, abs=1e-12)
    assert r["n_shuffle"] == 0 and math.isnan(r["control_mean"])


def test_mi_matches_hand_computation():
    n = np.array([[30, 10], [5, 55]])
    p = n / n.sum(); pc, pe = p.sum(1), p.sum(0)
    want = sum(p[i, j] * math.log2(p[i, j] / (pc[i] * pe[j])) for i in range(2) for j in range(2))
    r = an.mutual_information(table_from(n), n_shuffle=0)[0]
    assert r["mi"] == pytest.approx(want, abs=1e-12)
    # Miller-Madow: + ((m_c - 1) + (m_e - 1) - (m_ce - 1)) / (2 N ln 2) = (1 + 1 - 3) / (2 * 100 * ln 2)
    assert r["mi_mm"] == pytest.approx(want - 1 / (200 * math.log(2)), abs=1e-12)


def test_shuffled_control_near_zero_on_specialised_table_and_keeps_margins():
    n = np.eye(4, dtype=int) * 200 + 5
    r = an.mutual_information(table_from(n), n_shuffle=300, seed=1)[0]
    assert r["mi"] > 1.0
    assert r["control_mean"] < 0.01 and r["control_p95"] < 0.02 and r["p_value"] < 0.01
    # the control is the plug-in bias at these margins: close to the Miller-Madow term (R-1)(E-1)/(2N ln2)
    assert r["control_mean"] == pytest.approx(9 / (2 * n.sum() * math.log(2)), rel=0.3)
    sh = an.shuffled_tables(n, 20, seed=0)
    assert (sh.sum(2) == n.sum(1)).all() and (sh.sum(1) == n.sum(0)).all()
    # the control is not the observed table: an independent table's control sits around its (zero) MI
    ri = an.mutual_information(table_from(np.outer([50, 50], [50, 50])), n_shuffle=300)[0]
    assert ri["p_value"] > 0.05


def test_mi_per_layer_and_bad_input():
    t = pd.concat([table_from(np.eye(2, dtype=int) * 9, layer=0), table_from([[3, 3], [3, 3]], layer=1, side="decoder", block=1)])
    r = an.mutual_information(t, n_shuffle=10)
    assert sorted(r) == [0, 1] and r[1]["side"] == "decoder" and r[1]["label"] == "dec.1"
    assert r[0]["mi"] == pytest.approx(1.0) and r[1]["mi"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="table must be a routing table"): an.mutual_information([[1, 2]])
    with pytest.raises(ValueError, match="n_shuffle"): an.mutual_information(t, n_shuffle=-2)


# ---------------------------------------------------------------- routing table on a tiny model
def tiny_rows():
    g = torch.Generator().manual_seed(0)
    def rows(lo, hi, n):
        return [dict(input_ids=torch.randint(lo, hi, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist(),
                     labels=torch.randint(lo, hi, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist())
                for _ in range(n)]
    return {"x": rows(2, 40, 7), "y": rows(40, 80, 5)}


@pytest.fixture(scope="module")
def moe_model():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", moe=dict(num_experts=4, top_k=1), decoder_moe=dict(top_k=2), vocab_size=80)
    return EncoderDecoder(cfg)


def real_tokens(rows):
    return ({c: sum(len(r["input_ids"]) for r in rs) for c, rs in rows.items()},
            {c: sum(len(r["labels"]) for r in rs) for c, rs in rows.items()})


def test_routing_table_counts_real_tokens_only(moe_model):
    rows = tiny_rows()
    src, tgt = real_tokens(rows)
    n_layers = len(an.moe_layers(moe_model))
    assert n_layers >= 2
    t = an.routing_table(moe_model, rows, held_out=["y"], batch_size=3)   # batches with padding on both sides
    assert list(t.columns) == an.ROUTING_COLUMNS
    assert t.layer.nunique() == n_layers and len(t) == n_layers * 2 * 4   # every (layer, cluster, expert), zeros kept
    for (layer, side, cl), n in t.groupby(["layer", "side", "cluster"]).tokens.sum().items():
        assert n == (src if side == "encoder" else tgt)[cl], (layer, side, cl)
    assert t[t.cluster == "y"].held_out.all() and not t[t.cluster == "x"].held_out.any()
    # all top-k choices: top_k per real token (encoder top-1, decoder top-2)
    ta = an.routing_table(moe_model, rows, choices="all", batch_size=4)
    for (layer, side, cl), n in ta.groupby(["layer", "side", "cluster"]).tokens.sum().items():
        assert n == (src[cl] if side == "encoder" else 2 * tgt[cl]), (layer, side, cl)
    # dropless + attention inside a row: batching does not change the counts
    pd.testing.assert_frame_equal(an.routing_table(moe_model, rows, held_out=["y"], batch_size=1), t)
    first2 = an.routing_table(moe_model, {c: rs[:2] for c, rs in rows.items()})
    pd.testing.assert_frame_equal(an.routing_table(moe_model, rows, max_rows=2), first2)
    assert moe_model.training   # mode restored
    assert all(m.router.cfg.eval_capacity_factor == 2.0 for *_, m in an.moe_layers(moe_model))   # configs restored


def test_routing_table_top1_is_router_argmax(moe_model):
    "The encoder's first MoE layer, recomputed by hand from the router on the recorded input."
    rows = {"x": [dict(input_ids=[5, 6, 7, 8], labels=[9, 1])]}
    layer0 = an.moe_layers(moe_model)[0][3]
    seen = []
    h = layer0.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try: t = an.routing_table(moe_model, rows)
    finally: h.remove()
    want = torch.bincount((seen[0] @ layer0.router.weight.T).argmax(-1), minlength=4).tolist()
    assert t[t.layer == 0].sort_values("expert").tokens.tolist() == want


def test_routing_table_dense_model_is_empty():
    dense = EncoderDecoder(ModelConfig.preset("tiny", vocab_size=80))
    t = an.routing_table(dense, tiny_rows())
    assert t.empty and list(t.columns) == an.ROUTING_COLUMNS
    assert an.mutual_information(t) == {}
    assert an.plot_specialisation(t) is None
    assert an.specialisation_summary({"pre": t}).empty


def test_routing_table_bad_input(moe_model):
    with pytest.raises(ValueError, match="choices"): an.routing_table(moe_model, tiny_rows(), choices="top3")
    with pytest.raises(ValueError, match="batches_by_cluster"): an.routing_table(moe_model, {})
    with pytest.raises(ValueError, match=r"batches_by_cluster\['q'\]\[0\]"): an.routing_table(moe_model, {"q": [{"input_ids": [1]}]})
    with pytest.raises(ValueError, match="batch_size"): an.routing_table(moe_model, tiny_rows(), batch_size=0)
    with pytest.raises(ValueError, match="held_out"): an.routing_table(moe_model, tiny_rows(), held_out="y")


def test_save_load_and_summary(tmp_path, moe_model):
    t = an.routing_table(moe_model, tiny_rows(), held_out=["y"])
    an.save_routing(t, tmp_path / "run")
    back = an.load_routing(tmp_path / "run")
    pd.testing.assert_frame_equal(back, t, check_dtype=False)
    assert back.attrs["choices"] == "top1"
    with pytest.raises(FileNotFoundError, match="no routing table"): an.load_routing(tmp_path / "missing")
    s = an.specialisation_summary({"pretrain": t, "instruct": back}, n_shuffle=20)
    assert list(s.stage.cat.categories) == ["pretrain", "instruct"] and len(s) == 2 * t.layer.nunique()
    assert (s[s.stage == "pretrain"].mi.to_numpy() == s[s.stage == "instruct"].mi.to_numpy()).all()
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    assert an.plot_specialisation_stages(s) is not None
    fig = an.plot_specialisation(t, n_shuffle=10)
    ylabels = [lbl.get_text() for lbl in fig.axes[0].get_yticklabels()]
    assert ylabels == ["x", "y *"]
    plt.close("all")


# ---------------------------------------------------------------- statistics
def test_t_quantiles_match_tables():
    for df, want in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423)):
        assert an.t_ppf(0.975, df) == pytest.approx(want, abs=1e-3)


def test_mean_ci():
    c = an.mean_ci([0.5, 0.6, 0.7])
    assert c["mean"] == pytest.approx(0.6) and c["half_width"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), abs=1e-4)
    assert c["low"] < 0.6 < c["high"]
    one = an.mean_ci([0.4])
    assert one["low"] == -math.inf and one["high"] == math.inf and "n=1" in one["note"]
    with pytest.raises(ValueError, match="values must be finite"): an.mean_ci([0.1, float("inf")])
    with pytest.raises(ValueError, match="level"): an.mean_ci([0.1, 0.2], level=1.5)


def test_mean_ci_coverage():
    rng = np.random.default_rng(0)
    hits = sum(lo <= 1.0 <= hi for lo, hi in ((c["low"], c["high"]) for c in (an.mean_ci(rng.normal(1.0, 2.0, 4)) for _ in range(400))))
    assert 0.91 <= hits / 400 <= 0.99


def test_paired_bootstrap_covers_truth_and_detects_strong_effect():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(40):
        a = rng.normal(0.0, 1.0, 200)
        b = a + 0.1 + rng.normal(0.0, 0.5, 200)         # true mean difference 0.1
        r = an.paired_bootstrap(a, b, n_boot=1000, seed=rep)
        covered += r["low"] <= 0.1 <= r["high"]
    assert covered >= 34        # ~95% nominal
    a = (rng.random(300) < 0.4).astype(float)
    b = np.maximum(a, (rng.random(300) < 0.3).astype(float))   # b right wherever a is, and more
    r = an.paired_bootstrap(a, b, n_boot=2000)
    assert r["low"] > 0 and r["p_value"] < 0.001 and r["diff"] == pytest.approx(b.mean() - a.mean())
    assert an.verdict(r["low"], r["high"], +1) == "reproduced"
    null = an.paired_bootstrap(a, rng.permutation(a), n_boot=2000)
    assert null["low"] < 0 < null["high"] and null["p_value"] > 0.05


def test_paired_bootstrap_seeds():
    rng = np.random.default_rng(2)
    a = rng.random((3, 100)); b = a + 0.2
    r_items = an.paired_bootstrap(a, b, n_boot=500)
    r_both = an.paired_bootstrap(a, b + rng.normal(0, 0.3, (3, 1)), n_boot=500, resample="items_and_seeds")
    assert r_items["diff"] == pytest.approx(0.2) and r_items["high"] - r_items["low"] < 1e-9   # constant per-item difference
    assert r_both["high"] - r_both["low"] > 0.05 and r_both["n_seeds_b"] == 3   # seed variation widens it
    with pytest.raises(ValueError, match="same items"): an.paired_bootstrap(a, b[:, :50])
    with pytest.raises(ValueError, match="n_boot"): an.paired_bootstrap(a, b, n_boot=5)


def test_exact_sign_test_and_mcnemar():
    a = [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    b = [1, 1, 1, 1, 1, 1, 1, 0, 1, 0]
    r = an.mcnemar(a, b)   # discordant: 5 b-only, 1 a-only -> 2 * P(X <= 1 | n=6) = 2 * 7/64
    assert (r["b_only"], r["a_only"], r["n_ties"]) == (5, 1, 4)
    assert r["p_value"] == pytest.approx(14 / 64)
    assert an.exact_sign_test([0.2, 0.5], [0.2, 0.5])["p_value"] == 1.0
    with pytest.raises(ValueError, match="binary"): an.mcnemar([0.5, 1.0], [1.0, 1.0])


@pytest.mark.parametrize("lo,hi,sign,want", [
    (0.01, 0.3, 1, "reproduced"), (-0.3, -0.01, -1, "reproduced"), (-0.3, -0.01, "+", "opposite"),
    (0.02, 0.1, "-", "opposite"), (-0.1, 0.1, 1, "inconclusive at this power"), (0.0, 0.2, 1, "inconclusive at this power"),
    (-math.inf, math.inf, -1, "inconclusive at this power")])
def test_verdict(lo, hi, sign, want):
    assert an.verdict(lo, hi, sign) == want


def test_verdict_bad_input():
    with pytest.raises(ValueError, match="expected_sign"): an.verdict(0.1, 0.2, 2)
    with pytest.raises(ValueError, match="ci_low must be <= ci_high"): an.verdict(0.3, 0.2, 1)
    with pytest.raises(ValueError, match="ci_high"): an.verdict(0.1, float("nan"), 1)


def test_above_baseline():
    r = an.above_baseline(0.60, 400, 0.5)
    se = math.sqrt(0.6 * 0.4 / 400)
    assert r["se"] == pytest.approx(se) and r["margin_se"] == pytest.approx(0.1 / se) and r["passes"]
    assert not an.above_baseline(0.52, 400, 0.5)["passes"]                       # 0.8 SE above
    assert an.above_baseline(0.549, 400, 0.5, se_from="baseline")["passes"] is False   # 0.5 + 2*0.025 = 0.55
    assert an.above_baseline(0.55, 400, 0.5, se_from="baseline")["passes"] is True
    with pytest.raises(ValueError, match="acc"): an.above_baseline(1.2, 10, 0.5)
    with pytest.raises(ValueError, match="n must"): an.above_baseline(0.6, 0, 0.5)
