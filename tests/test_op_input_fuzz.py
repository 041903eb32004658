"""Extreme-value fuzz of every `torch.ops.flanmoe` op: extreme integers (0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**62,
int64 max, int64 min) in every integer-valued argument (int scalars, int64 tensors: group sizes, indices, targets;
tensor sizes) and odd shapes (empty, huge with zero elements, stride-0 expansions, non-contiguous, wrong rank or
dtype). An op may accept its input or refuse it; it may never crash. Refusals must be a clean Python exception
(RuntimeError / ValueError / IndexError / TypeError) from the op's own checks ("flanmoe::<op>: ...") that names
the argument that was changed.

The calls run in a worker subprocess (one for the module, restarted after a crash), so a segfault fails the test
that caused it, with the case, instead of killing pytest. The worker caps its address space (RLIMIT_AS), so an
input that asks for an absurd allocation fails fast instead of swapping the machine.

The ops are enumerated from the dispatcher: an op registered in cpp/ without a case builder here fails
`test_every_op_has_fuzz_cases`. Set FLANMOE_FUZZ_REPORT=<path> to append every case and its outcome (JSON lines)."""
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import flanmoe_nb.kernels as K

pytestmark = pytest.mark.skipif(not K.extension_available(), reason="flanmoe_nb._C not built")

I64_MAX, I64_MIN = 2**63 - 1, -2**63
EXTREMES = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**62, I64_MAX, I64_MIN]
# sizes: huge dims (with zero elements); 2**62 + 2**20 rows of 4 floats is 2**24 bytes mod 2**64 (a wrapped byte count)
BIG = [v for v in EXTREMES if v > 1] + [2**62 + 2**20]
FLOAT_EXTREMES = [float(v) for v in EXTREMES] + [float("nan"), float("inf"), float("-inf"), -0.0, 0.5, 1.0 - 2**-40]
CLEAN = ("RuntimeError", "ValueError", "IndexError", "TypeError")
MEM_LIMIT = 6 << 30                # the worker's address-space cap (torch itself takes ~1 GiB of it)
CASE_TIMEOUT = 60.0                # seconds one case may take before the worker counts as hung

# ------------------------------------------------------------------ the worker
WORKER = r"""
import io, json, os, resource, struct, sys
proto = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)                                        # anything else printed goes to stderr
import torch
import flanmoe_nb.kernels as K
K.require_extension()
torch.set_num_threads(2)
lim = int(sys.argv[1])
if lim: resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
proto.write(b'{"ready": true}\n')
inp = sys.stdin.buffer
while True:
    hdr = inp.read(8)
    if len(hdr) < 8: break
    (n,) = struct.unpack("<Q", hdr)
    name, args, grad = torch.load(io.BytesIO(inp.read(n)), weights_only=False)
    try:
        if grad:
            args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        out = getattr(torch.ops.flanmoe, name)(*args)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if grad and first.requires_grad: first.sum().backward()
        res = {"outcome": "ok"}
    except BaseException as e:
        res = {"outcome": "error", "type": type(e).__name__, "msg": str(e).split("\n")[0][:1500]}
    proto.write((json.dumps(res) + "\n").encode())
"""


class Worker:
    "A subprocess that runs op calls; `run` reports ok / error / the signal that killed it / a hang."

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ, OMP_NUM_THREADS="2", FLANMOE_CPU_CACHE_MB="64")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(MEM_LIMIT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     cwd=str(Path(__file__).resolve().parents[1]))
        self.buf = b""
        line = self._line(120.0)
        assert line is not None and json.loads(line).get("ready"), f"fuzz worker did not start: {self._dead()}"

    def _line(self, timeout):
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            r, _, _ = select.select([fd], [], [], timeout)
            if not r: return None                                 # hung
            chunk = os.read(fd, 65536)
            if not chunk: return b""                              # died
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def _dead(self):
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return {"outcome": "died", "returncode": rc, "signal": -rc if rc < 0 else None}

    def run(self, name, args, grad=False) -> dict:
        if self.proc is None or self.proc.poll() is not None: self._start()
        blob = io.BytesIO()
        torch.save((name, list(args), grad), blob)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(blob.getvalue())) + blob.getvalue())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._dead()
        line = self._line(CASE_TIMEOUT)
        if line is None:
            self.proc.kill()
            self._dead()
            return {"outcome": "hung", "timeout_s": CASE_TIMEOUT}
        if line == b"": return self._dead()
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


# ------------------------------------------------------------------ the ops and valid arguments for each
def flanmoe_ops() -> list[str]:
    "Every op of the flanmoe namespace the dispatcher knows (what TORCH_LIBRARY(flanmoe, m) defines)."
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("flanmoe::"))


def schema(name):
    return [(a.name, str(a.type)) for a in getattr(torch.ops.flanmoe, name).default._schema.arguments]


def _gs(G, N, g):
    "G non-negative group sizes summing to at most N."
    if G == 0: return torch.zeros(0, dtype=torch.long)
    cuts = torch.sort(torch.randint(0, N + 1, (G,), generator=g)).values
    return torch.diff(torch.cat([torch.tensor([0]), cuts]))


def _grouped(kind):
    def build(d, g):
        N, Kd, M, G = d["n"], d["k"], d["m"], d["g"]
        gs = _gs(G, N, g)
        if kind == "grouped_mm":
            trans = d["flag"]
            b = torch.randn(G, M, Kd, generator=g) if trans else torch.randn(G, Kd, M, generator=g)
            return [torch.randn(N, Kd, generator=g), b, gs, trans]
        if kind == "grouped_mm_wgrad":
            return [torch.randn(N, Kd, generator=g), torch.randn(N, M, generator=g), gs]
        if kind == "relu_grouped_mm":
            return [torch.randn(N, Kd, generator=g), torch.randn(G, Kd, M, generator=g), gs]
        return [torch.randn(N, M, generator=g), torch.randn(N, Kd, generator=g), torch.randn(G, Kd, M, generator=g), gs,
                d["flag"], d["flag2"]]
    return build


def _route_plan(d, g):
    T, k, E = d["n"], d["k"] % 4 + 1, d["g"] + 1
    eidx = torch.randint(0, E, (T, k), generator=g)
    prio = torch.rand(T, k, generator=g) if d["flag"] else None
    valid = torch.rand(T, generator=g) < 0.8 if d["flag2"] else None
    return [eidx, E, d["m"] if d["flag"] else None, prio, valid]


def _permute(d, g):
    T, S, dd = d["n"] + 1, d["m"], d["k"]
    return [torch.randn(T, dd, generator=g), torch.randint(0, T, (S,), generator=g),
            torch.rand(S, generator=g) if d["flag"] else None]


def _unpermute(d, g):
    T, S, dd = d["n"] + 1, d["m"], d["k"]
    return [torch.randn(S, dd, generator=g), torch.randint(0, T, (S,), generator=g),
            torch.rand(S, generator=g) if d["flag"] else None, T]


def _gather_dot(d, g):
    T, S, dd = d["n"] + 1, d["m"], d["k"]
    return [torch.randn(T, dd, generator=g), torch.randint(0, T, (S,), generator=g), torch.randn(S, dd, generator=g)]


def _attn_dims(d):
    return d["g"] % 3 + 1, d["n"] % 5, d["m"] % 5, d["k"] % 3 + 1, d["k"] % 4 + 1    # B, Lq, Lk, H, D


def _attention(d, g):
    B, Lq, Lk, H, D = _attn_dims(d)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for L in (Lq, Lk, Lk))
    bias = torch.randn(1, H, Lq, Lk, generator=g) if d["flag"] else None
    key_mask = torch.zeros(B, Lk) if d["flag2"] else None
    mult = torch.full((B, H, Lq, Lk), 2.0) if d["flag"] and d["flag2"] else None
    return [q, k, v, bias, key_mask, mult]


def _attention_backward(d, g):
    B, Lq, Lk, H, D = _attn_dims(d)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for L in (Lq, Lk, Lk))
    probs = torch.softmax(torch.randn(B, H, Lq, Lk, generator=g), -1)
    mult = torch.full((B, H, Lq, Lk), 2.0) if d["flag"] and d["flag2"] else None
    return [torch.randn(B, Lq, H, D, generator=g), q, k, v, probs, d["flag"], d["flag2"], mult]


def _attention_qkv(d, g):
    B, L, _, H, D = _attn_dims(d)
    bias = torch.randn(1, H, L, L, generator=g) if d["flag"] else None
    key_mask = torch.zeros(B, L) if d["flag2"] else None
    mult = torch.full((B, H, L, L), 2.0) if d["flag"] and d["flag2"] else None
    return [torch.randn(B, L, 3, H, D, generator=g), bias, key_mask, mult]


def _attention_qkv_backward(d, g):
    B, L, _, H, D = _attn_dims(d)
    probs = torch.softmax(torch.randn(B, H, L, L, generator=g), -1)
    mult = torch.full((B, H, L, L), 2.0) if d["flag"] and d["flag2"] else None
    return [torch.randn(B, L, H, D, generator=g), torch.randn(B, L, 3, H, D, generator=g), probs, d["flag"],
            d["flag2"], mult]


def _router_linear(d, g):
    T, dd, E = d["n"], d["k"], d["g"] + 1
    return [torch.randn(T, dd, generator=g), torch.randn(E, dd, generator=g),
            torch.randn(E, generator=g) if d["flag"] else None]


def _router_linear_backward(d, g):
    T, dd, E = d["n"], d["k"], d["g"] + 1
    return [torch.randn(T, E, generator=g), torch.randn(T, dd, generator=g), torch.randn(E, dd, generator=g),
            torch.randn(T, dd, generator=g) if d["flag"] else None, d["flag2"], True, d["flag"]]


def _unpermute_backward(d, g):
    T, S, dd = d["n"] + 1, d["m"], d["k"]
    w = torch.rand(S, generator=g) if d["flag"] else None
    return [torch.randn(T, dd, generator=g), torch.randint(0, T, (S,), generator=g), w,
            torch.randn(S, dd, generator=g), True, w is not None and d["flag2"]]


def _dropout(d, g):
    return [torch.randn(d["n"], d["k"], generator=g), 0.25, d["seed"]]


def _rms_norm(d, g):
    return [torch.randn(d["n"], d["k"], generator=g), torch.rand(d["k"], generator=g) + 0.5, 1e-6]


def _rms_norm_backward(d, g):
    x = torch.randn(d["n"], d["k"], generator=g)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6) if d["k"] else torch.full((d["n"],), float("nan"))
    return [torch.randn(d["n"], d["k"], generator=g), x, torch.rand(d["k"], generator=g) + 0.5, rstd, d["flag"], d["flag2"]]


def _ce_target(N, V, g):
    t = torch.randint(0, max(V, 1), (N,), generator=g)
    return t if V else torch.full((N,), -100, dtype=torch.long)


def _cross_entropy(d, g):
    N, V = d["n"], d["k"] + d["m"]
    return [torch.randn(N, V, generator=g), _ce_target(N, V, g), -100]


def _cross_entropy_backward(d, g):
    N, V = d["n"], d["k"] + d["m"]
    logits = torch.randn(N, V, generator=g)
    return [torch.tensor(1.0), logits, _ce_target(N, V, g), torch.logsumexp(logits, -1), -100]


BUILDERS = {
    "grouped_mm": _grouped("grouped_mm"), "grouped_mm_wgrad": _grouped("grouped_mm_wgrad"),
    "relu_grouped_mm": _grouped("relu_grouped_mm"), "relu_grouped_mm_backward": _grouped("relu_grouped_mm_backward"),
    "route_plan": _route_plan, "permute": _permute, "unpermute": _unpermute, "gather_dot": _gather_dot,
    "attention": _attention, "attention_backward": _attention_backward, "dropout": _dropout, "rms_norm": _rms_norm,
    "rms_norm_backward": _rms_norm_backward, "cross_entropy": _cross_entropy,
    "cross_entropy_backward": _cross_entropy_backward, "attention_qkv": _attention_qkv,
    "attention_qkv_backward": _attention_qkv_backward, "router_linear": _router_linear,
    "router_linear_backward": _router_linear_backward, "unpermute_backward": _unpermute_backward,
}
DIFFERENTIABLE = {"grouped_mm", "grouped_mm_wgrad", "relu_grouped_mm", "permute", "unpermute", "gather_dot",
                  "attention", "rms_norm", "cross_entropy", "dropout", "attention_qkv", "router_linear"}


def base_args(name, dims):
    g = torch.Generator().manual_seed(dims["seed"])
    return BUILDERS[name](dims, g)


DEFAULT_DIMS = dict(n=6, k=3, m=4, g=4, flag=True, flag2=True, seed=7)   # g=4: four sizes of 2**62 wrap to 0
# the grid starts from these; with k=0 a huge dim of one operand (zero elements) still matches the others
GRID_DIMS = [DEFAULT_DIMS, {**DEFAULT_DIMS, "k": 0, "m": 1}]   # (m=1: [2**62 + 2**20, 1] floats, bytes wrap)
dims_st = st.fixed_dictionaries(dict(n=st.integers(0, 6), k=st.integers(0, 4), m=st.integers(0, 5), g=st.integers(0, 4),
                                     flag=st.booleans(), flag2=st.booleans(), seed=st.integers(0, 2**16)))


# ------------------------------------------------------------------ mutations
def _fill(shape, dtype, value=None):
    if value is not None: return torch.full(shape, value, dtype=dtype)
    return torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape).to(dtype)


def mutations(name, args):
    """Every mutation of `args` this fuzz tries (deterministic): (arg name, description, new args).
    Integer scalars and the entries of int64 tensors take every value of EXTREMES; every dim of every tensor
    becomes 0 and (with zero elements, or as a stride-0 expansion) every huge size in BIG; plus rank, dtype,
    stride, None and bool changes."""
    out = []
    for i, (an, ty) in enumerate(schema(name)):
        cur = args[i]

        def put(desc, val, i=i, an=an):
            if callable(val):
                try: val = val()
                except RuntimeError: return          # not constructible (a size or stride overflows int64)
            new = list(args)
            new[i] = val
            out.append((an, desc, new))

        if ty in ("int", "Optional[int]"):
            for v in EXTREMES: put(f"{an}={v}", v)
            if ty == "Optional[int]": put(f"{an}=None", None)
        elif ty == "float":
            for v in FLOAT_EXTREMES: put(f"{an}={v}", v)
        elif ty == "bool":
            put(f"{an}={not cur}", not cur)
        elif ty in ("Tensor", "Optional[Tensor]"):
            if cur is None:
                continue
            t = cur
            if ty == "Optional[Tensor]": put(f"{an}=None", None)
            small = t.numel() <= 1 << 16          # (a huge stride-0 expansion from an earlier mutation: views only)
            if t.dtype == torch.long and small:                                   # values of an integer tensor
                for v in EXTREMES:
                    if t.numel():
                        c = t.clone().view(-1); c[0] = v; put(f"{an}[0]={v}", c.view(t.shape))
                        c = t.clone().view(-1); c[-1] = v; put(f"{an}[-1]={v}", c.view(t.shape))
                    put(f"{an}[:]={v}", torch.full(t.shape, v, dtype=torch.long))
                    if t.dim() == 1:
                        put(f"{an}=[{v}]*{max(t.numel(), 2)}", torch.full((max(t.numel(), 2),), v, dtype=torch.long))
                if t.dim() == 1 and 3 <= t.numel() and small:                     # non-negative values whose int64 sum wraps to 1
                    c = torch.zeros_like(t); c[0], c[1], c[2] = I64_MAX, I64_MAX, 3
                    put(f"{an}=[int64 max, int64 max, 3, 0...] (sum wraps to 1)", c)
            for dim in range(t.dim()):                                  # sizes
                shp = list(t.shape)
                shp[dim] = 0
                put(f"{an}.shape[{dim}]=0", lambda shp=shp: _fill(shp, t.dtype))
                for v in BIG:
                    shp = list(t.shape)
                    shp[dim] = v
                    if t.dim() >= 2:                                    # huge, zero elements
                        z = (dim + 1) % t.dim()
                        shp[z] = 0
                        put(f"{an}.shape={shp}", lambda shp=shp: torch.empty(shp, dtype=t.dtype))
                    one = _fill([1] * t.dim(), t.dtype, 0 if t.dtype == torch.long else 1.0)
                    shp = list(t.shape)
                    shp[dim] = v
                    put(f"{an}=expand({shp})", lambda shp=shp: one.expand(shp))      # huge, stride 0
            put(f"{an}.unsqueeze(0)", lambda: t.unsqueeze(0))
            if not small: continue
            if t.dim(): put(f"{an}.flatten()[:1]", t.reshape(-1)[:1].clone() if t.numel() else t.reshape(-1))
            if t.dim() and t.numel() >= 2:
                wide = _fill([*t.shape[:-1], t.shape[-1] * 2], t.dtype)
                v = wide[..., ::2]; v.copy_(t)
                put(f"{an}[noncontiguous]", v)
            for dt in (torch.long, torch.int32, torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.bool):
                if dt != t.dtype: put(f"{an}.to({dt})", t.to(dt))
    return out


# ------------------------------------------------------------------ judging an outcome
def verdict(name, arg, res) -> str | None:
    "None if `res` is acceptable for a call of `name` whose argument `arg` was changed; else why not."
    if res["outcome"] == "ok": return None
    if res["outcome"] != "error": return f"{res['outcome']}: {res}"
    msg = res["msg"]
    if res["type"] not in CLEAN: return f"unclean {res['type']}: {msg}"
    if not msg.startswith(f"flanmoe::{name}"): return f"not the op's own check ({res['type']}): {msg}"
    if not re.search(rf"(?<![\w.]){re.escape(arg)}(?![\w])", msg): return f"does not name {arg!r}: {msg}"
    return None


def must_refuse(name, arg, args) -> str | None:
    "Why the call must be refused, for the value changes whose validity is known exactly (else None)."
    names = [n for n, _ in schema(name)]
    val = dict(zip(names, args))
    t = val.get(arg)
    if arg == "group_sizes" and isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 1:
        sizes = [int(v) for v in t.reshape(-1)[:1000]] if t.numel() <= 1000 else []
        rows = args[0].shape[0]
        if any(v < 0 for v in sizes): return "a negative group size"
        if sum(sizes) > rows: return f"group sizes sum to {sum(sizes)} > {rows} rows"   # (exact: Python ints)
    idx_range = {"permute": lambda: val["x"].shape[0], "gather_dot": lambda: val["x"].shape[0],
                 "unpermute_backward": lambda: val["grad"].shape[0],
                 "unpermute": lambda: val["num_tokens"], "route_plan": lambda: val["num_experts"]}
    if arg in ("token_idx", "expert_idx") and name in idx_range and t.dtype == torch.long and 0 < t.numel() <= 1000:
        hi = idx_range[name]()
        if any(not 0 <= int(v) < hi for v in t.reshape(-1)): return f"an index outside [0, {hi})"
    if arg == "target" and t.dtype == torch.long and 0 < t.numel() <= 1000:
        V, ign = val["logits"].shape[-1], val["ignore_index"]
        if any(int(v) != ign and not 0 <= int(v) < V for v in t.reshape(-1)): return f"a target outside [0, {V})"
    if arg in ("num_experts",) and isinstance(t, int) and t < 1: return "num_experts < 1"
    if arg in ("capacity", "num_tokens") and isinstance(t, int) and t < 0: return f"{arg} < 0"
    return None


def _report(rows):
    path = os.environ.get("FLANMOE_FUZZ_REPORT")
    if not path: return
    with open(path, "a") as f:
        for r in rows: f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------------ tests
def test_every_op_has_fuzz_cases():
    ops = flanmoe_ops()
    assert ops, "no torch.ops.flanmoe op registered"
    missing = [n for n in ops if n not in BUILDERS]
    assert not missing, f"flanmoe ops without fuzz cases in {Path(__file__).name} (add a builder): {missing}"
    for n in ops:     # the builder matches the schema, and each op has cases for every argument it takes
        args = base_args(n, DEFAULT_DIMS)
        assert len(args) == len(schema(n)), (n, schema(n))
        assert {a for a, _, _ in mutations(n, args)} == {a for a, _ in schema(n)}, n


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_valid_inputs_run(worker, name):
    "The base arguments of each builder are valid (so the mutations below start from a working call)."
    for dims in (DEFAULT_DIMS, {**DEFAULT_DIMS, "flag": False, "flag2": False}, {**DEFAULT_DIMS, "n": 0, "m": 0}):
        res = worker.run(name, base_args(name, dims), grad=name in DIFFERENTIABLE)
        assert res["outcome"] == "ok", (name, dims, res)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_extreme_grid(worker, name):
    "Every mutation of `mutations` on one valid call of each op: no crash, and every refusal names the argument."
    bad, rows = [], []
    cases = [(arg, desc if dims is DEFAULT_DIMS else f"{desc} [k=0, m=1 base]", args)
             for dims in GRID_DIMS for arg, desc, args in mutations(name, base_args(name, dims))]
    for arg, desc, args in cases:
        res = worker.run(name, args)
        why = verdict(name, arg, res)
        refuse = must_refuse(name, arg, args)
        if why is None and res["outcome"] == "ok" and refuse: why = f"accepted, but it has {refuse}"
        rows.append({"op": name, "case": desc, **res, "verdict": why})
        if why: bad.append(f"{name}({desc}): {why}")
    _report(rows)
    assert not bad, f"{len(bad)} of {len(rows)} cases failed:\n" + "\n".join(bad[:60])


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(dims=dims_st, data=st.data())
def test_random_mutations(worker, name, dims, data):
    "Random valid shapes (zeros included), then one to three mutations at once, with and without autograd."
    args = base_args(name, dims)
    changed = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        muts = mutations(name, args)
        if not muts: break
        arg, desc, args = data.draw(st.sampled_from(muts), label="mutation")
        changed.append((arg, desc))
    grad = name in DIFFERENTIABLE and data.draw(st.booleans(), label="grad")
    res = worker.run(name, args, grad=grad)
    _report([{"op": name, "case": " & ".join(d for _, d in changed), "dims": dims, "grad": grad, **res}])
    assert res["outcome"] in ("ok", "error"), (name, changed, res)
    if res["outcome"] == "error":
        # several changes: naming any of them is enough
        whys = [verdict(name, a, res) for a, _ in changed]
        assert any(w is None for w in whys), (name, changed, dims, grad, whys[0])
