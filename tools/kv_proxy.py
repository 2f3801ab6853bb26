"""A quick proxy for KV-cache quantization schemes on SmolLM2-135M, in torch with float weights: which of K and V
costs, and what cuts it. The keys (after RoPE) and values entering attention are fake-quantized as a scheme says;
SmoothAttention's lambda (tied across rotary pairs, ``max|K|^alpha``) and the static per-channel ranges come from
calibration text that is not the evaluation text. Prints the perplexity on the first N evaluation windows of 512.

    python tools/kv_proxy.py --windows 4 [--only "g32"]

Measured with it: docs/w4a8.md ("Where KV4's loss comes from"). A proxy: the compiled recipe is measured with
tools/bench_spine.py."""
import argparse
import math
import os

import torch
import transformers
from transformers.models.llama import modeling_llama as m

torch.set_num_threads(1)
from llmq.frontends.packaged import packaged_gguf  # noqa: E402
from llmq.evaluate import read_eval_text  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--windows", type=int, default=4)
ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext2", "wiki.test.raw"))
ap.add_argument("--calib", nargs="+", default=[os.path.join(os.path.dirname(__file__), "..", "README.md")],
                help="calibration text files (not the evaluation text)")
ap.add_argument("--only", nargs="*", default=[], help="run the schemes whose name contains one of these")
args = ap.parse_args()
gguf = packaged_gguf()
tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                          dtype=torch.float32, attn_implementation="eager")
model.eval()
NWIN = args.windows
wiki = tok(read_eval_text(args.text), return_tensors="pt").input_ids[0]
wins = [wiki[i * 512:(i + 1) * 512] for i in range(NWIN)]
calib_text = "".join(open(f, encoding="utf-8").read() for f in args.calib)
calib = tok(calib_text, return_tensors="pt").input_ids[0][:1024].view(2, 512)

MODE = {}
STATS = {}
orig = m.eager_attention_forward


def qtok(x, bits, g, sink):
    """asymmetric per-token min-max over groups of g along the last axis; x [b,h,T,d]"""
    b, h, T, d = x.shape
    xs = x.reshape(b, h, T, d // g, g)
    lo, hi = xs.amin(-1, keepdim=True), xs.amax(-1, keepdim=True)
    L = 2 ** bits - 1
    s = (hi - lo).clamp_min(1e-8) / L
    z = -lo / s
    q = ((torch.round(xs / s + z).clamp(0, L)) - z) * s
    q = q.reshape(b, h, T, d)
    if sink:
        q[:, :, :sink] = x[:, :, :sink]
    return q


def qchan(x, bits, lo, hi, sink):
    L = 2 ** bits - 1
    s = (hi - lo).clamp_min(1e-8) / L
    z = -lo / s
    q = ((torch.round(x / s + z).clamp(0, L)) - z) * s
    if sink:
        q[:, :, :sink] = x[:, :, :sink]
    return q


def qkivi(x, bits, g, sink):
    """KIVI's keys: asymmetric per channel over each group of g tokens (min/max along the token axis), the
    tokens of an incomplete last group float (the streaming residual); x [b,h,T,d]. Not causal, unlike the
    compiled pass (quantize-kv-cache per-channel-group): every query sees every complete group quantized, its
    range taken over tokens that may come after the query — a proxy for choosing g."""
    b, h, T, d = x.shape
    full = T // g * g
    xs = x[:, :, :full].reshape(b, h, full // g, g, d)
    lo, hi = xs.amin(3, keepdim=True), xs.amax(3, keepdim=True)
    L = 2 ** bits - 1
    s = (hi - lo).clamp_min(1e-8) / L
    z = -lo / s
    q = x.clone()
    q[:, :, :full] = (((torch.round(xs / s + z).clamp(0, L)) - z) * s).reshape(b, h, full, d)
    if sink:
        q[:, :, :sink] = x[:, :, :sink]
    return q


def patched(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    li = module.layer_idx
    if MODE.get("collect"):
        st = STATS.setdefault(li, {})
        a = key.abs().amax(dim=(0, 2))  # [h, d]
        st["kmax"] = torch.maximum(st.get("kmax", a), a)
        # stats of smoothed keys / values per channel (min, max over tokens, skipping sink token)
        for nm, t in (("k", key), ("v", value)):
            lo, hi = t[:, :, 1:].amin(dim=(0, 2)), t[:, :, 1:].amax(dim=(0, 2))
            st[nm + "lo"] = torch.minimum(st.get(nm + "lo", lo), lo)
            st[nm + "hi"] = torch.maximum(st.get(nm + "hi", hi), hi)
    for nm in ("k", "v"):
        cfg = MODE.get(nm)
        if not cfg:
            continue
        t = key if nm == "k" else value
        lam = None
        if nm == "k" and cfg.get("smooth"):
            km = STATS[li]["kmax"]
            d = km.shape[-1]
            tied = torch.maximum(km[:, : d // 2], km[:, d // 2:])
            lam = torch.cat([tied, tied], -1).clamp_min(1e-5) ** cfg.get("alpha", 0.5)  # [h, d]
            lam = lam[None, :, None, :]
            t = t / lam
        if cfg["kind"] == "kivi":
            t = qkivi(t, cfg.get("bits", 4), cfg.get("g", 32), cfg.get("sink", 0))
        elif cfg["kind"] == "tok":
            t = qtok(t, cfg.get("bits", 4), cfg.get("g", t.shape[-1]), cfg.get("sink", 0))
        else:
            st = STATS[li]
            lo, hi = st[nm + "lo"][None, :, None, :], st[nm + "hi"][None, :, None, :]
            if lam is not None:
                lo, hi = lo / lam, hi / lam
            t = qchan(t, cfg.get("bits", 4), lo, hi, cfg.get("sink", 0))
        if lam is not None:
            t = t * lam
        if nm == "k":
            key = t
        else:
            value = t
    return orig(module, query, key, value, attention_mask, scaling, dropout, **kw)


m.eager_attention_forward = patched


@torch.no_grad()
def ppl():
    nll, n = 0.0, 0
    for w in wins:
        out = model(w[None], labels=w[None])
        nll += out.loss.item() * (len(w) - 1)
        n += len(w) - 1
    return math.exp(nll / n)


with torch.no_grad():
    MODE.update(collect=True)
    for c in calib:
        model(c[None])
    MODE.clear()
base = ppl()
print(f"fp32 {base:.3f}", flush=True)
S = dict(smooth=True)
configs = {
    "k tok g64 smooth": dict(k=dict(kind="tok", **S)),
    "v tok g64": dict(v=dict(kind="tok")),
    "kv tok g64 smooth (recipe)": dict(k=dict(kind="tok", **S), v=dict(kind="tok")),
    "k tok g64 nosmooth": dict(k=dict(kind="tok")),
    "kv tok g32 smooth": dict(k=dict(kind="tok", g=32, **S), v=dict(kind="tok", g=32)),
    "kv tok g64 smooth sink1": dict(k=dict(kind="tok", sink=1, **S), v=dict(kind="tok", sink=1)),
    "kv tok g32 smooth sink1": dict(k=dict(kind="tok", g=32, sink=1, **S), v=dict(kind="tok", g=32, sink=1)),
    "k chan static + v tok": dict(k=dict(kind="chan"), v=dict(kind="tok")),
    "k chan static sink1 + v tok sink1": dict(k=dict(kind="chan", sink=1), v=dict(kind="tok", sink=1)),
    "kv tok g16 smooth": dict(k=dict(kind="tok", g=16, **S), v=dict(kind="tok", g=16)),
}
for a in (0.75, 1.0):
    configs[f"k tok g64 smooth a{a}"] = dict(k=dict(kind="tok", smooth=True, alpha=a))
    configs[f"k tok g32 smooth a{a}"] = dict(k=dict(kind="tok", g=32, smooth=True, alpha=a))
for g in (16, 32, 64, 128):
    configs[f"k kivi g{g} + v tok sink1"] = dict(k=dict(kind="kivi", g=g), v=dict(kind="tok", sink=1))
    configs[f"k kivi g{g} sink1 + v tok sink1"] = dict(k=dict(kind="kivi", g=g, sink=1), v=dict(kind="tok", sink=1))
configs["k tok g32 smooth"] = dict(k=dict(kind="tok", g=32, **S))
configs["k tok g64 smooth sink1"] = dict(k=dict(kind="tok", sink=1, **S))
only = args.only
for name, cfg in configs.items():
    if only and not any(o in name for o in only):
        continue
    MODE.clear()
    MODE.update(cfg)
    p = ppl()
    print(f"{name:40s} {p:.3f}  {100 * (p / base - 1):+.2f} %", flush=True)
