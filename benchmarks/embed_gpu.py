"""Embedding throughput of all-MiniLM-L6-v2 on a GPU vs CPU, on the pipeline's own chunks.

The GPU machines lent to this project have PyTorch but not Keel's other dependencies, and a call
carries at most 64 MiB, so this runs in two steps:

  prepare (here)   tokenize chunks of the 10k corpus exactly as the index job does, and bundle the
                   token ids, the model's weights (fp16) and Keel's own CPU vectors (ONNX Runtime)
                   for the first chunks as the reference;
  run (anywhere)   embed the bundle with torch on the given device at fp32 and fp16 and several
                   batch sizes (length-sorted, as Keel batches), plus a same-machine CPU baseline,
                   and check agreement with the reference vectors.

The model is the transformers BertModel when transformers is installed, else a plain-torch
MiniLM forward (same layers and weights; `run --device cpu` here checks it matches Keel's vectors).

  python benchmarks/embed_gpu.py prepare [--chunks 20000] [--bundle benchmarks/data/gpu_bundle]
  python benchmarks/embed_gpu.py run --device cuda [--bundle ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it runs: `prepare` and the help need none of it
    import torch

    Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token ids, attention mask) -> hidden states

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "benchmarks" / "data" / "gpu_bundle"
RESULTS = ROOT / "benchmarks" / "results" / "embed_gpu.json"
CONFIG = {"hidden": 384, "heads": 12, "layers": 6, "eps": 1e-12}
CLS, SEP = 101, 102


def prepare(bundle: Path, n_chunks: int, n_ref: int) -> None:
    import torch
    from safetensors.numpy import load_file

    sys.path.insert(0, str(ROOT))
    from benchmarks.batch_pipeline import corpus
    from keel.pipeline.chunking import _tokenizer, chunk_text
    from keel.pipeline.documents import decode, format_of, split_file
    from keel.pipeline.embedding import MAX_TOKENS, Embedder, model_dir

    texts: list[str] = []
    for f in sorted(p for p in corpus(10_000).rglob("*") if p.is_file() and format_of(p.name)):
        for r in split_file(f.as_uri(), f.read_bytes()):
            d = decode(r.format, r.payload, 1 << 20)
            texts += [c.text for c in chunk_text(r.source, d.text or "", 200, 40)]
        if len(texts) >= n_chunks:
            break
    texts = texts[:n_chunks]
    tok = _tokenizer()
    ids = [[CLS, *tok.encode(t, add_special_tokens=False).ids[: MAX_TOKENS - 2], SEP] for t in texts]
    bundle.mkdir(parents=True, exist_ok=True)
    np.save(bundle / "ids.npy", np.concatenate([np.array(x, np.uint16) for x in ids]))
    np.save(bundle / "lengths.npy", np.array([len(x) for x in ids], np.int32))
    weights = {k: torch.from_numpy(v).half() for k, v in load_file(str(model_dir() / "model.safetensors")).items()
               if not k.startswith("pooler") and k != "embeddings.position_ids"}
    torch.save(weights, bundle / "weights_fp16.pt")
    cache = ROOT / ".keel" / "models"
    np.save(bundle / "reference.npy", Embedder("onnx", cache).encode(texts[:n_ref]))
    size = sum(p.stat().st_size for p in bundle.iterdir()) / 2**20
    print(f"bundle: {len(texts)} chunks, {sum(map(len, ids))} tokens, {size:.1f} MiB in {bundle}")


def _model(weights: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> tuple[Forward, str]:
    import torch.nn.functional as nnf

    w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    try:
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512, layer_norm_eps=1e-12)
        bert = BertModel(cfg, add_pooling_layer=False).to(device=device, dtype=dtype).eval()
        bert.load_state_dict(w, strict=False)

        def bert_forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return bert(input_ids=ids, attention_mask=mask).last_hidden_state

        return bert_forward, "transformers BertModel"
    except ImportError:
        pass

    hidden, heads, eps = CONFIG["hidden"], CONFIG["heads"], CONFIG["eps"]

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        return nnf.layer_norm(x, (hidden,), w[p + ".weight"], w[p + ".bias"], eps)

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return nnf.linear(x, w[p + ".weight"], w[p + ".bias"])

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:seq] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = ln(x, "embeddings.LayerNorm")
        keep = mask.bool()[:, None, None, :]
        for i in range(CONFIG["layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(x, p + f"attention.self.{n}").view(batch, seq, heads, -1).transpose(1, 2)
                       for n in ("query", "key", "value"))
            a = nnf.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(batch, seq, hidden)
            x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            x = ln(x + lin(nnf.gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
        return x

    return forward, "plain torch MiniLM"


def embed(forward: Forward, seqs: list[np.ndarray], batch: int, device: str) -> np.ndarray:
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros((len(seqs), CONFIG["hidden"]), np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            longest = max(len(seqs[i]) for i in idx)
            ids = np.zeros((len(idx), longest), np.int64)
            mask = np.zeros((len(idx), longest), np.int64)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])], mask[r, : len(seqs[i])] = seqs[i], 1
            ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            h = forward(ids_t, mask_t).float()
            m = mask_t[..., None].float()
            v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(v, dim=1).cpu().numpy()
    return out


def run(bundle: Path, device: str, out: Path, cpu_sample: int, repeats: int) -> None:
    import torch

    flat, lengths = np.load(bundle / "ids.npy").astype(np.int64), np.load(bundle / "lengths.npy")
    seqs = np.split(flat, np.cumsum(lengths)[:-1])
    weights = torch.load(bundle / "weights_fp16.pt")
    ref = np.load(bundle / "reference.npy")
    report: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "chunks": len(seqs),
                    "tokens": int(lengths.sum()), "runs": []}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; fp16 is the fast path
    report["cpu_threads"] = torch.get_num_threads()

    def measure(dev: str, dtype: torch.dtype, batch: int, data: list[np.ndarray]) -> dict[str, Any]:
        forward, impl = _model(weights, dev, dtype)
        embed(forward, data[:batch], batch, dev)  # warm up (kernels, allocator)
        times = []
        for _ in range(repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            vecs = embed(forward, data, batch, dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        cos = (vecs[: len(ref)] * ref[: len(data)]).sum(1)
        t = statistics.median(times)
        row = {"device": dev, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "chunks": len(data),
               "impl": impl, "median_s": round(t, 3), "chunks_per_s": round(len(data) / t, 1),
               "min_cos_vs_keel_cpu": round(float(cos.min()), 5), "mean_cos_vs_keel_cpu": round(float(cos.mean()), 6)}
        print(json.dumps(row), flush=True)
        report["runs"].append(row)
        return row

    base = measure("cpu", torch.float32, 64, seqs[:cpu_sample])
    if device == "cuda":
        for dtype in (torch.float32, torch.float16):
            for batch in (64, 256, 1024):
                measure("cuda", dtype, batch, seqs)
    best = max(report["runs"], key=lambda r: r["chunks_per_s"])
    report["best_vs_cpu"] = round(best["chunks_per_s"] / base["chunks_per_s"], 1)
    print(f"\nMiniLM embeddings, {report.get('gpu', 'cpu')}, torch {torch.__version__}")
    print(f"  {'device':<6} {'dtype':<8} {'batch':>5} {'chunks':>6} {'chunks/s':>10} {'min cos':>8}")
    for r in report["runs"]:
        print(f"  {r['device']:<6} {r['dtype']:<8} {r['batch']:>5} {r['chunks']:>6} {r['chunks_per_s']:>10} "
              f"{r['min_cos_vs_keel_cpu']:>8}")
    print(f"  best vs this machine's CPU (torch, {report['cpu_threads']} threads): {report['best_vs_cpu']}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--chunks", type=int, default=20_000)
    ap.add_argument("--reference", type=int, default=512, help="chunks with Keel's CPU vectors as reference")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-sample", type=int, default=2000, help="chunks the CPU baseline embeds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.step == "prepare":
        prepare(a.bundle, a.chunks, a.reference)
    else:
        run(a.bundle, a.device, a.out, a.cpu_sample, a.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
