"""The reference embedder for `cargo bench --bench embedding`: sentence-transformers on torch (CPU), run on
the same chunks and batch sizes as the local model, in the same run. Installed by scripts/bench-torch.

Usage: torch_reference.py REQUEST.json, where the request is
{"model_dir": ..., "texts": [...], "batches": [1, 8, ...], "threads": [1, 2]}; prints one JSON object
{"<threads>/<batch>": chunks per second, ..., "ceiling/<threads>": GFLOP/s} on stdout, where the ceiling is
torch's own float32 matrix multiply (2048 x 2048, best of ten): what the machine gives the model's kind of work.
"""

import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main():
    with open(sys.argv[1]) as f:
        request = json.load(f)
    texts = request["texts"]
    # The model directory is a sentence-transformers one (modules.json: BERT, mean pooling, normalize);
    # the 256-token window is the model card's and the local embedder's.
    model = SentenceTransformer(request["model_dir"], device="cpu")
    model.max_seq_length = 256
    out = {}
    for threads in request["threads"]:
        torch.set_num_threads(threads)
        for batch in request["batches"]:
            n = max(batch * 4, 32)
            sample = (texts * (n // len(texts) + 1))[:n]
            with torch.inference_mode():
                model.encode(sample[:batch], batch_size=batch)  # warm-up
                started = time.perf_counter()
                model.encode(sample, batch_size=batch)
                took = time.perf_counter() - started
            out[f"{threads}/{batch}"] = n / took
        a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
        best = 0.0
        for _ in range(10):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * 2048**3 / (time.perf_counter() - started) / 1e9)
        out[f"ceiling/{threads}"] = best
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
