"""Serve an index folder over HTTP: ``GET /search?q=...&k=10&fuse=1`` answers with the best documents, as JSON.

A Starlette app around :class:`st_daft.serving.Searcher` (no torch in the process), run by uvicorn. Install the
``serve`` extra: ``pip install "st-daft[serve]"``. Build an index first::

    st-daft index runs/scifact-route --data ../shared/data/scifact --output scifact-index --bm25
    python examples/serve_search.py scifact-index --port 8000
    curl 'http://127.0.0.1:8000/search?q=statins+reduce+mortality&k=3&fuse=1'

``GET /health`` reports the index's size. The searcher answers one request at a time (a lock: faiss and bm25s
calls release the GIL but their objects are not meant to be shared by concurrent calls); a query costs well under a
millisecond, so the lock is not what limits throughput.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from st_daft.serving import Searcher

MAX_K = 1000
MAX_QUERY_CHARACTERS = 4096


def create_app(searcher: Searcher) -> Starlette:
    """The HTTP app serving ``searcher``: ``/search`` (``q``, ``k``, ``fuse``: 1 for BM25 fusion, or its weight)
    and ``/health``."""
    lock = threading.Lock()

    def _error(message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=400)

    def search(request: Request) -> JSONResponse:
        query = request.query_params.get("q")
        if query is None:
            return _error("missing query parameter q")
        if len(query) > MAX_QUERY_CHARACTERS:
            return _error(f"q is longer than {MAX_QUERY_CHARACTERS} characters")
        try:
            k = int(request.query_params.get("k", 10))
            fuse_text = request.query_params.get("fuse")
            fuse: Any = None if fuse_text in (None, "", "0") else (True if fuse_text == "1" else float(fuse_text))
        except ValueError:
            return _error("k must be an integer and fuse 0, 1 or a weight")
        if not 1 <= k <= MAX_K:
            return _error(f"k must be between 1 and {MAX_K}")
        if fuse is not None and searcher.lexical is None:
            return _error("this index has no BM25 index: fuse is not available")
        try:
            with lock:
                ids, scores = searcher.search(query, k=k, fuse_bm25=fuse)
        except ValueError as error:
            return _error(str(error))
        hits = [{"id": doc, "score": round(float(score), 6)} for doc, score in zip(ids, scores)]
        return JSONResponse({"query": query, "hits": hits})

    def health(request: Request) -> JSONResponse:
        return JSONResponse({"documents": len(searcher), "bm25": searcher.lexical is not None})

    # Plain (sync) handlers: Starlette runs them in its thread pool, so the event loop never waits on a search.
    return Starlette(routes=[Route("/search", search), Route("/health", health)])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("index", type=Path, help="index folder written by `st-daft index`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(Searcher.load(args.index)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
