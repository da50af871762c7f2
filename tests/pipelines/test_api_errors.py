"""The mesh's errors map to the HTTP statuses the API documents (no Ray cluster needed)."""

from expertmesh.errors import CapacityError, ContextNotFound, DeadlineExceeded, Unavailable
from expertmesh.pipelines.api_errors import api_error


def test_each_error_gets_its_status():
    cases = [(ContextNotFound("context 'x' is not registered"), 404), (CapacityError("too big"), 413),
             (ValueError("bad"), 400), (Unavailable("recovering"), 503),
             (DeadlineExceeded("missed its deadline by 0.5 s"), 504)]
    for exc, status in cases:
        err = api_error(exc)
        assert err is not None and err.status == status and err.message == str(exc), (exc, err)
    assert api_error(DeadlineExceeded("late")).code == "deadline_exceeded"
    assert api_error(RuntimeError("a bug")) is None  # a 500, not dressed as one of ours
