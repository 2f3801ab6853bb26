"""The compile report: per-layer facts (role, scales, ranges, SQNR), totals, times, and a text summary.

Per-layer SQNR is measured on one calibration batch, layer by layer in isolation, on each linear as the
quantize passes found it (after exact transforms such as smoothing, which move scale between a linear's
input and its weight): its float input ``x`` and float weight ``W`` give ``y = x·W``; the quantized layer as
the output graph computes it gives ``ŷ = DQ(Q(x))·DQ(W_q)``; ``SQNR = 10·log10(Σy² / Σ(y − ŷ)²)``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .ir.graph import Graph
from .ir.structure import Structure, weight_matrix
from .passes.qdq_math import FP8, fake_quant, fp8_quantize, sqnr_db
from .passes.quantize_dynamic import per_token_fake_quant
from .passes.split_range import residual_factor

__all__ = ["layer_table", "layer_sqnr", "summary_text", "int8_act_mac_fraction", "range_split_extra_mac_fraction"]


def _act_fake_quant(node: gs.Node, x: np.ndarray) -> np.ndarray:
    dq = Graph.producer(node.inputs[0])
    if dq is None or dq.op != "DequantizeLinear":
        return x
    q = Graph.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        return x
    if not isinstance(q.inputs[1], gs.Constant):  # a scale computed at run time: per token (the blocked form)
        return per_token_fake_quant(x) if q.attrs.get("block_size") else x
    scale = np.asarray(q.inputs[1].values, dtype=np.float32)
    zp = np.asarray(q.inputs[2].values if len(q.inputs) > 2 else np.int8(0))
    if zp.dtype == FP8:
        return fp8_quantize(x, scale).astype(np.float32) * scale
    bits = 8 if zp.dtype in (np.int8, np.uint8) else 16
    return fake_quant(x, scale, None, bits, narrow=False)


def layer_sqnr(before: Structure, after: Graph, sample: dict) -> dict:
    """name -> SQNR (dB) for every linear of ``before`` that ``after`` quantized."""
    nodes = after.node_by_name()
    out = {}
    for lin in before.linears:
        node = nodes.get(lin.node.name)
        x = sample.get(lin.act.name)
        if node is None or x is None:
            continue
        view = after.constant_through(node.inputs[1])
        w_q = Graph.materialize(view) if view is not None and view.quantized else None
        act_q = Graph.producer(node.inputs[0]) is not None and Graph.producer(node.inputs[0]).op == "DequantizeLinear"
        if w_q is None and not act_q:
            continue
        w = weight_matrix(lin).astype(np.float32)
        if w_q is not None and w_q.shape != w.shape:  # extra input rows (a fused low-rank branch reports its own error)
            continue
        w_eff = w_q if w_q is not None else w
        if lin.node.op == "Gemm" and lin.weight_axis == 0:
            w, w_eff = w.T, w_eff.T
        k = residual_factor(node) if lin.range_split else None
        if k is not None:  # the input is [clip(x); residual / k] along the rows: compare against x·W itself
            c, r = (h.reshape(-1, x.shape[-1]).astype(np.float32) for h in np.split(x, 2, axis=-2))
            y = (c + k * r) @ w
            y_hat = _act_fake_quant(node, c) @ w_eff + k * (_act_fake_quant(node, r) @ w_eff)
        else:
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
            y = x2 @ w
            y_hat = _act_fake_quant(node, x2) @ w_eff
        out[lin.name] = round(sqnr_db(y, y_hat), 2)
    return out


def int8_act_mac_fraction(rows: list, include_lm_head: bool = True, act_format: str = "int8") -> float:
    """Share of linear MACs (float side branches of split layers included) with INT8 activations (static or per
    token; ``act_format="fp8e4m3"``: with FP8 activations)."""
    rows = [r for r in rows if include_lm_head or r["role"] != "lm_head"]
    total = sum(r["macs_per_token"] + r.get("split_float_macs_per_token", 0) for r in rows)
    q = sum(r["macs_per_token"] for r in rows if r.get("act_bits") and r.get("act_format", "int8") == act_format)
    return q / total if total else 0.0


def range_split_extra_mac_fraction(rows: list) -> float:
    """Extra INT8 MACs that range-split linears run (their residual rows), as a share of the decoder's."""
    rows = [r for r in rows if r["role"] != "lm_head"]
    total = sum(r["macs_per_token"] for r in rows)
    return sum(r.get("range_split_int8_macs_per_token", 0) for r in rows) / total if total else 0.0


def _sensitivity_measure(rows: list) -> tuple:
    """(row key, what it measures) of the sensitivity scores in ``rows``: the whole model's output KL, or, for a
    block-by-block compile, the noise at the group's block output."""
    if any("sensitivity_kl" in r for r in rows):
        return "sensitivity_kl", "output KL when only this group's input is INT8"
    return ("sensitivity_block_noise", "noise at its block's output (relative to the residual stream) when only "
            "this group's input is INT8")


def sensitivity_svg(rows: list, top: int = 40) -> str | None:
    """A horizontal bar chart (SVG) of the most sensitive activation groups, by the score
    that ranked them (output KL, or block output noise when the compile ran block by block)."""
    seen, bars = set(), []
    key, caption = _sensitivity_measure(rows)
    for r in sorted((r for r in rows if key in r), key=lambda r: r["sensitivity_rank"]):
        if r["sensitivity_rank"] not in seen:
            seen.add(r["sensitivity_rank"])
            bars.append((r["name"], r[key], "act_bits" not in r))
    if not bars:
        return None
    bars = bars[:top]
    peak = max(kl for _, kl, _ in bars) or 1.0
    width, row, left = 720, 16, 190
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row * len(bars) + 40}" font-family="monospace" font-size="11">',
             f'<text x="4" y="14">{caption} (red: kept float by the budget)</text>']
    for i, (name, kl, kept) in enumerate(bars):
        y = 24 + i * row
        w = max(1.0, (width - left - 90) * kl / peak)
        parts.append(f'<text x="4" y="{y + 11}">{name}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 3}" fill="{"#c0392b" if kept else "#2e86c1"}"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 11}">{kl:.3g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def layer_table(linears: list, records: dict, sqnr: dict, declined: list = ()) -> list:
    """One row per linear of ``linears`` (a structure's, or :func:`~llmq.ir.structure.lite_linears` of it). A linear whose weight stays float carries ``float_reason`` (the first pass that
    declined it and why, else why no pass selected it); every decline that names it is in ``declined``."""
    by_linear: dict = {}
    for d in declined:
        by_linear.setdefault(d["where"], []).append(f"{d['pass']}: {d['reason']}")
    rows = []
    for lin in linears:
        row = {"name": lin.name, "node": lin.node.name, "role": lin.role, "layer": lin.layer,
               "producer": lin.producer, "in_features": lin.in_features, "out_features": lin.out_features,
               "macs_per_token": lin.macs_per_token}
        if lin.role == "lm_head":
            row["tied_embedding"] = lin.tied_embedding
        if lin.role == "unknown":
            row["reason"] = lin.reason
        row.update(records.get(lin.name, {}))
        if lin.name in sqnr:
            row["sqnr_db"] = sqnr[lin.name]
        if lin.name in by_linear:
            row["declined"] = by_linear[lin.name]
        if "weight_bits" not in row:
            row["float_reason"] = _float_reason(lin, by_linear.get(lin.name))
        rows.append(row)
    return rows


def _float_reason(lin, declines: list | None) -> str:
    if declines:
        return declines[0]
    if lin.role == "lm_head":
        return "the LM head stays float by default (a recipe quantizes it only by naming role lm_head)"
    if lin.role == "unknown":
        return f"not classified ({lin.reason}); never quantized by guess"
    return f"no pass of the recipe quantizes weights of role {lin.role}"


def attention_table(records: dict, linear_names: set) -> list:
    """Per attention block (``layers.N.attn``): what smooth-attention and quantize-kv-cache recorded."""
    return [{"name": name, **rec} for name, rec in sorted(records.items(), key=lambda kv: _layer_key(kv[0]))
            if name not in linear_names and name.endswith(".attn")]


def _layer_key(name: str):
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, name)


def summary_text(report: dict, worst: int = 10) -> str:
    t = report["totals"]
    v = report.get("verification") or {}
    lines = []
    for name, m in (v.get("outputs") or {}).items():
        measured = (f"KL {m['kl']:.4g} nats/token, top-1 agreement {100 * m['top1_agreement']:.1f} %" if "kl" in m
                    else f"relative error {m['rel_error']:.4g}, cosine {m['cosine']:.4f}")
        lines.append(f"against the input model ({name}, {v['windows']} {'held-out ' if v.get('held_out') else ''}windows "
                     f"of {v['seq_len']}): {measured} — {'within' if v.get('within_bound') else 'OUTSIDE'} the "
                     f"recipe's bound ({v['bound']})")
    blocks = sorted(v.get("blocks") or [], key=lambda b: -b["rel_error"])[:3]
    if blocks:
        lines.append("blocks with the largest output error: " + ", ".join(f"{b['block']} {b['rel_error']:.3g}" for b in blocks))
    fp8 = t.get("fp8_act_mac_fraction", 0.0)
    acts = (f"with FP8 activations ({100 * fp8:.1f} % of linear MACs)" if fp8 and not t["int8_act_mac_fraction"] else
            f"with INT8 activations ({100 * t['int8_act_mac_fraction']:.1f} % of linear MACs, "
            f"{100 * t['int8_act_mac_fraction_decoder']:.1f} % without the LM head)")
    lines += [f"recipe {report['recipe']['name']}: {t['quantized_weights']}/{t['linears']} linears with quantized weights, "
              f"{t['quantized_activations']} {acts}"]
    ranged = [r for r in report["layers"] if "range_split_ratio" in r]
    if ranged:
        ratios = sorted(r["range_split_ratio"] for r in ranged)
        lines.append(f"split-range on {len(ranged)} linears (input max|x| {ratios[0]:.1f}–{ratios[-1]:.1f}× the clip value): "
                     f"their residual rows add {100 * t.get('range_split_extra_int8_mac_fraction', 0.0):.1f} % INT8 MACs to the decoder")
    key, caption = _sensitivity_measure(report["layers"])
    sens = sorted({(r["sensitivity_rank"], r["name"], r[key], "act_bits" not in r)
                   for r in report["layers"] if "sensitivity_rank" in r and key in r})
    if sens:
        lines.append(f"most sensitive activation groups ({caption}):")
        lines.extend(f"  {rank:>3}. {name:<24} {kl:.4g}{'  (kept float)' if kept else ''}" for rank, name, kl, kept in sens[:10])
    attn = report.get("attention") or []
    smoothed = [a for a in attn if "key_outlier_ratio_before" in a]
    if smoothed:
        before = sorted(a["key_outlier_ratio_before"] for a in smoothed)
        after = sorted(a["key_outlier_ratio_after"] for a in smoothed)
        lines.append(f"smooth-attention on {len(smoothed)} blocks: key outlier ratio (max/median channel) median "
                     f"{before[len(before) // 2]:.1f} → {after[len(after) // 2]:.1f}, worst {before[-1]:.1f} → {after[-1]:.1f}")
    kv = [a for a in attn if "kv_k_bits" in a or "kv_v_bits" in a]
    if kv:
        a = kv[0]
        bits = a.get("kv_k_bits", a.get("kv_v_bits"))
        gran = a.get("kv_k_granularity", a.get("kv_v_granularity"))
        kind = "FP8 E4M3" if a.get("kv_k_format", a.get("kv_v_format")) == "fp8e4m3" else f"INT{bits}"
        lines.append(f"KV cache: {kind} {gran} Q/DQ on the keys/values of {len(kv)} attention blocks")
    ranked = [r for r in report["layers"] if "sqnr_db" in r and math.isfinite(r["sqnr_db"])]
    ranked.sort(key=lambda r: r["sqnr_db"])
    if ranked:
        lines.append(f"worst {min(worst, len(ranked))} layers by output SQNR (dB):")
        for r in ranked[:worst]:
            extra = f"  act amax {r['act_amax']:.3g} (outlier ratio {r['act_outlier_ratio']:.1f})" if "act_amax" in r else ""
            lines.append(f"  {r['name']:<24} {r['sqnr_db']:7.2f}{extra}")
    if report.get("declined"):
        reasons: dict = {}
        for d in report["declined"]:
            reasons.setdefault((d["pass"], d["reason"]), []).append(d["where"])
        linears = {r["name"] for r in report["layers"]}
        for (p, why), where in sorted(reasons.items()):
            what = "linear(s)" if all(w in linears for w in where) else "node(s)"
            lines.append(f"{p} left {len(where)} {what} alone: {why} ({', '.join(where[:4])}{', …' if len(where) > 4 else ''})")
    violations = report["backend"].get("tensorrt_rule_violations", [])
    if violations and report["backend"].get("name") == "onnxruntime":  # its own ops: not a defect of this artifact
        lines.append(f"{len(violations)} node(s) use ONNX Runtime ops TensorRT would reject (e.g. {violations[0]['node']}: "
                     f"{violations[0]['rule']}); compile with --backend qdq for TensorRT")
    else:
        for problem in violations[:5]:
            lines.append(f"TensorRT rule: {problem['node']}: {problem['rule']}")
    return "\n".join(lines)
