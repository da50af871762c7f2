"""Errors of the HTTP API: the OpenAI error body, and the mapping from the mesh's errors to
HTTP statuses (404 unknown context, 413 too large, 400 bad input, 503 + Retry-After while the
mesh recovers, 504 a request past its deadline)."""

import ray
from fastapi.responses import JSONResponse

from expertmesh.errors import CapacityError, ContextNotFound, DeadlineExceeded, NoTokenizer, Unavailable


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _unavailable(message: str, retry_after_s: float = 2.0) -> ApiError:
    return ApiError(503, message, "service_unavailable", code="unavailable",
                    headers={"Retry-After": str(max(1, round(retry_after_s)))})


def api_error(exc: BaseException, param: str | None = None) -> ApiError | None:
    """The HTTP answer to an error from the mesh (None: not one of ours, a bug: 500)."""
    cause = _cause(exc)
    if isinstance(cause, ContextNotFound):
        return ApiError(404, str(cause), param=param, code="context_not_found")
    if isinstance(cause, CapacityError):
        return ApiError(413, str(cause), code="context_too_large")
    if isinstance(cause, DeadlineExceeded):
        return ApiError(504, str(cause), "timeout", code="deadline_exceeded")
    if isinstance(cause, Unavailable):
        return _unavailable(str(cause), cause.retry_after_s)
    if isinstance(cause, ray.exceptions.RayActorError):
        return _unavailable(f"the mesh is recovering from a failed actor ({type(cause).__name__}); retry shortly")
    if isinstance(cause, NoTokenizer):
        return ApiError(400, str(cause), code="no_tokenizer")
    if isinstance(cause, ValueError):
        return ApiError(400, str(cause), param=param)
    return None


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc if isinstance(exc, ray.exceptions.RayTaskError) else exc
