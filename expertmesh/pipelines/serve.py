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


import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import ray
from fastapi import Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask

from expertmesh.engine.request import Request as RouterRequest
from expertmesh.engine.request import Result
from expertmesh.model import generation_config
from expertmesh.model.chat_template import ChatTemplate
from expertmesh.model.grammar import Grammars
from expertmesh.pipelines import openai_logprobs, openai_stream, router_stream
from expertmesh.pipelines import openai_schema as oa
from expertmesh.pipelines.admission import Admission, AdmissionQueue
from expertmesh.pipelines.api_errors import ApiError, _unavailable, api_error
from expertmesh.pipelines.prompts import Prompts
from expertmesh.pipelines.serve_app import _ERRORS, api
from expertmesh.pipelines.serve_pool import SUMMARY as POOL_SUMMARY
from expertmesh.pipelines.serve_pool import PoolChange, PoolChanges
from expertmesh.pipelines.router_requests import RouterRequests
from expertmesh.pipelines.recent import RecentRequests
from expertmesh.pipelines.serve_settings import ServeSettings
from expertmesh.pipelines.tenant_limits import TenantLimits
from expertmesh.platform.router_set import RouterSet, call_timeout, no_answer
from expertmesh.platform.tenancy import ANONYMOUS, Tenants, load_tenants

RECOVER_TIMEOUT_S = 30.0  # how long a request waits for a restarting router before 503
UI_PAGE = Path(__file__).resolve().parents[1] / "assets" / "ui" / "pathways.html"


HEAD = {"node:__internal_head__": 0.001}  # Ray's resource of the head node


# graceful_shutdown_timeout_s: how long a stopping replica lets in-flight streams finish (drain)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, health_check_period_s=2,
                  graceful_shutdown_timeout_s=10, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class ExpertMeshServer(PoolChanges):
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
        # the checkpoint speaks for itself: its chat template, its sampling defaults (eos ids: the mesh's config)
        self.prompts = Prompts(self.mesh.tokenizer, self.mesh.config.vocab_size, s.max_prompt_tokens,
                               ChatTemplate.from_checkpoint(self.mesh.checkpoint), str(self.mesh.checkpoint))
        self.sampling_defaults = generation_config.sampling_defaults(self.mesh.checkpoint)
        cfg = self.mesh.config  # structured output's grammars are checked here, before admission
        self.requests = RouterRequests(Grammars(self.mesh.tokenizer, cfg.vocab_size, tuple(cfg.eos_token_id),
                                                cfg.bos_token_id), cfg.vocab_size, self.sampling_defaults)
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
        self.metrics = ServeMetrics([t.name for t in tenants.tenants] if tenants else [ANONYMOUS])
        self.queue = AdmissionQueue(self.limits, self.metrics, s.max_queue, self.holder, self.tenants)
        self.recent = RecentRequests()  # what the pathway page shows each tenant
        self.registering: dict[str, tuple[str, int]] = {}  # background registrations running: id -> (tenant, tokens)
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
            timeout_s = call_timeout(method, args)
            async for i in self.routers.attempts_async(RECOVER_TIMEOUT_S):
                try:
                    with self.routers.busy(i) as router:
                        ref = getattr(router, method).remote(*args)
                        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
                except asyncio.TimeoutError:
                    ray.cancel(ref)
                    raise no_answer(self.routers.name(i), method, timeout_s) from None
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
                                visibility=info.visibility, name=info.name, mode=info.mode, created=int(info.created),
                                chat=info.chat is not None)

    def _check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.settings.model_name!r}", param="model", code="model_not_found")

    async def _admit(self, req: RouterRequest, model: str) -> Admission:
        self._check_model(model)
        tenant, max_tokens = req.tenant, req.params.max_new_tokens
        if max_tokens > self.settings.max_completion_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of "
                           f"{self.settings.max_completion_tokens}", param="max_tokens")
        if req.context_id is not None:
            await self._visible(tenant, req.context_id)
        return await self.queue.admit(tenant, len(req.prompt_ids) + max_tokens)

    async def _admit_all(self, reqs: list[RouterRequest], model: str) -> list[Admission]:
        """Admit every request of one body, or none (those admitted are released)."""
        done: list[Admission] = []
        try:
            for req in reqs:
                done.append(await self._admit(req, model))
        except BaseException:
            for admission in done:
                admission.release(0)
            raise
        return done

    def _generate(self, admission: Admission, req: RouterRequest
                  ) -> AsyncIterator[tuple[str, tuple | None, Result | None]]:
        """(text delta, its tokens' log-probabilities or None, None) as tokens come, finally ("",
        None, result) (router_stream.py). Admission already done."""
        return router_stream.stream(self.routers, self.mesh.tokenizer.decode, self.metrics, admission, req,
                                    RECOVER_TIMEOUT_S, self.recent.record)

    @staticmethod
    def _usage(results: list[Result], n: int = 1) -> oa.Usage:
        """One body's usage: each prompt counted once (not once per choice, as vLLM), every completion."""
        p = sum(r.prompt_tokens for r in results) // n
        c = sum(r.completion_tokens for r in results)
        return oa.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                        context_tokens=max((r.context_tokens for r in results), default=0))

    def _decode_one(self, ids: list[int]) -> str:
        return self.mesh.tokenizer.decode(ids)

    def _choice_logprobs(self, chat: bool, req: RouterRequest, result: Result | None, lps, echo_ids, offset: int):
        """A choice's log-probabilities (None when not asked): the generated tokens' (lps), after
        the prompt's with echo."""
        if req.params.logprobs is None:
            return None
        lps = list(lps or ())
        if chat:
            return openai_logprobs.chat(self._decode_one, lps)
        ids = [e.token_id for e in lps]
        entries = list(lps)
        if echo_ids is not None:
            prompt_lps = list(result.prompt_logprobs) if result is not None and result.prompt_logprobs else []
            ids, entries = list(echo_ids) + ids, prompt_lps + entries
        return openai_logprobs.completion(self._decode_one, entries, ids, offset)

    def _sse(self, admissions: list[Admission], reqs: list[RouterRequest], chat: bool, include_usage: bool,
             echo: list[tuple[str, list[int]]] | None = None, n: int = 1) -> StreamingResponse:
        """Every choice's tokens as server-sent events (openai_stream.py)."""
        events = openai_stream.token_events(
            reqs[0].request_id, self.settings.model_name, [self._generate(a, r) for a, r in zip(admissions, reqs)],
            reqs, chat, include_usage, echo, n, self._choice_logprobs, self._usage)
        # released here too in case the client left before the stream started (release is idempotent)
        return StreamingResponse(events, media_type="text/event-stream",
                                 background=BackgroundTask(lambda: [a.release(0) for a in admissions]))

    async def _complete(self, admission: Admission, req: RouterRequest) -> tuple[str, Result]:
        parts, result = [], None
        async for delta, _, res in self._generate(admission, req):
            if res is not None:
                result = res
            else:
                parts.append(delta)
        return "".join(parts), result

    async def _complete_all(self, admissions: list[Admission], reqs: list[RouterRequest]
                            ) -> list[tuple[str, Result]]:
        """Every choice at once (the router batches them); one that fails fails the body."""
        tasks = [asyncio.ensure_future(self._complete(a, r)) for a, r in zip(admissions, reqs)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            for a in admissions:
                a.release(0)

    # -- routes ---------------------------------------------------------------------------
    @api.get("/healthz", summary="200 once the model is loaded")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.settings.model_name}

    @api.get("/v1/models", response_model=oa.ModelList, responses=_ERRORS)
    async def models(self, request: Request) -> oa.ModelList:
        self._tenant(request)
        return oa.ModelList(data=[oa.ModelCard(id=self.settings.model_name, created=self.created)])

    @api.post("/v1/contexts", status_code=201, response_model=oa.ContextObject,
              responses={**_ERRORS, 202: {"model": oa.ContextRegistration}})
    async def create_context(self, body: oa.ContextRequest, request: Request):
        tenant = self._tenant(request)
        chat = None
        if body.messages is not None:  # the conversation as the template renders it, no generation prompt
            messages = [m.for_template() for m in body.messages]
            ids = self.prompts.encode(self.prompts.render(messages, False), "messages")
            chat = json.dumps(messages)
        else:
            ids = self.prompts.encode(body.text, "text") if body.text is not None else list(body.token_ids)
        vocab = self.mesh.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"context token id {bad} is outside the vocabulary [0, {vocab})", param="token_ids")
        owned = sum(c.num_tokens for c in await self._router("list_contexts") if c.owner == tenant)
        owned += sum(n for owner, n in self.registering.values() if owner == tenant)  # this replica's, running
        limit = self.tenants.spec(tenant).max_context_tokens
        if owned + len(ids) > limit:
            raise ApiError(413, f"tenant {tenant!r} owns contexts of {owned} tokens; {len(ids)} more would pass "
                           f"its max_context_tokens of {limit}", code="context_quota_exceeded")
        if body.background:  # the router registers it whatever becomes of this request or its client
            cid = f"ctx-{uuid.uuid4().hex[:12]}"
            self.registering[cid] = (tenant, len(ids))
            task = asyncio.ensure_future(self._router("register_context", ids, body.mode, None, cid, tenant,
                                                      body.visibility, body.name, chat))
            task.add_done_callback(lambda t: (self.registering.pop(cid, None), t.cancelled() or t.exception()))
            view = oa.ContextRegistration(id=cid, status="registering", num_tokens=len(ids), tokens_done=0,
                                          tokens_per_s=0.0, eta_s=None)
            return JSONResponse(view.model_dump(), status_code=202,
                                headers={"Location": f"/v1/contexts/{cid}/registration"})
        info = await self._router("register_context", ids, body.mode, None, None, tenant, body.visibility, body.name,
                                  chat)
        return self._context_object(info)

    @api.get("/v1/contexts/{context_id}/registration", response_model=oa.ContextRegistration, responses=_ERRORS)
    async def context_registration(self, context_id: str, request: Request) -> oa.ContextRegistration:
        """A registration's progress (whichever router runs it knows); the context once ready."""
        tenant = self._tenant(request)
        views = await asyncio.gather(*(r.registration_progress.remote(context_id) for r in self.mesh.routers),
                                     return_exceptions=True)
        view = next((v for v in views if isinstance(v, dict)), None)
        if view is None or view["owner"] != tenant:  # never reveal another tenant's registration
            raise ApiError(404, f"no registration of context {context_id!r} is known (a router that restarted "
                           "forgets the ones it ran)", param="context_id", code="context_not_found")
        context = self._context_object(await self._visible(tenant, context_id)) if view["state"] == "ready" else None
        return oa.ContextRegistration(id=context_id, status=view["state"], num_tokens=view["num_tokens"],
                                      tokens_done=view["tokens_done"], tokens_per_s=view["tokens_per_s"],
                                      eta_s=view["eta_s"], error=view["error"], context=context)

    @api.get("/v1/pathways", responses=_ERRORS, summary="this tenant's recent requests and their pathways")
    async def pathways(self, request: Request, limit: int = Query(32, ge=1, le=64)) -> dict:
        """The requests this replica answered for the tenant, newest first: tokens, time to first
        token, and the pathway (shards per layer, pages from memory and store, tokens per group)."""
        return {"object": "list", "data": self.recent.of(self._tenant(request), limit)}

    @api.get("/v1/pool", responses=_ERRORS, summary="the context pool: shards, their state and load, segments")
    async def pool(self, request: Request) -> dict:
        """What `expertmesh pool status` shows, with the contexts this tenant may see: each shard
        (Ray's state, tokens held), each context's segments (which shard holds which tokens, stored
        or not), the routers, the expert groups and the expert placement's version."""
        tenant = self._tenant(request)
        pool = await self._router("pool")
        pool["segments"] = [c for c in pool["segments"] if c["owner"] == tenant or c["visibility"] == "shared"]
        pool["routers"] = len(self.mesh.routers)
        return pool

    @api.post("/v1/pool/{action}", responses=_ERRORS, summary=POOL_SUMMARY)
    async def change_pool(self, request: Request, action: str, body: PoolChange | None = None) -> dict:
        """One change of the pool while the mesh serves, for admin tenants (serve_pool.py)."""
        return await self._change_pool(self._tenant(request), action, body)

    @api.get("/ui", include_in_schema=False)
    async def ui(self) -> HTMLResponse:
        """The pathway page: it asks for the tenant's API key and reads /v1/pathways and /v1/pool."""
        return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"))

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
        self._check_model(body.model)
        if body.echo and body.context_id is not None:
            raise ApiError(400, "echo returns the prompt, and with context_id the context's tokens are not part of "
                           "it: give echo or context_id", param="echo")
        prompts = [self.prompts.prompt(p) for p in body.prompts()]
        logprobs = body.logprobs
        reqs = self.requests.build(body, prompts, tenant, body._max_new_tokens(16), logprobs,
                              logprobs if body.echo and logprobs is not None else None)
        admissions = await self._admit_all(reqs, body.model)
        echo = None
        if body.echo:  # the prompt as text (token-id prompts decoded), per choice
            echo = [(self.mesh.tokenizer.decode(ids), ids) for ids in prompts for _ in range(body.n)]
        if body.stream:
            return self._sse(admissions, reqs, chat=False,
                             include_usage=bool(body.stream_options and body.stream_options.include_usage), echo=echo,
                             n=body.n)
        done = await self._complete_all(admissions, reqs)
        choices = []
        for i, (req, (text, result)) in enumerate(zip(reqs, done)):
            head = echo[i][0] if echo else ""
            choices.append(oa.CompletionChoice(
                index=i, text=head + text, finish_reason=result.finish_reason,
                logprobs=self._choice_logprobs(False, req, result, result.logprobs, echo[i][1] if echo else None, 0)))
        results = [r for _, r in done]
        return oa.CompletionResponse(id=reqs[0].request_id, created=int(time.time()), model=self.settings.model_name,
                                     choices=choices, usage=self._usage(results, body.n), pathway=results[0].pathway)

    @api.post("/v1/chat/completions", response_model=oa.ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(self, body: oa.ChatCompletionRequest, request: Request):
        tenant = self._tenant(request)
        self._check_model(body.model)
        context = await self._visible(tenant, body.context_id) if body.context_id is not None else None
        ids, tools = self.prompts.chat(body, context)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reqs = self.requests.build(body, [ids], tenant, body._max_new_tokens(self.settings.max_completion_tokens),
                              logprobs, None, tools)
        admissions = await self._admit_all(reqs, body.model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream and not tools.active:
            return self._sse(admissions, reqs, chat=True, include_usage=include_usage, n=body.n)
        done = await self._complete_all(admissions, reqs)
        choices = []
        for i, (req, (text, result)) in enumerate(zip(reqs, done)):
            content, calls, finish = tools.parse(text, result.finish_reason)
            message = oa.AssistantMessage(content=content, tool_calls=[
                oa.ToolCall(id=c.id, function=oa.ToolCallFunction(name=c.name, arguments=c.arguments))
                for c in calls] or None)
            choices.append(oa.ChatChoice(index=i, message=message, finish_reason=finish,
                                         logprobs=self._choice_logprobs(True, req, result, result.logprobs, None, 0)))
        results = [r for _, r in done]
        if body.stream:  # calls are read from the whole answer: it comes as one chunk per choice
            return StreamingResponse(openai_stream.whole_answer(
                reqs[0].request_id, self.settings.model_name, choices, [r.pathway for r in results],
                [self._usage([r]) for r in results], self._usage(results, body.n), include_usage),
                media_type="text/event-stream")
        return oa.ChatCompletionResponse(
            id=reqs[0].request_id, created=int(time.time()), model=self.settings.model_name, choices=choices,
            usage=self._usage(results, body.n), pathway=results[0].pathway)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import_path ...serve:build_app)."""
    settings = ServeSettings(**(args or {}))
    return ExpertMeshServer.bind(settings.model_dump(exclude_none=True, exclude={"tenants"})
                                 | ({"tenants": settings.tenants.model_dump()} if settings.tenants else {}))


app = build_app()
