"""The architecture × recipe table: tiny random-weight models of each family, compiled with the built-in recipes.

    python tools/bench_families.py [--families llama gpt2 ...] [--recipes w8a16 w8a8 ...] [--out DIR]

Each family (``tests/family_models.py``: norm weights and biases moved off 1 and 0) is exported, then compiled
with every recipe on the built-in calibration text (4 windows × 64 tokens); the table gives, per cell, what the
compile's own end-to-end check measured against the exported float model on held-out windows (KL per token and
top-1 agreement for LMs, relative error for the encoder), and how many of the linears structure discovery found
got quantized weights. A refused model or a compile outside its bound shows the one-line error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from family_models import FAMILIES, build_family, export_family  # noqa: E402

RECIPES = ("fp32", "w8a16", "w8a8", "w8a8-dynamic", "w4a16", "w4a16-lr")


def _tokenizer(folder: str) -> str:
    from conftest import TINY_VOCAB, _train_tokenizer

    _train_tokenizer(folder, TINY_VOCAB)
    return folder


def _cell(report: dict) -> str:
    v = report["verification"]
    (name, m), = list(v["outputs"].items())[:1]
    t = report["totals"]
    measured = (f"KL {m['kl']:.1g}, err {m['rel_error']:.2g}, top-1 {100 * m['top1_agreement']:.0f} %" if "kl" in m
                else f"err {m['rel_error']:.2g}, cos {m['cosine']:.4f}")
    return f"{measured}; {t['quantized_weights']}/{t['linears']}" + ("" if v["within_bound"] else " OUTSIDE")


def main() -> None:
    import llmq
    from llmq.ir.errors import LlmqError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="llmq-families-")
    tok = _tokenizer(os.path.join(work, "tokenizer"))
    calib = os.path.join(work, "calib.txt")
    from llmq.calib.data import default_text

    with open(calib, "w", encoding="utf-8") as fh:
        fh.write(default_text()[:60_000])
    rows = []
    for family in args.families:
        root = os.path.join(work, family)
        cells = [family]
        try:
            folder = build_family(family, os.path.join(root, "hf"), tok)
            t = time.perf_counter()
            path = export_family(family, folder, os.path.join(root, "model.onnx"))
            cells.append(f"{time.perf_counter() - t:.1f}")
        except LlmqError as exc:
            rows.append([family, "refused: " + exc.one_line()] + [""] * len(args.recipes))
            print(rows[-1], flush=True)
            continue
        for recipe in args.recipes:
            try:
                r = llmq.compile(path, recipe, os.path.join(root, recipe), calib=calib, tokenizer=tok, calib_samples=4,
                                 calib_seq_len=64, quiet=True, overwrite=True, backend="onnxruntime")
                cells.append(_cell(r.report))
            except LlmqError as exc:
                cells.append("error: " + exc.one_line()[:120])
        rows.append(cells)
        print(cells, flush=True)
    print("\n| family | export s | " + " | ".join(args.recipes) + " |")
    print("|---" * (len(args.recipes) + 2) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
