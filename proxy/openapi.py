"""Request bodies in the OpenAPI schema. The routes read and validate their bodies themselves (a size limit and a
timeout while reading, parsing off the event loop for big ones), so FastAPI cannot see them; each route names its
body model here instead, and the schema at /openapi.json describes it, for clients and for the fuzzer
(bench/fuzz.py, tests/proxy/test_fuzz.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
_MODELS: dict[str, type[BaseModel]] = {}  # every model a route names, for components/schemas

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
CLIENT_ERRORS = {
    "400": "invalid request: the parameter is named in error.param",
    "401": "missing or wrong credentials",
    "404": "not found",
    "408": "the body did not arrive in time",
    "413": "the body is over the size limit",
    "429": "over a budget or rate limit",
}


def body(model: type[BaseModel], *, partial: bool = False) -> dict[str, Any]:
    """`openapi_extra` for a route that reads `model` as its JSON body; `partial`: any subset of its fields (the
    admin API's PUT and PATCH change the named fields, the rest stay)."""
    _MODELS[model.__name__] = model
    schema: dict[str, Any] = {"$ref": REF.format(model=model.__name__)}
    if partial:
        own = model.model_json_schema(ref_template=REF)
        own.pop("$defs", None)
        schema = {**{k: v for k, v in own.items() if k != "required"}, "title": f"{model.__name__} (any fields)"}
    errors = {status: {"description": text, "content": {"application/json": {"schema": ERROR}}}
              for status, text in CLIENT_ERRORS.items()}  # fmt: skip
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": errors}  # fmt: skip


def install(app: FastAPI) -> None:
    """Make app.openapi() add the named body models (and the models they use) to components/schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _MODELS.items():
                own = model.model_json_schema(ref_template=REF)
                components.update(own.pop("$defs", {}))
                components[name] = own
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
