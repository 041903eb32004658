"Declared field ranges of RouterConfig, MoEConfig and ModelConfig (issue #16): bad values fail at construction."
import dataclasses, math

import pytest
import torch

from flanmoe_nb.checks import ConfigError
from flanmoe_nb.routing import ROUTER_FIELDS, RouterConfig, validate_router_config
from flanmoe_nb.moe import MOE_ARGS, MOE_FIELDS, MOE_PRESETS, MoEConfig, MoELayer, moe_reference
from flanmoe_nb.model import MODEL_FIELDS, _PRESETS, EncoderDecoder, ModelConfig

torch.set_num_threads(1)

BASE = {  # class -> (schema, kwargs of a valid instance)
    RouterConfig: (ROUTER_FIELDS, dict(num_experts=4)),
    MoEConfig: (MOE_FIELDS, dict(d_model=16, d_ff=32, num_experts=4)),
    ModelConfig: (MODEL_FIELDS, dict()),
}


def build(cls, **kw):
    return cls(**{**BASE[cls][1], **kw})


def raises(cls, name, value, **kw):
    "Building `cls` with `name=value` raises a ConfigError naming the field and the value."
    with pytest.raises(ConfigError) as e:
        build(cls, **{name: value}, **kw)
    msg = str(e.value)
    assert f"{name}={value!r}" in msg, msg
    return msg


# ---- the values named in the issue

def test_model_d_model_float():
    assert "int" in raises(ModelConfig, "d_model", 64.5)


@pytest.mark.parametrize("name", ["pad_token_id", "eos_token_id", "decoder_start_token_id"])
def test_model_token_id_vocab(name):
    msg = raises(ModelConfig, name, 512, vocab_size=512)
    assert "vocab_size=512" in msg
    build(ModelConfig, **{name: 511}, vocab_size=512)


def test_model_z_coef_nan():
    raises(ModelConfig, "z_coef", math.nan)
    raises(ModelConfig, "balance_coef", math.inf)
    raises(ModelConfig, "balance_coef", -0.01)


@pytest.mark.parametrize("eps", [-1, -1e-6, 0, 0.0, math.inf, math.nan])
def test_model_layer_norm_eps(eps):
    raises(ModelConfig, "layer_norm_eps", eps)


@pytest.mark.parametrize("cls", [RouterConfig, MoEConfig])
def test_capacity_factor_inf(cls):
    for name in ("capacity_factor", "eval_capacity_factor"):
        raises(cls, name, math.inf)
        raises(cls, name, math.nan)
        raises(cls, name, 0)
    assert build(cls, capacity_factor=None).capacity_factor is None      # dropless
    assert build(cls, capacity_factor=2).capacity_factor == 2.0 and isinstance(build(cls, capacity_factor=2).capacity_factor, float)


@pytest.mark.parametrize("cls", [RouterConfig, MoEConfig])
def test_top_k_bool_and_batch_prioritized_str(cls):
    raises(cls, "top_k", True)
    raises(cls, "num_experts", True)
    raises(cls, "batch_prioritized", "yes")
    raises(cls, "batch_prioritized", 1)
    msg = raises(cls, "top_k", 5)
    assert "num_experts=4" in msg


def test_expert_choice_needs_capacity():
    raises(MoEConfig, "capacity_factor", None, router="expert_choice")
    raises(MoEConfig, "eval_capacity_factor", None, router="expert_choice")
    c = build(MoEConfig, router="expert_choice", capacity_factor=None, eval_capacity_factor=None, expert_capacity=3)
    assert c.expert_capacity == 3


@pytest.mark.parametrize("mask", [torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.int32)])
def test_moe_mask_not_bool(mask):
    layer = MoELayer(MoEConfig(16, 32, 4))
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=rf"mask\.dtype={mask.dtype}"):
        layer(x, mask)
    with pytest.raises(ValueError, match=r"mask\.dtype"):
        moe_reference(layer, x, mask)
    with pytest.raises(ValueError, match=r"mask\.dtype"):
        layer(x, mask.tolist())                                              # not a tensor at all


def test_moe_mask_shape_and_bool_ok():
    layer = MoELayer(MoEConfig(16, 32, 4))
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"mask\.shape=\(3, 2\)"):
        layer(x, torch.ones(3, 2, dtype=torch.bool))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    y, _ = layer(x, mask)
    assert (y[~mask] == 0).all()


def test_model_converts_integer_attention_mask():
    "The model treats a 0/1 (long) attention mask as 'nonzero = real token' and converts it itself."
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", moe=dict(num_experts=4), vocab_size=64, num_encoder_layers=2, num_decoder_layers=2,
                             dropout=0.0)
    model = EncoderDecoder(cfg).eval()
    ids = torch.randint(2, 64, (2, 5))
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.randint(2, 64, (2, 4))
    with torch.no_grad():
        a = model(ids, am, labels=labels)
        b = model(ids, am.bool(), labels=labels)
    torch.testing.assert_close(a.logits, b.logits)


# ---- schemas cover every field, and the routing part is declared once

@pytest.mark.parametrize("cls", list(BASE))
def test_schema_names_every_field(cls):
    assert set(BASE[cls][0]) == {f.name for f in dataclasses.fields(cls)}


def test_moe_schema_shares_router_schema():
    assert not set(MOE_FIELDS) & set(ROUTER_FIELDS)               # MoEConfig holds a RouterConfig, no copies
    assert all(MOE_ARGS[k] is ROUTER_FIELDS[k] for k in ROUTER_FIELDS)
    assert set(MOE_ARGS) - set(ROUTER_FIELDS) == {"d_model", "d_ff", "activation", "expert_dropout"}


# ---- the sweep: every field rejects a value of the wrong type and values out of range

def bad_values(f):
    "Values `f` must refuse: the wrong type, None where not allowed, just past each bound."
    out = [] if f.none else [None]
    if f.kind == "int": out += [True, False, 2.5, "3", float("nan")]
    elif f.kind == "float": out += [True, "0.5", float("nan"), [0.1]]
    elif f.kind == "bool": out += [1, 0, "yes", "True"]
    elif f.kind == "choice": out += [1, True, "no-such-choice", f.choices[0].upper() + "_"]
    if f.kind in ("int", "float"):
        if f.finite: out.append(float("inf"))
        if f.lo is not None: out.append(f.lo if f.lo_open else f.lo - 1)
        if f.hi is not None: out.append(f.hi if f.hi_open else f.hi + 1)
    return out


ARGS = {RouterConfig: ROUTER_FIELDS, MoEConfig: MOE_ARGS, ModelConfig: MODEL_FIELDS}  # what each constructor takes by name
SWEEP = [pytest.param(cls, name, v, id=f"{cls.__name__}.{name}={v!r}")
         for cls, schema in ARGS.items() for name, f in schema.items() for v in bad_values(f)]


@pytest.mark.parametrize("cls,name,value", SWEEP)
def test_field_rejects_bad_value(cls, name, value):
    raises(cls, name, value)


@pytest.mark.parametrize("name", ["moe", "decoder_moe"])
@pytest.mark.parametrize("value", [dict(num_experts=4), "switch", 4])
def test_model_moe_fields_must_be_moe_configs(name, value):
    kw = dict(moe=MoEConfig(64, 128, 4)) if name == "decoder_moe" else {}
    with pytest.raises(ConfigError, match=f"{name}="):
        build(ModelConfig, **{name: value}, **kw)


def test_model_cross_field_checks():
    with pytest.raises(ConfigError, match=r"moe\.d_model=32, d_model=64"):
        ModelConfig(moe=MoEConfig(32, 128, 4))
    with pytest.raises(ConfigError, match="decoder_moe needs moe"):
        ModelConfig(decoder_moe=MoEConfig(64, 128, 4))
    with pytest.raises(ConfigError, match="encoder-only"):
        ModelConfig(moe=MoEConfig(64, 128, 4, router="expert_choice", capacity_factor=1.0))
    with pytest.raises(ConfigError, match="relative_attention_max_distance=16"):
        ModelConfig(relative_attention_num_buckets=32, relative_attention_max_distance=16)


def test_validate_router_config_after_mutation():
    c = MoEConfig(16, 32, 4)
    c.jitter_eps = 1.0
    with pytest.raises(ConfigError, match=r"jitter_eps=1\.0"):
        validate_router_config(c)
    c.jitter_eps, c.capacity_factor = 0.0, 3
    validate_router_config(c)
    assert isinstance(c.capacity_factor, float)


# ---- every preset still builds

@pytest.mark.parametrize("p", list(MOE_PRESETS))
def test_moe_presets_build(p):
    c = MoEConfig.preset(p, 16, 32, 8)
    assert c.routing.top_k == c.top_k
    MoEConfig.preset(p, 16, 32, 8, activation="gated-gelu_new", expert_dropout=0.1)


@pytest.mark.parametrize("size", list(_PRESETS))
@pytest.mark.parametrize("p", [None, *MOE_PRESETS])
def test_model_presets_build(size, p):
    if p is None:
        cfg = ModelConfig.preset(size)
        assert cfg.moe is None
        return
    moe = dict(num_experts=8, **MOE_PRESETS[p])
    dec = dict(router="token_choice", top_k=2) if p == "expert_choice" else None
    cfg = ModelConfig.preset(size, moe=moe, decoder_moe=dec)
    assert cfg.moe.router == MOE_PRESETS[p].get("router", "token_choice")
    d = cfg.d_model
    cfg2 = ModelConfig.preset(size, moe=MoEConfig.preset(p, d, cfg.d_ff, 8, activation=cfg.activation), decoder_moe=dec)
    assert cfg2.moe == cfg.moe
