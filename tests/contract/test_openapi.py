"""The OpenAPI document itself: every response property typed, every error a declared problem, readable operation
ids, and the docs pages served from local assets. Walks whatever routes the app has, not a list of today's."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

JSON_TYPES = ("application/json", "application/problem+json")
# A schema node says what it holds with one of these.
TYPING_KEYS = ("type", "$ref", "anyOf", "allOf", "oneOf", "enum", "const")


@pytest.fixture(scope="module")
def schema(settings) -> dict:
    from service.app import create_app

    return create_app(settings).openapi()


def _operations(schema: dict):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield f"{method.upper()} {path}", operation


def _untyped(schema: dict, node: dict, where: str, seen: set[str]) -> list[str]:
    """Every place under `node` (through $refs, unions and containers) that declares no type."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        seen.add(name)
        return _untyped(schema, schema["components"]["schemas"][name], name, seen)
    if not any(key in node for key in TYPING_KEYS):
        return [where]
    found = []
    for key in ("anyOf", "allOf", "oneOf"):
        for i, option in enumerate(node.get(key, [])):
            found += _untyped(schema, option, f"{where}.{key}[{i}]", seen)
    for name, prop in node.get("properties", {}).items():
        found += _untyped(schema, prop, f"{where}.{name}", seen)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _untyped(schema, node[key], f"{where}.{key}", seen)
    return found


def test_every_response_property_has_a_type(schema):
    untyped, walked = [], 0
    for name, operation in _operations(schema):
        for status, response in operation["responses"].items():
            for media_type, content in response.get("content", {}).items():
                if media_type in JSON_TYPES:
                    assert "schema" in content, f"{name} {status} {media_type} declares no schema"
                if "schema" in content:
                    walked += 1
                    untyped += _untyped(schema, content["schema"], f"{name} {status}", set())
    assert walked > 10 and not untyped, untyped


def test_the_walker_finds_an_untyped_property(schema):
    """The walk reaches nested properties through a $ref and an anyOf: an untyped one there is reported."""
    doctored = {
        "components": {
            "schemas": {
                "Outer": {
                    "type": "object",
                    "properties": {"inner": {"anyOf": [{"$ref": "#/components/schemas/Inner"}, {"type": "null"}]}},
                },
                "Inner": {"type": "object", "properties": {"loose": {"description": "no type"}}},
            }
        }
    }
    assert _untyped(doctored, {"$ref": "#/components/schemas/Outer"}, "", set()) == ["Inner.loose"]


def test_job_fields_are_typed(schema):
    job = schema["components"]["schemas"]["JobOut"]["properties"]
    assert job["status"] == {"$ref": "#/components/schemas/JobStatus"}
    assert job["spec"]["$ref"] == "#/components/schemas/JobSpec"
    assert job["plan"]["$ref"] == "#/components/schemas/Plan"
    assert {"$ref": "#/components/schemas/Progress"} in job["progress"]["anyOf"]
    assert job["attempts"]["items"] == {"$ref": "#/components/schemas/AttemptOut"}
    assert job["created_at"]["format"] == "date-time"
    from domain.states import JobStatus

    assert schema["components"]["schemas"]["JobStatus"]["enum"] == [status.value for status in JobStatus]


def test_errors_are_declared_problems(schema):
    """No FastAPI HTTPValidationError anywhere: its 422 is answered as problem+json. A route that declares
    problem+json errors declares all of them so (OpenAI-compatible routes may declare another envelope)."""
    assert "HTTPValidationError" not in str(schema)
    problem_routes = 0
    for name, operation in _operations(schema):
        errors = {status: response for status, response in operation["responses"].items() if int(status) >= 400}
        media_types = {media for response in errors.values() for media in response.get("content", {})}
        if "application/problem+json" in media_types:
            problem_routes += 1
            for status, response in errors.items():
                if operation["operationId"] == "readyz" and status == "503":
                    continue  # a probe's answer, its checks as JSON, not an error
                assert list(response["content"]) == ["application/problem+json"], (name, status)
                assert response["content"]["application/problem+json"]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }, (name, status)
        for status, response in errors.items():
            assert response.get("content"), f"{name} {status} declares no body"
    assert problem_routes >= 8


def test_operation_ids_are_readable_and_unique(schema):
    ids = []
    for name, operation in _operations(schema):
        method = name.split()[0].lower()
        op_id = operation.get("operationId", "")
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", op_id), (name, op_id)
        # FastAPI's own ids end in the path and the method (healthz_healthz_get)
        assert not op_id.endswith(f"_{method}"), (name, op_id)
        ids.append(op_id)
    assert len(ids) == len(set(ids)) and {"submit_job", "get_job", "list_jobs", "cancel_job", "upload_file"} <= set(ids)


def test_upload_is_a_binary_file(schema):
    body = schema["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert form["properties"]["file"]["format"] == "binary"


class _AssetUrls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data):
        # Swagger UI's page names its spec and bundle inside a script, not as attributes
        self.urls += re.findall(r"""(?:url|spec-url)\s*[:=]\s*['"]([^'"]+)['"]""", data)
        self.urls += re.findall(r"https?://[^\s'\"<>)]+", data)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_only_local_assets(api, page):
    response = api.get(page)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    parser = _AssetUrls()
    parser.feed(response.text)
    assets = [url for url in parser.urls if url != "/openapi.json"]
    assert assets, response.text
    assert all(url.startswith("/") and not url.startswith("//") for url in parser.urls), parser.urls
    for url in assets:
        asset = api.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert any(url.endswith(".js") for url in assets)


def test_a_job_serves_its_spec_and_plan_as_the_declared_models(api, tiny_model, data_root):
    """spec and plan are served as stored, unvalidated: what was stored is exactly the JobSpec and the Plan
    the planner returns for it, so the declared models are what a client reads."""
    from domain.spec import JobSpec
    from planner import Plan

    (data_root / "contract.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 2)
    spec = {
        "base_model": str(tiny_model),
        "dataset": {"path": "contract.jsonl"},
        "training": {"max_steps": 1, "micro_batch_size": 1, "max_seq_length": 32},
    }
    submitted = api.post("/v1/jobs", json=spec)
    assert submitted.status_code == 201, submitted.text
    job = api.get(f"/v1/jobs/{submitted.json()['id']}").json()
    assert JobSpec.model_validate(job["spec"]).model_dump(mode="json") == job["spec"]
    assert Plan.model_validate(job["plan"]).model_dump(mode="json") == job["plan"]
    assert job["plan"] == api.post("/v1/plans", json=spec).json()
    assert job["status"] == "queued" and job["created_at"].endswith(("Z", "+00:00"))


def test_a_new_route_gets_problem_declarations_and_a_readable_id(settings):
    """What FastAPI declares on its own for a route added without `responses` (its 422) is a problem too."""
    from service.app import create_app

    app = create_app(settings)

    async def count_widgets(limit: int = 10) -> dict[str, int]:
        return {"limit": limit}

    app.add_api_route("/v1/widgets", count_widgets)
    operation = app.openapi()["paths"]["/v1/widgets"]["get"]
    assert operation["operationId"] == "count_widgets"
    assert list(operation["responses"]["422"]["content"]) == ["application/problem+json"]
    assert "HTTPValidationError" not in str(app.openapi())
