"""The vocabulary stage's one-token distillation in one process against ``N`` (torchrun): wall time and equality.

Every token of the query tokenizer's vocabulary (30,522 for all-MiniLM-L6-v2) is embedded alone by the document
route. Under torchrun each process distils ``1/N`` of the tokens and the rows are all-gathered
(:func:`st_daft.utils.distributed.compute_sharded`), so every process holds the whole table. This runs the real
all-MiniLM-L6-v2 route, without a document store (every token is encoded), one thread per process, and checks that
the gathered table equals the one-process one.

Usage::

    python benchmarks/distill_vocabulary_ranks.py --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """
import sys, time, torch
from st_daft import build_asymmetric_model
from st_daft.utils.distributed import get_rank, init_distributed
from st_daft.label_free.vocabulary import distill_token_embeddings, vocabulary_texts
from st_daft.models.asymmetric import get_route

torch.set_num_threads(1)
model = build_asymmetric_model(query_encoder="static", device="cpu")
init_distributed()
texts = vocabulary_texts(get_route(model, "query")[0])
started = time.perf_counter()
vectors = distill_token_embeddings(model, texts, show_progress_bar=False)
seconds = time.perf_counter() - started
if get_rank() == 0:
    torch.save({"vectors": vectors, "seconds": seconds, "tokens": len(texts)}, sys.argv[1])
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(processes: int, folder: Path) -> dict:
    script, result = folder / "worker.py", folder / f"distilled-{processes}.pt"
    script.write_text(WORKER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, str(script), str(result)]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(result),
        ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    import torch

    loaded = torch.load(result)
    loaded["process_seconds"] = time.perf_counter() - started
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/distill_vocabulary_ranks.json")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as folder:
        one = _run(1, Path(folder))
        many = _run(args.processes, Path(folder))
    difference = (one["vectors"] - many["vectors"]).abs().max().item()
    report = {
        "tokens": one["tokens"],
        "processes": args.processes,
        "distill_seconds_1_process": round(one["seconds"], 1),
        f"distill_seconds_{args.processes}_processes": round(many["seconds"], 1),
        "speedup": round(one["seconds"] / many["seconds"], 2),
        "max_abs_difference": difference,
        "equal_within_1e-5": bool(torch.allclose(one["vectors"], many["vectors"], atol=1e-5, rtol=1e-4)),
        "machine": "see docs/benchmarks.md",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
