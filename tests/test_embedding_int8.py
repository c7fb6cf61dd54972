"""The onnx-int8 embedding runtime: real MiniLM weights, quantized once and cached beside the fp32 graph."""

from __future__ import annotations

import shutil

import numpy as np

from keel.pipeline.embedding import DIM, INT8_RECIPE, Embedder, ensure_exported

TEXTS = [
    "refund policy for annual plans",
    "How do I reset the Halden hub when it stays offline after a firmware update?",
    "Patient reports painful swallowing and fever; rapid strep test positive, amoxicillin prescribed.",
    "x" * 3000,  # truncated at 256 word pieces
]
# Lowest cosine of an int8 vector to its fp32 one: 0.976 over the 2,462 chunks of the 1k-document corpus
# (benchmarks/embedding_int8.py), 0.983 on these texts; the floor leaves room for other CPUs' kernels.
COSINE_FLOOR = 0.97


def test_int8_vectors_are_unit_length_and_close_to_fp32(shared_state):
    fp32 = Embedder("onnx", shared_state / "models").encode(TEXTS)
    int8 = Embedder("onnx-int8", shared_state / "models").encode(TEXTS)
    assert int8.shape == (len(TEXTS), DIM) and int8.dtype == np.float32
    assert np.allclose(np.linalg.norm(int8, axis=1), 1, atol=1e-5)
    assert (int8 * fp32).sum(1).min() > COSINE_FLOOR
    assert Embedder("onnx-int8", shared_state / "models").encode([]).shape == (0, DIM)


def test_an_int8_vector_does_not_depend_on_its_batch(shared_state):
    """Dynamic quantization scales a call's activations over the call: one text per call keeps a text's vector
    the same in the index (embedded among others) and as a query (embedded alone)."""
    embedder = Embedder("onnx-int8", shared_state / "models")
    together = embedder.encode(TEXTS)
    alone = np.vstack([embedder.encode([t]) for t in TEXTS])
    assert np.array_equal(together, alone)


def test_the_quantized_graph_is_made_once_and_reused(shared_state, tmp_path):
    cache = tmp_path / "models"
    cache.mkdir()
    fp32 = ensure_exported(shared_state / "models")
    shutil.copy(fp32, cache / fp32.name)  # the fp32 export is another test's business; this one quantizes
    first = Embedder("onnx-int8", cache).encode(TEXTS[:2])
    (graph,) = cache.glob(f"*-{INT8_RECIPE}.onnx")
    made = graph.stat()
    second = Embedder("onnx-int8", cache).encode(TEXTS[:2])
    again = graph.stat()
    assert (again.st_ino, again.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)  # not rewritten (atomic rename)
    assert sorted(p.name for p in cache.iterdir()) == sorted([fp32.name, graph.name])  # no temporary left
    assert ensure_exported(cache, "onnx-int8") == graph
    assert np.array_equal(first, second)


def test_a_query_finds_its_own_document(shared_state):
    docs = {
        "refund": "Halden refunds devices and subscriptions in full within 30 days of purchase; after that, "
                  "annual plans are refunded pro rata and monthly plans are not refunded.",
        "wifi": "If your hub keeps dropping off Wi-Fi, move it closer to the router, use the 2.4 GHz band "
                "and make sure the router's firmware is current.",
        "camera": "To mount the outdoor camera, drill two holes, fix the bracket and point the lens away "
                  "from direct sunlight before pairing it in the app.",
        "rate": "The API allows 600 requests per minute per key; above that it answers 429 with a "
                "Retry-After header saying how long to wait.",
    }
    queries = {
        "refund": "Can I get my money back for an annual plan?",
        "wifi": "my hub loses its wireless connection",
        "camera": "how do I install the outdoor camera on a wall",
        "rate": "what happens when I send too many API requests",
    }
    embedder = Embedder("onnx-int8", shared_state / "models")
    index = embedder.encode(list(docs.values()))
    found = embedder.encode(list(queries.values())) @ index.T
    assert [list(docs)[i] for i in found.argmax(1)] == list(queries)
