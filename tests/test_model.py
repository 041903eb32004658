"Tests for flanmoe_nb.model: config rules, T5 pieces vs transformers, loss, generation, FLOPs, upcycling."
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from flanmoe_nb.moe import MoEConfig
from flanmoe_nb.model import (ModelConfig, EncoderDecoder, RMSNorm, relative_position_bucket, sparse_layers,
                              count_flops, flops_per_token, count_params, matched_dense, upcycle, shift_right)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny matrices: one intra-op thread avoids oversubscription on a busy 2-core machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(moe=None, **kw):
    kw = {"dropout": 0.0, "vocab_size": 64, **kw}
    return ModelConfig.preset("tiny", moe=moe, **kw)


DROPLESS = dict(capacity_factor=None, eval_capacity_factor=None)


# ---------------------------------------------------------------- sparse layer placement
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 24), step=st.integers(0, 8))
def test_sparse_layers_match_switch_formula(n, step):
    # transformers' SwitchTransformersStack: is_sparse = (i % step == 1 or step == 1) if step > 0 else False
    hf = [i for i in range(n) if ((i % step == 1 or step == 1) if step > 0 else False)]
    assert sparse_layers(n, step) == hf


def test_sparse_layers_examples():
    assert sparse_layers(12, 2) == [1, 3, 5, 7, 9, 11]
    assert sparse_layers(12, 4) == [1, 5, 9]
    assert sparse_layers(2, 1) == [0, 1]


def test_encoder_decoder_steps_place_moe_layers():
    cfg = tiny(dict(num_experts=4), num_encoder_layers=6, num_decoder_layers=5, encoder_sparse_step=3,
               decoder_sparse_step=1)
    m = EncoderDecoder(cfg)
    assert [i for i, b in enumerate(m.encoder.blocks) if b.is_moe] == [1, 4]
    assert [i for i, b in enumerate(m.decoder.blocks) if b.is_moe] == [0, 1, 2, 3, 4]
    assert type(m.encoder.blocks[0].ffn).__name__ == "DenseFFN"


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw,needle", [
    (dict(sparse_step=-1), "sparse_step=-1"),
    (dict(sparse_step=1.5), "sparse_step=1.5"),
    (dict(encoder_sparse_step="2"), "encoder_sparse_step='2'"),
    (dict(decoder_sparse_step=-3), "decoder_sparse_step=-3"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(d_model=0), "d_model=0"),
    (dict(dropout=1.0), "dropout=1.0"),
])
def test_bad_config_errors_name_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**kw)


def test_expert_choice_refused_in_decoder():
    with pytest.raises(ValueError, match="encoder-only"):
        tiny(dict(num_experts=4, router="expert_choice"))
    # ... but fine in the encoder with token-choice top-2 in the decoder (FLAN-EC), or a decoder without MoE
    cfg = tiny(dict(num_experts=4, router="expert_choice", capacity_factor=2.0, eval_capacity_factor=2.0),
               decoder_moe=dict(router="token_choice", top_k=2))
    assert cfg.moe.router == "expert_choice" and cfg.decoder_moe_config.top_k == 2
    tiny(dict(num_experts=4, router="expert_choice"), decoder_sparse_step=0)
    m = EncoderDecoder(cfg).eval()
    x, y = torch.randint(2, 64, (2, 8)), torch.randint(2, 64, (2, 5))
    out = m(x, labels=y)
    assert out.logits.shape == (2, 5, 64) and len(out.aux) == 2 and torch.isfinite(out.loss)


def test_moe_config_mismatch_errors():
    with pytest.raises(ValueError, match="moe.d_model"):
        ModelConfig(moe=MoEConfig(32, 128, 4))
    with pytest.raises(ValueError, match="decoder_moe"):
        ModelConfig(decoder_moe=MoEConfig(64, 128, 4))
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")


def test_presets():
    for name in ("tiny", "small", "base"):
        cfg = ModelConfig.preset(name, moe=dict(num_experts=8))
        assert cfg.moe.d_model == cfg.d_model and cfg.moe.d_ff == cfg.d_ff
    assert ModelConfig.preset("base").d_model == 768


# ---------------------------------------------------------------- T5 pieces vs transformers
@settings(max_examples=30, deadline=None)
@given(buckets=st.sampled_from([4, 8, 16, 32]), max_distance=st.sampled_from([8, 20, 128]),
       bidirectional=st.booleans(), seed=st.integers(0, 1000))
def test_relative_position_bucket_matches_hf(buckets, max_distance, bidirectional, seed):
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.randint(-300, 300, (64,), generator=torch.Generator().manual_seed(seed))
    ref = T5Attention._relative_position_bucket(rel, bidirectional, buckets, max_distance)
    assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, max_distance), ref)


def test_rms_norm_matches_t5_layer_norm():
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    x = torch.randn(3, 5, 16) * 3
    ours, ref = RMSNorm(16, 1e-6), T5LayerNorm(16, 1e-6)
    with torch.no_grad(): ours.weight.normal_(); ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))


# ---------------------------------------------------------------- loss
def test_loss_is_ce_plus_weighted_router_losses():
    torch.manual_seed(0)
    cfg = tiny(dict(num_experts=4, top_k=2, **DROPLESS), balance_coef=0.3, z_coef=0.02)
    m = EncoderDecoder(cfg)
    x, y = torch.randint(2, 64, (3, 7)), torch.randint(2, 64, (3, 5))
    y[0, -2:] = -100
    out = m(x, labels=y)
    ce = F.cross_entropy(out.logits.reshape(-1, 64), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ce)
    bal = sum(a.balance_loss for a in out.aux); z = sum(a.z_loss for a in out.aux)
    torch.testing.assert_close(out.loss, ce + 0.3 * bal + 0.02 * z)
    assert len(out.aux) == 2 and out.z_loss > 0
    out.loss.backward()
    assert m.encoder.blocks[1].ffn.router.weight.grad.abs().sum() > 0


def test_zero_coefficients_and_shift_right():
    torch.manual_seed(0)
    m = EncoderDecoder(tiny(dict(num_experts=4), balance_coef=0.0, z_coef=0.0)).eval()
    x, y = torch.randint(2, 64, (2, 6)), torch.randint(2, 64, (2, 4))
    out = m(x, labels=y)
    torch.testing.assert_close(out.loss, out.ce_loss)
    lab = torch.tensor([[5, 6, -100, -100]])
    assert shift_right(lab, 0, 0).tolist() == [[0, 5, 6, 0]]
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        m(x)


# ---------------------------------------------------------------- masking, causality, dropout
def test_encoder_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    m = EncoderDecoder(tiny(dict(num_experts=4, **DROPLESS))).eval()
    x, y = torch.randint(2, 64, (1, 6)), torch.randint(2, 64, (1, 4))
    xp = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).bool()
    with torch.no_grad():
        torch.testing.assert_close(m(xp, mask, decoder_input_ids=y).logits, m(x, decoder_input_ids=y).logits,
                                   atol=1e-5, rtol=1e-5)


def test_decoder_is_causal_with_moe():
    torch.manual_seed(0)
    m = EncoderDecoder(tiny(dict(num_experts=4, top_k=2, **DROPLESS))).eval()
    x, y = torch.randint(2, 64, (2, 6)), torch.randint(2, 64, (2, 6))
    y2 = y.clone(); y2[:, 4:] = torch.randint(2, 64, (2, 2))
    with torch.no_grad():
        a, b = m(x, decoder_input_ids=y).logits, m(x, decoder_input_ids=y2).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = EncoderDecoder(ModelConfig.preset("tiny", vocab_size=64, dropout=0.3))
    x, y = torch.randint(2, 64, (2, 6)), torch.randint(2, 64, (2, 4))
    assert not torch.equal(m(x, decoder_input_ids=y).logits, m(x, decoder_input_ids=y).logits)
    m.eval()
    assert torch.equal(m(x, decoder_input_ids=y).logits, m(x, decoder_input_ids=y).logits)


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("moe", [None, dict(num_experts=4, top_k=2, **DROPLESS), dict(num_experts=8, top_k=1, **DROPLESS)])
def test_generate_cache_equals_no_cache(moe):
    # dropless: with a capacity, incremental decoding routes fewer tokens at once and may drop differently
    torch.manual_seed(1)
    m = EncoderDecoder(tiny(moe, tie_embeddings=moe is None)).eval()
    x = torch.randint(2, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool); mask[2, 6:] = False
    a = m.generate(x, mask, max_new_tokens=10)
    b = m.generate(x, mask, max_new_tokens=10, use_cache=False)
    assert torch.equal(a, b) and (a[:, 0] == 0).all()
    alone = m.generate(x[2:, :6], max_new_tokens=10)     # the padded row generates what it generates alone
    n = min(alone.shape[1], a.shape[1])
    assert torch.equal(alone[0, :n], a[2, :n])


def test_generate_pads_after_eos_and_stops():
    m = EncoderDecoder(tiny()).eval()
    x = torch.randint(2, 64, (2, 5))
    def fake_decode(ids, enc, attention_mask=None, decoder_attention_mask=None, cache=None, offset=0):
        step = offset if cache is not None else ids.shape[1] - 1
        logits = torch.zeros(2, ids.shape[1], 64); logits[..., 5] = 1
        if step >= 2: logits[0, :, 1] = 2             # row 0 emits EOS at its third step
        if step >= 4: logits[1, :, 1] = 2             # row 1 at its fifth
        return logits, []
    m.decode = fake_decode
    out = m.generate(x, max_new_tokens=10)
    assert out.tolist() == [[0, 5, 5, 1, 0, 0], [0, 5, 5, 5, 5, 1]]


# ---------------------------------------------------------------- FLOPs and parameters
def test_dense_flops_match_torch_flop_counter():
    cfg = tiny()
    m = EncoderDecoder(cfg).eval()
    S, L = 24, 10
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.randint(2, 64, (1, S)), decoder_input_ids=torch.randint(2, 64, (1, L)))
    r = count_flops(cfg, S, L)
    # FlopCounterMode counts the projections/FFN/head matmuls (aten.mm); attention scores by hand:
    inner = cfg.num_heads * cfg.d_kv
    scores = 2 * 2 * inner * (cfg.num_encoder_layers * S * S + cfg.num_decoder_layers * L * (L + S))
    assert r["attention_scores"] == scores
    assert fc.get_total_flops() == r["total"] - r["attention_scores"]


def test_moe_flops_by_hand():
    cfg = tiny(dict(num_experts=8, top_k=2), activation="relu", num_encoder_layers=2, num_decoder_layers=2)
    r, d = count_flops(cfg, 16, 8), count_flops(replace(cfg, moe=None), 16, 8)
    # one MoE layer per stack: router 2*d*E per token, experts top_k * FFN
    assert r["router"] == (16 + 8) * 2 * 64 * 8
    assert r["ffn"] - d["ffn"] == (16 + 8) * (2 - 1) * 2 * 2 * 64 * 128


def test_matched_flops_within_2_percent():
    top1 = ModelConfig.preset("small", moe=dict(num_experts=32, top_k=1))
    assert abs(flops_per_token(top1) / flops_per_token(replace(top1, moe=None)) - 1) < 0.02
    for moe in (dict(num_experts=32, top_k=2), dict(num_experts=64, top_k=2),
                dict(num_experts=16, router="expert_choice", capacity_factor=2.0, eval_capacity_factor=2.0)):
        dec = dict(router="token_choice", top_k=2) if moe.get("router") == "expert_choice" else None
        cfg = ModelConfig.preset("base", moe=moe, decoder_moe=dec)
        dense = matched_dense(cfg)
        assert dense.moe is None and dense.d_ff > cfg.d_ff
        assert abs(flops_per_token(dense) / flops_per_token(cfg) - 1) < 0.02


def test_count_params():
    m = EncoderDecoder(tiny(dict(num_experts=4, top_k=1)))
    p = count_params(m)
    assert p["total"] == sum(t.numel() for t in m.parameters())
    per_layer = sum(t.numel() for t in m.encoder.blocks[1].ffn.experts.parameters())
    assert p["experts"] == 2 * per_layer
    assert p["active"] == p["total"] - 2 * per_layer * 3 / 4


# ---------------------------------------------------------------- upcycling
def test_upcycling():
    torch.manual_seed(0)
    dense = EncoderDecoder(tiny()).eval()
    x, y = torch.randint(2, 64, (2, 8)), torch.randint(2, 64, (2, 5))
    with torch.no_grad(): ref = dense(x, decoder_input_ids=y).logits
    same = upcycle(dense, MoEConfig(64, 128, 4, activation=dense.cfg.activation, renormalize=True, **DROPLESS)).eval()
    raw = upcycle(dense, MoEConfig(64, 128, 4, activation=dense.cfg.activation, **DROPLESS)).eval()
    blk = same.encoder.blocks[1]
    assert blk.is_moe and torch.equal(blk.ffn.experts.w_in[3], dense.encoder.blocks[1].ffn.w_in)
    assert dense.encoder.blocks[1].is_moe is False           # the parent is untouched
    with torch.no_grad():
        torch.testing.assert_close(same(x, decoder_input_ids=y).logits, ref, atol=1e-4, rtol=1e-4)
        assert (raw(x, decoder_input_ids=y).logits - ref).abs().max() > 1e-2
    with pytest.raises(ValueError, match="activation"):
        upcycle(dense, MoEConfig(64, 128, 4, activation="relu"))


# ---------------------------------------------------------------- training
def test_tiny_moe_overfits_fixed_batch():
    torch.manual_seed(0)
    m = EncoderDecoder(tiny(dict(num_experts=4, top_k=1)))
    x, y = torch.randint(2, 64, (4, 10)), torch.randint(2, 64, (4, 6))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        out = m(x, labels=y)
        first = first if first is not None else out.ce_loss.item()
        opt.zero_grad(); out.loss.backward(); opt.step()
    assert first > 3.0 and out.ce_loss.item() < 0.1


def test_relative_bias_onehot_cache_equals_lookup_and_stays_bounded():
    from flanmoe_nb.model import RelativePositionBias
    rb = RelativePositionBias(32, 128, 4, bidirectional=True)
    with torch.no_grad():
        ref = rb.embedding(rb.buckets(20, 30, 0)).permute(2, 0, 1).unsqueeze(0)
    got = rb(20, 30)                                          # grad enabled: the cached one-hot GEMM
    assert torch.equal(got, ref) and len(rb._onehot) == 1
    big = rb(300, 300)                                        # > 65536 pairs: the lookup, nothing cached
    assert big.shape == (1, 4, 300, 300) and len(rb._onehot) == 1
    g1, = torch.autograd.grad(got.square().sum(), rb.embedding.weight)
    g2, = torch.autograd.grad(rb.embedding(rb.buckets(20, 30, 0)).permute(2, 0, 1).square().sum(), rb.embedding.weight)
    torch.testing.assert_close(g1, g2)
