"""The FastAPI app of the Serve deployment (serve.py, serve_pool.py declare its routes) and
its error handlers: every error in OpenAI's shape (api_errors.py)."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.pipelines import openai_schema as oa
from expertmesh.pipelines.api_errors import ApiError, _error

_ERRORS = {s: {"model": oa.ErrorResponse} for s in (400, 401, 403, 404, 413, 429, 503)}

api = FastAPI(title="expertmesh", version="0.1.0",
              description="OpenAI-compatible inference over shared long contexts (Bearer API key per tenant).")


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    # the field's path; pydantic's names of union branches ("constrained-str", "list[int]") are not fields
    param = ".".join(str(p) for p in first.get("loc", ())[1:]
                     if isinstance(p, int) or re.fullmatch(r"[A-Za-z_]\w*", str(p))) or None
    # 400, as OpenAI's API and vLLM's server answer a malformed body (clients map 422 to another error)
    return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = exc.headers
    if exc.status_code == 405:  # Allow: every method the schema documents for the path (Starlette: one route's)
        headers = {**(headers or {}), "Allow": ", ".join(_allowed(request.app.openapi(), request.url.path))}
    return _error(exc.status_code, str(exc.detail), "invalid_request_error", headers=headers)


def _allowed(schema: dict, path: str) -> list[str]:
    for template, ops in schema["paths"].items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), path):
            return sorted(m.upper() for m in ops)
    return []
