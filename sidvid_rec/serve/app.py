"""The HTTP app of ``sidvid-rec serve``: FastAPI over an :class:`~sidvid_rec.export.serving.ExportedModel`.

Endpoints:

* ``POST /recommend`` ``{"history": [raw ids], "timestamps": [..] (optional), "query_time": T
  (optional), "k": 10, "decoder": "beam" (optional, COBRA exports)}`` -> ``{"items": [{"item_id",
  "title", "score"}, ...]}``, best first: exactly what ``sidvid-rec retrieve`` prints for the
  same arguments.
* ``GET /healthz`` -> ``{"ok": true, "export", "sha256" (of the manifest, which holds the sha256
  of every file), "mode", "items", "index"}``.
* ``GET /metrics`` -> counters: ``requests`` (answered by the model), ``batches`` (model calls),
  ``largest_batch``, ``model_seconds`` (time in model calls), ``rejected`` (4xx answers).

Every 4xx answer is ``{"error": "one line", "detail": [...]}``: 422 for a request that does
not fit the schema (wrong JSON types, empty history, ``k`` out of range, timestamps whose
length differs from the history's, unknown fields, malformed JSON) or names item ids the
export does not know (``detail`` lists them); 413 for a body over ``max_body_bytes``.

Requests are batched (:class:`~sidvid_rec.serve.batcher.Batcher`): concurrent requests are
collected for up to ``max_wait_ms`` or ``max_batch`` requests and answered by one call of
:meth:`~sidvid_rec.export.serving.ExportedModel.retrieve_many` on the single model thread.
"""

import contextlib
import json
from typing import Annotated, Any, AsyncIterator, Dict, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from sidvid_rec.errors import UserError
from sidvid_rec.export.serving import ExportedModel, Query
from sidvid_rec.serve.batcher import Batcher

MAX_K = 1000
"""Largest ``k`` a request may ask for (it is also capped at the catalogue size, as in retrieve)."""
MAX_HISTORY = 10_000
"""Most history items in one request (the encoder reads only the most recent ``max_len``)."""
DEFAULT_MAX_BODY_BYTES = 1 << 20
_INT64 = 2 ** 62  # timestamps stay far inside int64 (differences of them feed the time bias)

Timestamp = Annotated[StrictInt, Field(ge=-_INT64, le=_INT64)]


class RecommendRequest(BaseModel):
    """The body of ``POST /recommend``; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    history: List[Union[StrictInt, StrictStr]] = Field(
        min_length=1, max_length=MAX_HISTORY, description="the data set's raw item ids, oldest first")
    timestamps: Optional[List[Timestamp]] = Field(
        None, description="unix time of each history item (feeds the time bias); one per history item")
    query_time: Optional[Timestamp] = Field(None, description="time of the recommendation (default: the last item's)")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="items to return")
    decoder: Optional[Literal["direct", "neighbor", "soft", "beam"]] = Field(
        None, description="COBRA decoder (default: the run's eval.decoder); other modes take none")

    @model_validator(mode="after")
    def _timestamps_fit(self) -> "RecommendRequest":
        if self.timestamps is not None and len(self.timestamps) != len(self.history):
            raise ValueError(f"timestamps has {len(self.timestamps)} entries for {len(self.history)} history items")
        return self


class Stats:
    """Counters shown by ``/metrics`` (the batch counters live in the :class:`Batcher`)."""

    def __init__(self) -> None:
        self.rejected = 0


def _error(status: int, message: str, detail: Optional[List[Any]] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split()), "detail": detail or []}, status_code=status)


def _where(error: Dict[str, Any]) -> str:
    """``history.3`` for pydantic's ``("body", "history", 3)``; ``body (character N)`` for broken JSON."""
    loc = list(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        return f"body (character {loc[-1]})" if len(loc) > 1 else "body"
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any parsing
    (checked on Content-Length and again while the body streams in)."""

    def __init__(self, app: Any, limit: int, stats: Stats) -> None:
        self.app, self.limit, self.stats = app, limit, stats

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        self.stats.rejected += 1
        await _error(413, f"request body is larger than {self.limit} bytes")(scope, receive, send)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _answer(model: ExportedModel, queries: List[Query]) -> List[Any]:
    """Runs in the model thread: one batched call; if it fails on a user error (which the request
    checks should have caught), each query alone, so one bad query fails only its own request."""
    try:
        return [{"items": r.items} for r in model.retrieve_many(queries)]
    except UserError:
        out: List[Any] = []
        for q in queries:
            try:
                out.append({"items": model.retrieve_many([q])[0].items})
            except UserError as e:
                out.append(e)
        return out


def create_app(model: ExportedModel, sha256: str, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``model`` (already loaded and verified; ``sha256`` is its manifest's)."""
    batcher: Batcher[Query, Any] = Batcher(lambda qs: _answer(model, qs), max_batch, max_wait_ms / 1000.0)
    stats = Stats()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        await batcher.run_in_worker(lambda: model.retrieve_many([Query([model.raw_ids[1]], 1)]))  # warm-up
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="sidvid-rec serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes, stats=stats)
    app.state.batcher, app.state.stats, app.state.model = batcher, stats, model

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        stats.rejected += 1
        errors = [{"loc": _where(e), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        message = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5]) or "invalid request"
        return _error(422, message, errors)

    @app.post("/recommend")
    async def recommend(request: RecommendRequest) -> Any:
        unknown = model.unknown(request.history)
        if unknown:
            stats.rejected += 1
            shown = ", ".join(json.dumps(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            return _error(422, f"history: {len(unknown)} item id(s) not in this export's catalogue "
                               f"({model.num_items} items): {shown}",
                          [{"loc": "history", "msg": "unknown item id", "type": "unknown_item", "input": u}
                           for u in unknown[:100]])
        if request.decoder is not None and model.cobra is None:
            stats.rejected += 1
            return _error(422, f"decoder: applies to COBRA exports; this export is mode {model.mode}")
        query = Query(list(request.history), request.k, request.timestamps, request.query_time, request.decoder)
        try:
            return await batcher.submit(query)
        except UserError as e:
            stats.rejected += 1
            return _error(422, str(e))

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"ok": batcher.alive, "export": model.directory, "sha256": sha256, "mode": model.mode,
                "items": model.num_items, "index": model.index.kind}

    @app.get("/metrics")
    async def metrics() -> Dict[str, Any]:
        return {"requests": batcher.requests, "batches": batcher.batches, "largest_batch": batcher.largest_batch,
                "model_seconds": round(batcher.model_seconds, 3), "rejected": stats.rejected, "max_batch": batcher.max_batch, "max_wait_ms": max_wait_ms}

    return app
