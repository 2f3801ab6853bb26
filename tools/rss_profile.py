"""Peak memory by phase of one compile: samples the resident set every 0.2 s in a thread and attributes each
sample to the phase the driver last logged (pass names, writing, verifying). For finding where memory goes.

    python tools/rss_profile.py model.onnx --recipe w8a8 -o out/
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--backend", default="qdq")
    ap.add_argument("--calib", help="calibration data (.txt/.jsonl, or an .npz of input_ids for a model without a tokenizer)")
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--calib-seq-len", type=int, default=None)
    args = ap.parse_args()
    phase = {"name": "load", "peaks": {}}

    class Phases(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("running ") or msg.startswith("phase "):
                phase["name"] = msg.split(" ", 1)[1]

    logging.getLogger("llmq").addHandler(Phases())
    logging.getLogger("llmq").setLevel(logging.INFO)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            name = phase["name"]
            phase["peaks"][name] = max(phase["peaks"].get(name, 0.0), rss_mb())
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from llmq.driver import compile as llmq_compile

    started = time.perf_counter()
    result = llmq_compile(args.model, args.recipe, args.output, backend=args.backend, quiet=True, overwrite=True,
                          calib=args.calib, allow_loss=True,
                          **{k: v for k, v in (("calib_samples", args.calib_samples),
                                               ("calib_seq_len", args.calib_seq_len)) if v is not None})
    stop.set()
    thread.join()
    print(f"total {time.perf_counter() - started:.1f} s, peak RSS {result.report['peak_rss_mb']:.0f} MB")
    for name, peak in phase["peaks"].items():
        print(f"  {name:<28} {peak:8.0f} MB")


if __name__ == "__main__":
    main()
