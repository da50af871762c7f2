"""Multi-tenant, OpenAI-compatible inference on Ray Serve over the shared context pool.

    serve run expertmesh.pipelines.serve:app                      # defaults, loopback use
    serve deploy deploy/serve_config.yaml                          # import_path: ...serve:build_app
    expertmesh serve --tenants tenants.yaml --port 8000            # the CLI way

The mesh (router, context shards, expert groups as Ray actors) outlives any one
`ExpertMeshServer` replica: the first replica starts it as named, detached actors and every
other replica (a second one, a replacement after a crash or a health-check failure, a
redeploy) attaches to it. Each replica authenticates a request to a tenant, admits it against
the tenant's limits (kept in one named `TenantLimits` actor, so they hold across replicas) and
the replica's queue, and streams tokens from the router, which batches all tenants' requests
together. A request whose router restarts under it runs again once (same tokens when greedy
or seeded); otherwise it gets 503 with `Retry-After`. `expertmesh serve` stops the mesh when
it stops; under `serve run`/`serve deploy` stop it with
`Mesh.attach(mesh_name).shutdown(stop_actors=True)`.
"""


import dataclasses
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.engine.request import Request as RouterRequest
from expertmesh.engine.request import Result
from expertmesh.pipelines import openai_schema as oa
from expertmesh.pipelines.api_errors import ApiError, _cause, _error, _unavailable, api_error
from expertmesh.pipelines.detokenize import TextStream
from expertmesh.pipelines.serve_settings import ServeSettings
from expertmesh.pipelines.tenant_limits import TenantLimits
from expertmesh.platform.router_set import RouterSet
from expertmesh.platform.tenancy import RateLimited, Tenants, load_tenants


RECOVER_TIMEOUT_S = 30.0  # how long a request waits for a restarting router before 503


_ERRORS = {s: {"model": oa.ErrorResponse} for s in (400, 401, 403, 404, 413, 429, 503)}

api = FastAPI(title="expertmesh", version="0.1.0",
              description="OpenAI-compatible inference over shared long contexts (Bearer API key per tenant).")


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _error(422, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)


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


HEAD = {"node:__internal_head__": 0.001}  # Ray's resource of the head node


def chat_prompt(messages: list[oa.ChatMessage]) -> str:
    """A plain chat layout for checkpoints without a chat template."""
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


class _Admission:
    """An admitted request's hold on the server queue and its tenant's limits (released once)."""

    def __init__(self, server: "ExpertMeshServer", tenant: str, reserved_tokens: int) -> None:
        self.server, self.tenant, self.reserved = server, tenant, reserved_tokens
        self.done = False

    def release(self, used_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        self.server.in_flight -= 1
        self.server.metrics.queue.set(self.server.in_flight)
        self.server.limits.release.remote(self.tenant, max(0, self.reserved - used_tokens) if used_tokens else 0,
                                          self.server.holder)


# graceful_shutdown_timeout_s: how long a stopping replica lets in-flight streams finish (drain)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, health_check_period_s=2,
                  graceful_shutdown_timeout_s=10, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class ExpertMeshServer:
    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        from expertmesh.platform.cluster import NAMESPACE
        from expertmesh.platform.mesh import Mesh
        from expertmesh.platform.metrics import ServeMetrics

        self.settings = ServeSettings(**(settings or {}))
        s = self.settings
        tenants = s.tenants or (load_tenants(s.tenants_file) if s.tenants_file else None)
        self.tenants = Tenants(tenants)  # authentication and specs; admission state is in self.limits
        self.mesh = Mesh.attach_or_start(s.mesh_name, s.start_timeout_s, spec=s.mesh_spec())
        self.routers = RouterSet(self.mesh.routers)  # requests spread over the mesh's routers
        api.openapi_schema = None
        api.openapi_schema = oa.declare_limits(api.openapi(), self.mesh.config.vocab_size, s.max_completion_tokens)
        self.holder = ray.get_runtime_context().get_actor_id() or uuid.uuid4().hex
        # the admission state every replica shares lives on the head, with Serve's controller: on a
        # preemptible worker, every admission would wait on it until Ray declared that host dead
        self.limits = TenantLimits.options(name=f"{s.mesh_name}.tenants", namespace=NAMESPACE, lifetime="detached",
                                           get_if_exists=True, resources=HEAD).remote(
            tenants.model_dump() if tenants else None)
        ray.get(self.limits.update.remote(tenants.model_dump() if tenants else None, self.holder,
                                          ray.get_runtime_context().current_actor))
        self.metrics = ServeMetrics()
        self.in_flight = 0
        self.created = int(time.time())

    # -- helpers --------------------------------------------------------------------------
    def _tenant(self, request: Request) -> str:
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")
        return tenant

    async def _router(self, method: str, *args: Any, param: str | None = None) -> Any:
        """A router call on the least busy router; if it dies under the call, the call runs on
        the mesh's other routers, then on the first once it is back (RouterSet's failover). The
        mesh's errors become API errors (404, 400, 413, 503 with Retry-After)."""
        try:
            async for i in self.routers.attempts_async(RECOVER_TIMEOUT_S):
                try:
                    with self.routers.busy(i) as router:
                        return await getattr(router, method).remote(*args)
                except ray.exceptions.RayActorError:
                    continue
            raise _unavailable("every router this request ran on failed under it; retry shortly")
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as the bug it is
            mapped = api_error(exc, param)
            if mapped is None:
                raise
            raise mapped from None

    async def _visible(self, tenant: str, context_id: str):
        try:
            info = await self._router("get_context", context_id)
        except ApiError as exc:
            if exc.code == "context_not_found":
                raise ApiError(404, f"context {context_id!r} not found", param="context_id",
                               code="context_not_found") from None
            raise
        if info.owner != tenant and info.visibility != "shared":  # never reveal another tenant's context
            raise ApiError(404, f"context {context_id!r} not found", param="context_id", code="context_not_found")
        return info

    @staticmethod
    def _context_object(info) -> oa.ContextObject:
        return oa.ContextObject(id=info.id, num_tokens=info.num_tokens, shards=list(info.shards), owner=info.owner,
                                visibility=info.visibility, name=info.name, mode=info.mode, created=int(info.created))

    def _encode(self, text: str, param: str) -> list[int]:
        if not getattr(self.mesh.tokenizer, "available", True):  # token ids in, but text comes out
            raise ApiError(400, self.mesh.tokenizer.reason, param=param, code="no_tokenizer")
        return self.mesh.tokenizer.encode(text)

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if not getattr(self.mesh.tokenizer, "available", True):  # completions return text
            raise ApiError(400, f"{self.mesh.tokenizer.reason} (the Python API: Mesh.generate); completions "
                           "return text", param="prompt", code="no_tokenizer")
        ids = self._encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        vocab = self.mesh.config.vocab_size
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        if len(ids) > self.settings.max_prompt_tokens:
            raise ApiError(413, f"prompt of {len(ids)} tokens is over the limit of "
                           f"{self.settings.max_prompt_tokens} tokens", param="prompt", code="prompt_too_long")
        return ids

    @staticmethod
    def _request(body: oa._Sampling, ids: list[int], tenant: str) -> RouterRequest:
        """The router's request for an OpenAI body: built here, whole, before admission."""
        try:
            return RouterRequest(ids, body.context_id, body.sampling_params(), tenant,
                                 f"cmpl-{uuid.uuid4().hex[:24]}", body.top_shards, body.top_pages)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def _admit(self, req: RouterRequest, model: str) -> "_Admission":
        if model != self.settings.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.settings.model_name!r}", param="model", code="model_not_found")
        tenant, max_tokens = req.tenant, req.params.max_new_tokens
        if max_tokens > self.settings.max_completion_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of "
                           f"{self.settings.max_completion_tokens}", param="max_tokens")
        if req.context_id is not None:
            await self._visible(tenant, req.context_id)
        if self.in_flight >= self.settings.max_queue:
            self.metrics.refused.inc(1, {"tenant": tenant, "status": "503"})
            raise ApiError(503, f"server queue is full ({self.settings.max_queue} requests); retry later",
                           "server_overloaded", code="queue_full")
        self.in_flight += 1  # the slot is taken before awaiting the limits actor: concurrent requests see it
        reserve = len(req.prompt_ids) + max_tokens
        try:
            await self.limits.acquire.remote(tenant, reserve, self.holder)
        except Exception as exc:  # noqa: BLE001 - RateLimited arrives wrapped by Ray
            self.in_flight -= 1
            if not isinstance(_cause(exc), RateLimited):
                raise
            self.metrics.refused.inc(1, {"tenant": tenant, "status": "429"})
            raise ApiError(429, str(_cause(exc)), "rate_limit_exceeded", code="rate_limit_exceeded") from None
        self.metrics.queue.set(self.in_flight)
        return _Admission(self, tenant, reserve)

    async def _generate(self, admission: "_Admission", req: RouterRequest) -> AsyncIterator[tuple[str, Result | None]]:
        """Yield (text delta, None) per token and finally ("", result). Admission already done."""
        text = TextStream(self.mesh.tokenizer.decode, list(req.params.stop))
        result: Result | None = None
        # a request whose router dies under it runs again (RouterSet's failover); tokens already
        # sent are skipped, so it goes on where it was when its tokens are reproducible (greedy or seeded)
        replayable = req.params.temperature == 0 or req.params.seed is not None
        sent, attempt = 0, 0
        try:
            async for i in self.routers.attempts_async(RECOVER_TIMEOUT_S):
                skip = sent
                try:
                    with self.routers.busy(i) as router:  # counted while it streams: who is least busy
                        this = dataclasses.replace(req, request_id=f"{req.request_id}-{attempt}") if attempt else req
                        gen = router.stream.options(num_returns="streaming").remote(this)
                        async for ref in gen:
                            item = await ref
                            if isinstance(item, Result):
                                result = item
                                continue
                            tokens = item.token_ids[skip:]
                            skip = max(0, skip - len(item.token_ids))
                            sent += len(tokens)
                            if text.stopped or not tokens:
                                continue
                            delta = "".join(text.push(t) for t in tokens if not text.stopped)
                            if text.stopped:
                                await router.cancel.remote(this.request_id)
                            if delta:
                                yield delta, None
                    break
                except ray.exceptions.RayActorError:
                    if sent and not replayable:
                        raise _unavailable("the router restarted under this request; retry it") from None
                    attempt += 1
            else:
                raise _unavailable("every router this request ran on failed under it; retry shortly")
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as the bug it is
            mapped = api_error(exc, "context_id")
            if mapped is None:
                raise
            raise mapped from None
        finally:
            admission.release(len(req.prompt_ids) + (result.completion_tokens if result is not None else 0))
        tail = text.flush()
        if tail:
            yield tail, None
        result = dataclasses.replace(result, request_id=req.request_id,
                                     finish_reason="stop" if text.stopped else result.finish_reason)
        self.metrics.record(admission.tenant, result)
        yield "", result

    @staticmethod
    def _usage(result: Result) -> oa.Usage:
        p, c = result.prompt_tokens, result.completion_tokens
        return oa.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, context_tokens=result.context_tokens)

    def _sse(self, admission: "_Admission", req: RouterRequest, chat: bool) -> StreamingResponse:
        created = int(time.time())

        async def events() -> AsyncIterator[str]:
            rid = None
            first = True
            try:
                async for delta, result in self._generate(admission, req):
                    if result is not None:
                        rid = result.request_id
                        end = self._chunk(rid, created, "", chat, result.finish_reason, first=False)
                        end["usage"] = self._usage(result).model_dump()
                        end["pathway"] = result.pathway
                        yield f"data: {json.dumps(end)}\n\n"
                        break
                    yield f"data: {json.dumps(self._chunk(rid or 'cmpl', created, delta, chat, None, first))}\n\n"
                    first = False
            except ApiError as exc:
                err = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
                yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"

        # released here too in case the client left before the stream started (release is idempotent)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(admission.release, 0))

    def _chunk(self, rid: str, created: int, delta: str, chat: bool, finish: str | None, first: bool) -> dict:
        if chat:
            d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.settings.model_name,
                    "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
        return {"id": rid, "object": "text_completion", "created": created, "model": self.settings.model_name,
                "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]}

    async def _complete(self, admission: "_Admission", req: RouterRequest) -> tuple[str, Result]:
        parts, result = [], None
        async for delta, res in self._generate(admission, req):
            if res is not None:
                result = res
            else:
                parts.append(delta)
        return "".join(parts), result

    # -- routes ---------------------------------------------------------------------------
    @api.get("/healthz", summary="200 once the model is loaded")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.settings.model_name}

    @api.get("/v1/models", response_model=oa.ModelList, responses=_ERRORS)
    async def models(self, request: Request) -> oa.ModelList:
        self._tenant(request)
        return oa.ModelList(data=[oa.ModelCard(id=self.settings.model_name, created=self.created)])

    @api.post("/v1/contexts", status_code=201, response_model=oa.ContextObject, responses=_ERRORS)
    async def create_context(self, body: oa.ContextRequest, request: Request) -> oa.ContextObject:
        tenant = self._tenant(request)
        ids = self._encode(body.text, "text") if body.text is not None else list(body.token_ids)
        vocab = self.mesh.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"context token id {bad} is outside the vocabulary [0, {vocab})", param="token_ids")
        owned = sum(c.num_tokens for c in await self._router("list_contexts") if c.owner == tenant)
        limit = self.tenants.spec(tenant).max_context_tokens
        if owned + len(ids) > limit:
            raise ApiError(413, f"tenant {tenant!r} owns contexts of {owned} tokens; {len(ids)} more would pass "
                           f"its max_context_tokens of {limit}", code="context_quota_exceeded")
        info = await self._router("register_context", ids, body.mode, None, None, tenant, body.visibility, body.name)
        return self._context_object(info)

    @api.get("/v1/contexts", response_model=oa.ContextList, responses=_ERRORS)
    async def list_contexts(self, request: Request) -> oa.ContextList:
        tenant = self._tenant(request)
        infos = await self._router("list_contexts")
        return oa.ContextList(data=[self._context_object(i) for i in infos
                                    if i.owner == tenant or i.visibility == "shared"])

    @api.get("/v1/contexts/{context_id}", response_model=oa.ContextObject, responses=_ERRORS)
    async def get_context(self, context_id: str, request: Request) -> oa.ContextObject:
        return self._context_object(await self._visible(self._tenant(request), context_id))

    @api.delete("/v1/contexts/{context_id}", responses=_ERRORS)
    async def delete_context(self, context_id: str, request: Request) -> dict:
        tenant = self._tenant(request)
        info = await self._visible(tenant, context_id)
        if info.owner != tenant:
            raise ApiError(403, f"context {context_id!r} belongs to another tenant; only its owner may delete it",
                           "permission_error")
        await self._router("drop_context", context_id, param="context_id")
        return {"id": context_id, "object": "context", "deleted": True}

    @api.post("/v1/completions", response_model=oa.CompletionResponse, responses=_ERRORS)
    async def completions(self, body: oa.CompletionRequest, request: Request):
        tenant = self._tenant(request)
        req = self._request(body, self._encode_prompt(body.prompt), tenant)
        admission = await self._admit(req, body.model)
        if body.stream:
            return self._sse(admission, req, chat=False)
        text, result = await self._complete(admission, req)
        return oa.CompletionResponse(
            id=result.request_id, created=int(time.time()), model=self.settings.model_name,
            choices=[oa.CompletionChoice(text=text, finish_reason=result.finish_reason)],
            usage=self._usage(result), pathway=result.pathway)

    @api.post("/v1/chat/completions", response_model=oa.ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(self, body: oa.ChatCompletionRequest, request: Request):
        tenant = self._tenant(request)
        req = self._request(body, self._encode_prompt(chat_prompt(body.messages)), tenant)
        admission = await self._admit(req, body.model)
        if body.stream:
            return self._sse(admission, req, chat=True)
        text, result = await self._complete(admission, req)
        return oa.ChatCompletionResponse(
            id=result.request_id, created=int(time.time()), model=self.settings.model_name,
            choices=[oa.ChatChoice(message=oa.AssistantMessage(content=text), finish_reason=result.finish_reason)],
            usage=self._usage(result), pathway=result.pathway)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import_path ...serve:build_app)."""
    settings = ServeSettings(**(args or {}))
    return ExpertMeshServer.bind(settings.model_dump(exclude_none=True, exclude={"tenants"})
                                 | ({"tenants": settings.tenants.model_dump()} if settings.tenants else {}))


app = build_app()
