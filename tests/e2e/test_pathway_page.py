"""The pathway page (GET /ui) in a real browser: Chromium (the distribution's package) driven by
Playwright. It asks for a tenant's key, shows that tenant's recent requests with their pathways
(shards per layer, pages, tokens per expert group) and a live map of the pool (shards, their
state and load, each context's segments), which changes when shards are added; no console
errors; another tenant sees none of the first one's requests."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

import expertmesh as em
from expertmesh.pipelines.serve import ExpertMeshServer
from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
APP, PREFIX, MESH = "pathways", "/pathways", "pathways"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "pathway-page.png"


@pytest.fixture(scope="module")
def app(server, tiny_checkpoint):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (make setup installs the distribution's package where it runs as "
                    "root with apt-get)")
    pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[test]')")
    tenants = {"tenants": [{"name": t, "api_key_sha256": hashlib.sha256(KEYS[t].encode()).hexdigest()}
                           for t in ("acme", "globex")]}
    serve.run(ExpertMeshServer.bind({"checkpoint": tiny_checkpoint("mixtral"), "context_shards": 2,
                                     "expert_groups": 2, "mesh_name": MESH, "max_completion_tokens": 32,
                                     "tenants": tenants}), name=APP, route_prefix=PREFIX)
    try:
        yield f"{server}{PREFIX}"
    finally:
        serve.delete(APP)
        em.Mesh.attach(MESH).shutdown(stop_actors=True)


def test_the_page_shows_a_tenants_pathways_and_the_pool_live(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    acme = {"Authorization": f"Bearer {KEYS['acme']}"}
    ctx = httpx.post(f"{app}/v1/contexts", headers=acme, timeout=120,
                     json={"text": "The lamp was lit at dusk. " * 30, "name": "lamp log"}).json()
    done = httpx.post(f"{app}/v1/completions", headers=acme, timeout=120, json={
        "model": "expertmesh", "prompt": " When was it lit?", "max_tokens": 8, "context_id": ctx["id"]}).json()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 720})
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{app}/ui")
            page.fill("#key", KEYS["acme"])
            page.click("#connect")
            request = page.locator(f'.request[data-id="{done["id"]}"]')
            expect(request).to_be_visible(timeout=20_000)  # the completion and its pathway
            assert request.locator(".cell.on").count() > 0  # shards it attended, per layer
            assert "group 0" in request.inner_text() and "shard 0 pages" in request.inner_text()
            expect(page.locator(f'.context[data-id="{ctx["id"]}"]')).to_contain_text("lamp log")
            expect(page.locator(".shard")).to_have_count(2)
            for shard in page.locator(".shard").all():  # its host, its KV in memory and in the store
                assert re.search(r"host \d+\.\d+\.\d+\.\d+\s+memory \d+\.\d MiB / [\d.]+ MiB, store \d+\.\d MiB",
                                 shard.inner_text()), shard.inner_text()
            em.Mesh.attach(MESH).add_shards(1)  # the pool map follows
            expect(page.locator(".shard")).to_have_count(3, timeout=20_000)
            expect(page.locator('.shard[data-index="2"]')).to_have_attribute("data-state", "ALIVE")
            page.screenshot(path=str(tmp_path / "pathway-page.png"))
            if os.environ.get("EXPERTMESH_WRITE_SCREENSHOT") == "1":  # the README's picture
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT))
            assert problems == [], problems

            other = browser.new_page()  # another tenant: none of acme's requests, nor its private context
            other.goto(f"{app}/ui")
            other.fill("#key", KEYS["globex"])
            other.click("#connect")
            expect(other.locator("#status")).to_contain_text("connected", timeout=20_000)
            assert other.locator(".request").count() == 0 and other.locator(".context").count() == 0
            bad = browser.new_page()  # a wrong key: the page says so
            bad.goto(f"{app}/ui")
            bad.fill("#key", "not-a-key")
            bad.click("#connect")
            expect(bad.locator("#status")).to_contain_text("API key", timeout=20_000)
        finally:
            browser.close()
    assert httpx.get(f"{app}/v1/pool", timeout=60).status_code == 401  # the API behind it needs a key too
