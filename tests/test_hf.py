"Parity of flanmoe_nb.hf with transformers' T5 and SwitchTransformers (random models from small configs)."
import json
from pathlib import Path
import pytest
import torch
from transformers import (T5Config, T5ForConditionalGeneration, SwitchTransformersConfig,
                          SwitchTransformersForConditionalGeneration)
from transformers.utils import logging as hf_logging

from flanmoe_nb.model import ModelConfig, EncoderDecoder
from flanmoe_nb.hf import from_hf, to_hf, config_from_hf, config_to_hf, load_hf, UnsupportedHFConfig

hf_logging.set_verbosity_error()
SMALL = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=20)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def switch(E=4, L=2, Ld=None, ne=1, nd=1, cap=64, **kw):
    torch.manual_seed(E * 100 + L * 10 + ne + cap)
    c = SwitchTransformersConfig(**SMALL, num_layers=L, num_decoder_layers=Ld or L, num_sparse_encoder_layers=ne,
                                 num_sparse_decoder_layers=nd, num_experts=E, expert_capacity=cap, **kw)
    return SwitchTransformersForConditionalGeneration(c).eval()


def t5(proj="relu", L=2, Ld=2, **kw):
    torch.manual_seed(L * 10 + Ld)
    return T5ForConditionalGeneration(T5Config(**SMALL, num_layers=L, num_decoder_layers=Ld, feed_forward_proj=proj,
                                               **kw)).eval()


def batch(B=2, S=9, L=7, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(2, 97, (B, S), generator=g), torch.randint(2, 97, (B, L), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    if pad: am[-1, -3:] = 0
    return x, am, y


def assert_parity(hf, capacity="hf", pad=True):
    "Same logits (1e-4), same expert per real token in every MoE layer, round trip gives the state dict back."
    ours = from_hf(hf, capacity=capacity).eval()
    x, am, y = batch(pad=pad)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=am, decoder_input_ids=y, output_router_logits=True)
        out = ours(x, am, decoder_input_ids=y)
    diff = (ref.logits - out.logits).abs().max().item()
    assert diff < 1e-4, diff
    enc = list(getattr(ref, "encoder_router_logits", None) or [])
    dec = list(getattr(ref, "decoder_router_logits", None) or [])
    assert len(enc) + len(dec) == len(out.aux)
    real = [am.bool().flatten()] * len(enc) + [torch.ones(y.numel(), dtype=torch.bool)] * len(dec)
    for r, a, m in zip(enc + dec, out.aux, real):
        assert torch.equal(r.argmax(-1).flatten()[m], a.expert_idx[:, 0][m])
    s1, s2 = hf.state_dict(), to_hf(ours).state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:   # (HF's forward casts a bf16/fp16 router's classifier in place, so compare in HF's dtype)
        assert torch.equal(s1[k], s2[k].to(s1[k].dtype)), k
    return ours, diff


@pytest.mark.parametrize("proj,L,Ld,tie", [("relu", 2, 2, True), ("relu", 3, 1, False), ("gated-gelu", 2, 3, False),
                                           ("gated-gelu", 1, 1, True), ("gelu", 2, 2, True), ("gated-silu", 2, 2, False),
                                           ("gelu_new", 1, 2, True)])
def test_t5_parity(proj, L, Ld, tie):
    ours, _ = assert_parity(t5(proj, L, Ld, tie_word_embeddings=tie))
    assert ours.cfg.moe is None and ours.cfg.scales_output == tie


@pytest.mark.parametrize("E,L,ne,nd", [(2, 2, 1, 1), (4, 4, 2, 2), (8, 3, 1, 3), (4, 4, 4, 1), (16, 6, 2, 3),
                                       (4, 12, 3, 6)])
def test_switch_parity(E, L, ne, nd):
    hf = switch(E, L, ne=ne, nd=nd)
    ours, _ = assert_parity(hf)
    hf_sparse = [i for i, b in enumerate(hf.encoder.block) if b.is_sparse]
    assert ours.cfg.encoder_sparse_layers == hf_sparse
    assert ours.cfg.moe.num_experts == E and ours.cfg.moe.capacity_scope == "sequence"


def test_switch_options_parity():
    # router bias, gelu experts, a bf16 router, dropless conversion
    assert_parity(switch(4, 2, router_bias=True, dense_act_fn="gelu"))
    assert_parity(switch(4, 2, router_dtype="bfloat16"))
    assert_parity(switch(8, 4, ne=2, nd=2), capacity="dropless")


def test_switch_untied_head_parity():
    hf = switch(4, 2, tie_word_embeddings=False)
    with pytest.raises(UnsupportedHFConfig, match="encoder.embed_tokens"):   # 5.x unties the input embeddings too
        from_hf(hf)
    with torch.no_grad():
        for emb in (hf.encoder.embed_tokens, hf.decoder.embed_tokens): emb.weight.copy_(hf.shared.weight)
    ours, _ = assert_parity(hf)
    assert not ours.cfg.tie_embeddings and not ours.cfg.scales_output


@pytest.mark.parametrize("E,cap", [(4, 2), (2, 3), (8, 1)])
def test_hf_capacity_mode_matches_token_dropping(E, cap):
    hf = switch(E, 2, cap=cap)
    x, _, y = batch(B=3, S=12, L=10, pad=False, seed=E)
    ours, free = from_hf(hf).eval(), from_hf(hf, capacity="dropless").eval()
    with torch.no_grad():
        ref = hf(input_ids=x, decoder_input_ids=y).logits
        out = ours(x, decoder_input_ids=y)
        no_drop = free(x, decoder_input_ids=y).logits
    assert all(a.dropped_fraction > 0 for a in out.aux)            # HF really drops here ...
    assert (ref - out.logits).abs().max() < 1e-4                   # ... and so do we, the same tokens
    assert (ref - no_drop).abs().max() > 1e-2
    # per-sequence capacity: no expert keeps more than `cap` tokens of one sequence
    for a in out.aux:
        assert (a.expert_counts <= cap * 3).all()


def test_router_losses_where_definitions_agree():
    # one MoE layer per stack (sparse step 2) and one sequence: HF's concatenated loss == ours
    hf = switch(4, 2, cap=32)
    x, _, y = batch(B=1, S=12, L=8, pad=False)
    with torch.no_grad():
        ref = hf(input_ids=x, decoder_input_ids=y, output_router_logits=True)
        enc, dec = from_hf(hf).eval()(x, decoder_input_ids=y).aux
    torch.testing.assert_close(enc.balance_loss, ref.encoder_aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.balance_loss, ref.decoder_aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.z_loss, ref.encoder_z_loss, atol=1e-4, rtol=1e-5)
    # HF skips its losses when the sparse step is 1; ours are always there
    hf1 = switch(4, 2, ne=2, nd=2)
    with torch.no_grad():
        r1 = hf1(input_ids=x, decoder_input_ids=y, output_router_logits=True)
        o1 = from_hf(hf1).eval()(x, decoder_input_ids=y)
    assert r1.encoder_aux_loss == 0 and all(a.balance_loss > 0 for a in o1.aux)
    cfg = from_hf(hf).cfg
    assert cfg.balance_coef == hf.config.router_aux_loss_coef and cfg.z_coef == hf.config.router_z_loss_coef


def test_save_pretrained_directories(tmp_path):
    hf = switch(4, 2)
    hf.save_pretrained(tmp_path / "switch")
    a = from_hf(tmp_path / "switch").eval()
    x, am, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(a(x, am, decoder_input_ids=y).logits,
                                   hf(input_ids=x, attention_mask=am, decoder_input_ids=y).logits, atol=1e-4, rtol=0)
    # ours -> HF directory -> HF model and back (untied T5 head, which 5.23 builds tied from a config)
    torch.manual_seed(0)
    ours = EncoderDecoder(ModelConfig(**SMALL, activation="gated-gelu_tanh", tie_embeddings=False)).eval()
    to_hf(ours).save_pretrained(tmp_path / "t5")
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    with torch.no_grad():
        ref = ours(x, am, decoder_input_ids=y).logits
        assert (back(input_ids=x, attention_mask=am, decoder_input_ids=y).logits - ref).abs().max() < 1e-4
        assert (from_hf(tmp_path / "t5").eval()(x, am, decoder_input_ids=y).logits - ref).abs().max() < 1e-4
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nothing")


def test_generation_matches_hf():
    hf = switch(4, 2, tie_word_embeddings=False)
    with torch.no_grad():
        for emb in (hf.encoder.embed_tokens, hf.decoder.embed_tokens): emb.weight.copy_(hf.shared.weight)
    torch.manual_seed(0)
    t5_untied = to_hf(EncoderDecoder(ModelConfig(**SMALL, activation="gated-gelu_tanh"))).eval()
    x, am, _ = batch(B=3, S=10)
    for m in (hf, t5_untied):
        theirs = m.generate(input_ids=x, attention_mask=am, max_new_tokens=8, do_sample=False, num_beams=1,
                            decoder_start_token_id=0)
        mine = from_hf(m).eval().generate(x, am, max_new_tokens=8)
        assert torch.equal(mine, theirs)


def test_unsupported_hf_configs_name_the_field():
    with pytest.raises(UnsupportedHFConfig, match="feed_forward_proj='gated-relu'"):
        config_from_hf(T5Config(**SMALL, feed_forward_proj="gated-relu"))
    with pytest.raises(UnsupportedHFConfig, match="dense_act_fn='tanh'"):
        config_from_hf(SwitchTransformersConfig(**SMALL, dense_act_fn="tanh"))
    with pytest.raises(UnsupportedHFConfig, match="model_type='bart'"):
        config_from_hf(type("C", (), {"model_type": "bart"})())
    with pytest.raises(UnsupportedHFConfig, match="eos_token_id"):
        config_from_hf(T5Config(**SMALL, eos_token_id=[1, 2]))
    with pytest.raises(ValueError, match="capacity='some'"):
        config_from_hf(T5Config(**SMALL), capacity="some")


def test_to_hf_refuses_what_switch_cannot_express():
    moe = lambda **kw: ModelConfig.preset("tiny", moe=dict(num_experts=4, expert_capacity=8, capacity_scope="sequence",
                                                           **kw), activation="relu")
    config_to_hf(moe())                                              # representable
    with pytest.raises(ValueError, match="moe.top_k"): config_to_hf(moe(top_k=2))
    with pytest.raises(ValueError, match="moe.renormalize"): config_to_hf(moe(renormalize=True))
    with pytest.raises(ValueError, match="activation='gated-gelu'"):
        config_to_hf(ModelConfig.preset("tiny", moe=dict(num_experts=4, expert_capacity=8)))
    with pytest.raises(ValueError, match="expert_capacity"):
        config_to_hf(ModelConfig.preset("tiny", moe=dict(num_experts=4), activation="relu"))
    with pytest.raises(ValueError, match="decoder_moe"):
        config_to_hf(ModelConfig.preset("tiny", moe=dict(num_experts=4, expert_capacity=8), activation="relu",
                                        decoder_moe=dict(num_experts=8)))
    with pytest.raises(ValueError, match="encoder_sparse_step"):   # layers [1, 5] of 6: no num_sparse gives that
        config_to_hf(ModelConfig.preset("tiny", moe=dict(num_experts=4, expert_capacity=8, capacity_scope="sequence"),
                                        activation="relu", num_encoder_layers=6, encoder_sparse_step=4))
    dropless = ModelConfig.preset("tiny", moe=dict(num_experts=4, capacity_factor=None, eval_capacity_factor=None),
                                  activation="relu")
    assert config_to_hf(dropless).expert_capacity > 10**6          # dropless -> a capacity never reached


# ---- exports: HF where it can hold the model, the project's own format where it cannot ----

@pytest.fixture(scope="module")
def tok():
    from flanmoe_nb.data import train_tokenizer
    return train_tokenizer(["all men are mortal", "if p then q", "the cat sat on the mat"] * 20, vocab_size=420)


def _grid_model(kind: str, vocab: int):
    "The model a tiny-grid setup-0 run builds (`runs.model_config` with the grid defaults)."
    from flanmoe_nb import runs
    p = {k: v.default for k, v in runs.setup_params(0).items()}
    p.update(model=kind, preset="tiny")
    torch.manual_seed(0)
    return EncoderDecoder(runs.model_config(p, vocab_size=vocab)).eval()


def _logits(m, vocab):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(2, vocab, (2, 11), generator=g), torch.randint(2, vocab, (2, 6), generator=g)
    am = torch.ones_like(x); am[1, -4:] = 0
    with torch.no_grad(): return m(x, am, decoder_input_ids=y).logits


def test_export_tiny_moe_preset_round_trips_in_own_format(tmp_path, tok):
    from flanmoe_nb.hf import export_model, load_pretrained, EXPORT_FORMAT
    from transformers import AutoTokenizer
    from safetensors.torch import load_file
    m = _grid_model("moe", len(tok))
    assert m.cfg.moe is not None and m.cfg.activation == "gated-gelu"
    run = Path(__file__).resolve().parents[1] / "papermill_runs/tiny/s0_moe"
    info = export_model(m, tmp_path / "moe", tokenizer=tok, run_dir=run)
    assert info["format"] == EXPORT_FORMAT and "gated" in info["reason"]
    files = {p.name for p in (tmp_path / "moe").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files and not any(f.endswith((".pt", ".bin")) for f in files)
    back = load_pretrained(tmp_path / "moe")
    assert torch.equal(_logits(m, len(tok)), _logits(back, len(tok)))          # identical, not merely close
    assert back.cfg == m.cfg and not back.training
    sd = load_file(str(tmp_path / "moe/model.safetensors"))
    assert sd.keys() == m.state_dict().keys()
    t2 = AutoTokenizer.from_pretrained(str(tmp_path / "moe"), local_files_only=True)
    assert t2("if p then q").input_ids == tok("if p then q").input_ids
    card = (tmp_path / "moe/README.md").read_text()
    for want in ("tiny/s0_moe", "setup0_pretrain", "8 experts", "load_pretrained", "| zero_shot |"): assert want in card, want


def test_export_tiny_dense_preset_is_plain_hf(tmp_path, tok):
    from flanmoe_nb.hf import export_model, load_pretrained
    from transformers import AutoModelForSeq2SeqLM
    m = _grid_model("dense", len(tok))
    assert export_model(m, tmp_path / "d", tokenizer=tok)["format"] == "hf"
    hf = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "d"), local_files_only=True).eval()   # transformers alone
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(2, len(tok), (2, 11), generator=g), torch.randint(2, len(tok), (2, 6), generator=g)
    am = torch.ones_like(x); am[1, -4:] = 0                         # the mask `_logits` uses
    with torch.no_grad(): theirs = hf(input_ids=x, attention_mask=am, decoder_input_ids=y).logits
    assert (theirs - _logits(m, len(tok))).abs().max() < 1e-4
    assert torch.equal(_logits(load_pretrained(tmp_path / "d"), len(tok)), _logits(m, len(tok)))
    assert "AutoModelForSeq2SeqLM" in (tmp_path / "d/README.md").read_text()


def test_export_switch_expressible_moe_goes_to_hf(tmp_path, tok):
    from flanmoe_nb.hf import export_model, load_pretrained
    from flanmoe_nb.moe import MoEConfig
    from transformers import SwitchTransformersForConditionalGeneration
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=len(tok), activation="relu", tie_embeddings=True, scale_decoder_output=True,
                             moe=dict(num_experts=4, top_k=1, activation="relu", capacity_factor=None, eval_capacity_factor=None))
    m = EncoderDecoder(cfg).eval()
    info = export_model(m, tmp_path / "s", tokenizer=tok)
    assert info["format"] == "hf", info
    assert isinstance(load_hf(tmp_path / "s"), SwitchTransformersForConditionalGeneration)
    assert (_logits(load_pretrained(tmp_path / "s"), len(tok)) - _logits(m, len(tok))).abs().max() < 1e-4


def test_export_bad_input(tmp_path, tok):
    from flanmoe_nb.hf import export_model, load_pretrained
    m = _grid_model("moe", len(tok))
    with pytest.raises(ValueError, match="format='onnx'"): export_model(m, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="gated FFNs"): export_model(m, tmp_path / "x", format="hf")
    with pytest.raises(TypeError, match="EncoderDecoder"): export_model(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no config.json"): load_pretrained(tmp_path / "nothing")
    export_model(m, tmp_path / "v", format="flanmoe_nb")
    cfg = json.loads((tmp_path / "v/config.json").read_text()); cfg["format_version"] = 9
    (tmp_path / "v/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"): load_pretrained(tmp_path / "v")


def test_export_run_reads_checkpoint_tokenizer_and_card_facts(tmp_path, tok):
    "A run folder as the grid leaves it (DONE, params.yaml, eval.json, checkpoints/, tokenizer/) exports with identical logits."
    import shutil
    from flanmoe_nb.hf import export_run, load_pretrained
    from flanmoe_nb.checkpoint import save_checkpoint
    src = Path(__file__).resolve().parents[1] / "papermill_runs/tiny/s0_moe"
    run = tmp_path / "tiny" / "s0_moe"; run.mkdir(parents=True)
    for f in ("DONE", "params.yaml", "eval.json", "train.json"): shutil.copy(src / f, run / f)
    m = _grid_model("moe", len(tok))
    save_checkpoint(run / "checkpoints", 7, m)
    tok.save_pretrained(str(run / "tokenizer"))
    info = export_run(run)
    assert info["format"] == "flanmoe_nb" and Path(info["path"]) == run / "export"
    assert torch.equal(_logits(load_pretrained(run / "export"), len(tok)), _logits(m, len(tok)))
    assert "tiny/s0_moe" in (run / "export/README.md").read_text() and (run / "export/tokenizer.json").exists()
    (run / "DONE").unlink()
    with pytest.raises(FileNotFoundError, match="no DONE"): export_run(run)
