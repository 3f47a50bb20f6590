"""The web console at /ui: server-rendered pages (Jinja2) whose data the browser fetches from the same /v1 API
with the API key the user signed in with. The key stays in the tab's sessionStorage (gone when the tab closes)
and is sent as a Bearer header like any client's, so every tenant rule of the API holds; the pages themselves
hold no data and need no key.

Everything a page loads is served from this machine: the console's own JS and CSS (service/console/static) and
plotly.js from the installed plotly package (its offline bundle). No request leaves the machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from domain.spec import Method, Optimizer, Precision
from domain.states import JobStatus
from planner.catalog import model_ids

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
ASSET_CACHE = {"Cache-Control": "public, max-age=3600"}
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


def plotly_bundle() -> Path:
    """plotly.js as the plotly package ships it for offline use (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the plotly package is not installed: pip install -e . installs it")
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


def _page(request: Request, template: str, **context) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return templates.TemplateResponse(request, template, {"root": root, **context})


@router.get("")
async def sign_in(request: Request) -> HTMLResponse:
    return _page(request, "signin.html", title="Sign in")


@router.get("/jobs")
async def jobs(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", title="Jobs", statuses=[status.value for status in JobStatus])


@router.get("/jobs/{job_id}")
async def job(request: Request, job_id: str) -> HTMLResponse:
    return _page(request, "job.html", title=job_id, job_id=job_id)


@router.get("/plan")
async def playground(request: Request) -> HTMLResponse:
    return _page(
        request,
        "plan.html",
        title="Planner",
        models=model_ids(),
        methods=[method.value for method in Method],
        precisions=[precision.value for precision in Precision],
        optimizers=[optimizer.value for optimizer in Optimizer],
    )


@router.get("/assets/{name}")
async def asset(name: str) -> FileResponse:
    """The console's own JS and CSS; plotly.min.js from the plotly package."""
    if name == "plotly.min.js":
        return FileResponse(plotly_bundle(), media_type="text/javascript", headers=ASSET_CACHE)
    files = {path.name: path for path in STATIC_DIR.iterdir()}  # never a path built from the request
    if name not in files:
        raise HTTPException(404, f"no console asset {name!r}")
    return FileResponse(files[name], headers=ASSET_CACHE)
