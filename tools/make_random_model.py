"""Write a Hugging Face Llama folder (config.json + safetensors) with random weights, tensor by tensor.

No tensor larger than one chunk (CHUNK elements, 64 MB of fp32) is ever in memory, so an 8B model can be
written on a small machine. The safetensors format is written directly: 8-byte little-endian header length,
a JSON header ({name: {dtype, shape, data_offsets}}, padded with spaces to a multiple of 8), then the raw
little-endian bytes of each tensor in header order. Over --max-shard-mb the weights are split into
``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json`` weight map, as HF does.

Deterministic per --seed: each tensor has its own generator seeded from (seed, tensor index, chunk index),
so the values do not depend on the shard size or the order of writing.

    python make_random_model.py OUT --hidden 2048 --ffn 5632 --heads 32 --kv-heads 4 --vocab 32000 \
        --layers 22 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import torch

CHUNK = 16 << 20  # elements generated at once
ST_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def llama_tensors(a) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in checkpoint order; kind is 'linear', 'embed' or 'norm'."""
    head_dim = a.head_dim or a.hidden // a.heads
    h, q, kv = a.hidden, a.heads * head_dim, a.kv_heads * head_dim
    out = [("model.embed_tokens.weight", (a.vocab, h), "embed")]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "norm"),
                (p + "self_attn.q_proj.weight", (q, h), "linear"),
                (p + "self_attn.k_proj.weight", (kv, h), "linear"),
                (p + "self_attn.v_proj.weight", (kv, h), "linear"),
                (p + "self_attn.o_proj.weight", (h, q), "linear"),
                (p + "post_attention_layernorm.weight", (h,), "norm"),
                (p + "mlp.gate_proj.weight", (a.ffn, h), "linear"),
                (p + "mlp.up_proj.weight", (a.ffn, h), "linear"),
                (p + "mlp.down_proj.weight", (h, a.ffn), "linear")]
    out.append(("model.norm.weight", (h,), "norm"))
    if not a.tie:
        out.append(("lm_head.weight", (a.vocab, h), "linear"))
    return out


def chunks(index: int, shape, kind: str, seed: int, dtype, std: float, bufs: dict):
    """The tensor's values, flat, in chunks of at most CHUNK elements (each its own generator). The chunks
    are views of two reused buffers (no fresh allocation, hence no page faults, per chunk)."""
    if not bufs:
        bufs["f32"] = torch.empty(CHUNK)
    if dtype not in bufs:
        bufs[dtype] = torch.empty(CHUNK, dtype=dtype)
    n = math.prod(shape)
    for c, start in enumerate(range(0, n, CHUNK)):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 65_537 + c)
        m = min(CHUNK, n - start)
        x = torch.randn(m, generator=gen, out=bufs["f32"][:m])
        if kind == "norm":
            x.mul_(0.1).add_(1.0)
        else:
            x.mul_(std)
        yield bufs[dtype][:m].copy_(x)


def write_shard(path: str, specs, a, dtype) -> None:
    esize = torch.empty(0, dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for _, name, shape, _ in specs:
        size = math.prod(shape) * esize
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    bufs = {}
    with open(path + ".tmp", "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for index, name, shape, kind in specs:
            for x in chunks(index, shape, kind, a.seed, dtype, a.std, bufs):
                f.write(x.view(torch.uint8).numpy().data)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=176)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of the linear and embedding weights")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embedding (no lm_head.weight)")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--max-shard-mb", type=int, default=1024)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    from transformers import LlamaConfig

    dtype = DTYPES[a.dtype]
    os.makedirs(a.out, exist_ok=True)
    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads, head_dim=a.head_dim or a.hidden // a.heads,
                         vocab_size=a.vocab, num_hidden_layers=a.layers, tie_word_embeddings=a.tie,
                         rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
                         max_position_embeddings=4096, dtype=a.dtype, architectures=["LlamaForCausalLM"])
    config.save_pretrained(a.out)

    esize = torch.empty(0, dtype=dtype).element_size()
    specs = [(i, n, s, k) for i, (n, s, k) in enumerate(llama_tensors(a))]
    limit, shards, size = a.max_shard_mb << 20, [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * esize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    total = sum(math.prod(s[2]) * esize for s in specs)
    for f in os.listdir(a.out):  # stale weights from an earlier run
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(a.out, f))
    if len(shards) == 1:
        write_shard(os.path.join(a.out, "model.safetensors"), shards[0], a, dtype)
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(os.path.join(a.out, fname), shard, a, dtype)
            weight_map.update({name: fname for _, name, _, _ in shard})
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    params = sum(math.prod(s[2]) for s in specs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {a.out}: {params / 1e6:.1f} M parameters, {total / 2**30:.2f} GiB {a.dtype} in {len(shards)} "
          f"file(s), {time.time() - t0:.1f} s, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
