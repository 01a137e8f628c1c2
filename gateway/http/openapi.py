"""The OpenAPI 3.1 description of the whole HTTP API, served at GET /openapi.json.

Hand-written on purpose: the routes are plain aiohttp handlers, so nothing could derive the spec from
them. tests/test_openapi.py keeps it true (every route of the app is here and nothing else is) and
fuzzes the live gateway against it with Schemathesis.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.http.appkeys import SETTINGS
from gateway.http.auth import public
from gateway.http.errors import json_response

Schema = dict[str, Any]

_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_LIST = {"type": "object", "required": ["object", "data"],
         "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}}}
# Statuses any authenticated route may answer with, besides its own: bad input, auth, unknown id,
# method, body limit, and a dependency (Redis, the runtime) that is down right now.
_COMMON_ERRORS = (400, 401, 404, 405, 408, 413, 503)
_TEXT = {
    400: "Bad request (the message names the parameter)", 401: "Missing or invalid API key, or missing scope",
    403: "Forbidden", 404: "Not found", 405: "Method not allowed", 408: "Body too slow (CLIENT_BODY_TIMEOUT)",
    409: "Conflict with the current state",
    410: "Gone (upload expired)", 412: "Tus-Resumable version not supported",
    413: "Body larger than the limit", 415: "Unsupported media type", 422: "Unprocessable",
    423: "Locked (another request is writing this upload)", 460: "Checksum mismatch",
    502: "The runtime broke the connection", 503: "A dependency is unavailable (Retry-After may say when)",
    504: "The runtime did not answer in time", 507: "Insufficient storage",
}


def _obj(*required: str, **props: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": props}


def _json(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _op(summary: str, scope: str | None, ok: dict[int, Any], *, errors: tuple[int, ...] = (),
        params: tuple[Schema, ...] = (), body: dict[str, Any] | None = None, tag: str = "") -> Schema:
    """One operation; `ok` maps a success status to a JSON schema, "html", "empty" or a content dict."""
    responses: dict[str, Any] = {}
    for status, content in ok.items():
        entry: dict[str, Any] = {"description": "Success"}
        if content == "html":
            entry["content"] = {"text/html": {"schema": {"type": "string"}}}
        elif content == "empty":
            pass
        elif isinstance(content, dict) and "schema" not in content and any("/" in k for k in content):
            entry["content"] = content
        elif content is not None:
            entry["content"] = _json(content)
        responses[str(status)] = entry
    codes = sorted(set((*(_COMMON_ERRORS if scope else (404, 405)), *errors)))
    for status in codes:
        responses.setdefault(str(status), {"description": _TEXT.get(status, "Error"), "content": _json(_ERROR_REF)})
    operation: Schema = {"summary": summary, "tags": [tag] if tag else [], "responses": responses,
                         "parameters": list(params)}
    operation["security"] = [{"bearer": []}] if scope else []
    if scope:
        operation["x-required-scope"] = scope
    if body is not None:
        operation["requestBody"] = body
    return operation


def _path_param(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def _query(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _header(name: str, schema: Schema, required: bool = False) -> Schema:
    return {"name": name, "in": "header", "required": required, "schema": schema}


def _json_body(schema: Schema, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": _json(schema)}


_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})
_AFTER = _query("after", {"type": "string"})
_TUS = _header("Tus-Resumable", {"type": "string", "enum": ["1.0.0"]}, required=True)
_UPLOAD_ERRORS = (403, 409, 410, 412, 415, 423, 460, 507)


def build_spec(realtime_model: str = "my-org/my-model") -> Schema:
    """The OpenAPI document; `realtime_model` is used in the examples so they hit the served model."""
    model = {"type": "string", "minLength": 1, "example": realtime_model}
    completion_req: dict[str, Any] = {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": model, "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1}]},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 64}, "stream": {"type": "boolean"},
        "stream_options": {"type": "object"}, "n": {"type": "integer", "minimum": 1, "maximum": 4}},
        "example": {"model": realtime_model, "prompt": "Hello", "max_tokens": 4}}
    chat_req: dict[str, Any] = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": model, "messages": {"type": "array", "minItems": 1, "items": _obj(
            "role", "content", role={"type": "string"}, content={"type": "string"})},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 64}, "stream": {"type": "boolean"},
        "stream_options": {"type": "object"}},
        "example": {"model": realtime_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}}
    batch_extra = {"priority": {"type": "integer", "minimum": -100, "maximum": 100},
                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}
    batch_completion_req = {**completion_req, "properties": {**completion_req["properties"], **batch_extra}}
    batch_chat_req = {**chat_req, "properties": {**chat_req["properties"], **batch_extra}}
    completion_ok = {"application/json": {"schema": {"$ref": "#/components/schemas/Completion"}},
                     "text/event-stream": {"schema": {"type": "string"}}}
    realtime_errors = (409, 415, 422, 429, 502, 504)
    job = {"$ref": "#/components/schemas/Job"}
    file_obj = {"$ref": "#/components/schemas/File"}
    batch_obj = {"$ref": "#/components/schemas/Batch"}
    run = {"$ref": "#/components/schemas/EvalRun"}
    job_filters = (_query("status", {"type": "string"}), _query("model", {"type": "string"}), _LIMIT, _AFTER)
    paths: dict[str, dict[str, Schema]] = {
        "/openapi.json": {"get": _op("This document", None, {200: {"type": "object"}}, tag="system")},
        "/health": {"get": _op("Liveness", None, {200: _obj("status")}, tag="system")},
        "/ready": {"get": _op("Readiness: runtime and Redis", None, {200: {"type": "object"}},
                              errors=(503,), tag="system")},
        "/metrics": {"get": _op("Prometheus metrics", "monitor",
                                {200: {"text/plain": {"schema": {"type": "string"}}}}, tag="system")},
        "/monitor/key_usage": {"get": _op("Usage per key for one UTC day", "monitor", {200: _LIST}, params=(
            _LIMIT, _query("bucket", {"type": "string", "pattern": "^[0-9]{8}$"})), tag="monitor")},
        "/v1/completions": {"post": _op("Completion (OpenAI), proxied to the runtime", "realtime",
                                        {200: completion_ok}, errors=realtime_errors,
                                        body=_json_body(completion_req), tag="realtime")},
        "/v1/chat/completions": {"post": _op("Chat completion (OpenAI), proxied to the runtime", "realtime",
                                             {200: completion_ok}, errors=realtime_errors,
                                             body=_json_body(chat_req), tag="realtime")},
        "/v1/models": {"get": _op("Models served", "realtime", {200: _LIST}, errors=(502, 504), tag="realtime")},
        "/v1/batch/completions": {"post": _op("Queue a completion job", "batch", {202: job}, errors=(409,),
                                              body=_json_body(batch_completion_req), tag="batch")},
        "/v1/batch/chat/completions": {"post": _op("Queue a chat completion job", "batch", {202: job},
                                                   errors=(409,), body=_json_body(batch_chat_req), tag="batch")},
        "/v1/jobs": {"get": _op("The caller's jobs", "batch", {200: _LIST}, params=job_filters, tag="batch")},
        "/v1/jobs/{job_id}": {
            "get": _op("One job", "batch", {200: job}, params=(_path_param("job_id"),), tag="batch"),
            "delete": _op("Cancel a job", "batch", {200: job}, errors=(409,), params=(_path_param("job_id"),),
                          tag="batch")},
        "/eval/runs": {
            "post": _op("Start an eval run", "eval", {202: run}, errors=(409,), tag="eval",
                        body=_json_body({"type": "object", "properties": {
                            "harness": {"type": "string", "enum": ["eval-repo", "euroeval"]},
                            "eval": {"type": "string"}, "model": model, "priority": {"type": "integer"},
                            "options": {"type": "object"}}})),
            "get": _op("Eval runs", "eval", {200: _LIST}, params=(
                _query("status", {"type": "string"}), _LIMIT, _AFTER), tag="eval")},
        "/eval/runs/{run_id}": {"get": _op("One eval run", "eval", {200: run}, params=(
            _path_param("run_id"), _query("samples", {"type": "string", "enum": ["0", "1", "true", "false"]})),
            tag="eval")},
        "/eval/runs/{run_id}/cancel": {"post": _op("Cancel an eval run", "eval", {200: run}, errors=(409,),
                                                   params=(_path_param("run_id"),), tag="eval")},
        "/eval/evals": {"get": _op("Evals the eval-repo offers", "eval", {200: _LIST}, params=(
            _query("base_model", {"type": "string", "enum": ["0", "1", "true", "false"]}),), tag="eval")},
        "/v1/files": {
            "post": _op("Upload a JSONL file for batches (multipart)", "batch", {200: file_obj}, errors=(415, 507),
                        tag="files", body={"required": True, "content": {"multipart/form-data": {"schema": _obj(
                            "file", "purpose", file={"type": "string", "format": "binary"},
                            purpose={"type": "string", "enum": ["batch"]})}}}),
            "get": _op("The caller's files", "batch", {200: _LIST}, params=(
                _query("purpose", {"type": "string"}), _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                _LIMIT, _AFTER), tag="files")},
        "/v1/files/{file_id}": {
            "get": _op("One file", "batch", {200: file_obj}, params=(_path_param("file_id"),), tag="files"),
            "delete": _op("Delete a file", "batch", {200: _obj("id", "deleted")}, errors=(409,),
                          params=(_path_param("file_id"),), tag="files")},
        "/v1/files/{file_id}/content": {"get": _op("A file's bytes", "batch", {
            200: {"application/octet-stream": {"schema": {"type": "string"}},
                  "application/jsonl": {"schema": {"type": "string"}}}},
            params=(_path_param("file_id"),), tag="files")},
        "/v1/batches": {
            "post": _op("Create a batch from an uploaded file", "batch", {200: batch_obj}, errors=(409,),
                        tag="batches", body=_json_body(_obj(
                            "input_file_id", "endpoint", input_file_id={"type": "string"},
                            endpoint={"type": "string", "enum": ["/v1/completions", "/v1/chat/completions"]},
                            completion_window={"type": "string", "enum": ["24h"]},
                            metadata={"type": "object"}, priority={"type": "integer"}))),
            "get": _op("The caller's batches", "batch", {200: _LIST}, params=(_LIMIT, _AFTER), tag="batches")},
        "/v1/batches/{batch_id}": {"get": _op("One batch", "batch", {200: batch_obj},
                                              params=(_path_param("batch_id"),), tag="batches")},
        "/v1/batches/{batch_id}/cancel": {"post": _op("Cancel a batch", "batch", {200: batch_obj}, errors=(409,),
                                                      params=(_path_param("batch_id"),), tag="batches")},
        "/v1/upload": {
            "options": _op("TUS capabilities", None, {204: "empty"}, tag="uploads"),
            "post": _op("Create a TUS upload (creation, creation-with-upload, concatenation)", "upload",
                        {201: "empty"}, errors=_UPLOAD_ERRORS, tag="uploads", params=(
                            _TUS, _header("Upload-Length", {"type": "integer", "minimum": 0}),
                            _header("Upload-Defer-Length", {"type": "string", "enum": ["1"]}),
                            _header("Upload-Metadata", {"type": "string"}),
                            _header("Upload-Concat", {"type": "string", "pattern": "^(partial|final;.+)$"})))},
        "/v1/upload/{upload_id}": {
            "options": _op("TUS capabilities", None, {204: "empty"}, params=(_path_param("upload_id"),),
                           tag="uploads"),
            "head": _op("An upload's offset", "upload", {200: "empty"}, errors=_UPLOAD_ERRORS,
                        params=(_path_param("upload_id"), _TUS), tag="uploads"),
            "patch": _op("Append bytes at Upload-Offset", "upload", {204: "empty"}, errors=_UPLOAD_ERRORS,
                         tag="uploads", params=(
                             _path_param("upload_id"), _TUS, _header("Upload-Offset", {"type": "integer",
                                                                                       "minimum": 0}, True)),
                         body={"required": True, "content": {"application/offset+octet-stream": {
                             "schema": {"type": "string", "format": "binary"}}}}),
            "delete": _op("Terminate an upload", "upload", {204: "empty"}, errors=_UPLOAD_ERRORS,
                          params=(_path_param("upload_id"), _TUS), tag="uploads"),
            "post": _op("Not allowed on an upload URL (TUS answers 405)", "upload", {}, errors=_UPLOAD_ERRORS,
                        params=(_path_param("upload_id"), _TUS), tag="uploads")},
        "/monitor/runtime/restart": {"post": _op("Restart the runtime", "monitor", {202: {"type": "object"}},
                                                 errors=(409,), params=(_query("wait", {"type": "number"}),),
                                                 tag="monitor")},
        "/monitor/runtime/swap": {"post": _op("Swap the runtime to another model", "monitor", {
            200: {"type": "object"}, 202: {"type": "object"}}, errors=(409,), tag="monitor",
            params=(_query("wait", {"type": "number"}),), body=_json_body(_obj("model", model=model)))},
        "/monitor/overview": {"get": _op("Dashboard overview", "monitor", {200: {"type": "object"}}, tag="monitor")},
        "/monitor/jobs": {"get": _op("Jobs of every key", "monitor", {200: _LIST}, params=(
            *job_filters, _query("key_id", {"type": "string"})), tag="monitor")},
        "/monitor/jobs/{job_id}": {
            "get": _op("Any job", "monitor", {200: {"type": "object"}}, params=(_path_param("job_id"),),
                       tag="monitor"),
            "delete": _op("Cancel any job", "monitor", {200: job}, errors=(409,),
                          params=(_path_param("job_id"),), tag="monitor")},
        "/monitor/evals": {"get": _op("Eval runs of every key", "monitor", {200: _LIST}, tag="monitor")},
        "/monitor/keys": {"get": _op("Usage per key, per day", "monitor", {200: {"type": "object"}},
                                     tag="monitor")},
        "/monitor/runtime": {"get": _op("Runtime state and history", "monitor", {200: {"type": "object"}},
                                        tag="monitor")},
        "/monitor/runtime/crash_logs/{name}": {"get": _op("One crash log", "monitor", {200: {"type": "object"}},
                                                          params=(_path_param("name"),), tag="monitor")},
        "/dashboard/login": {
            "get": _op("Login form", None, {200: "html"}, tag="dashboard"),
            "post": _op("Log in with a monitor token (form)", None, {303: "empty", 400: "html", 401: "html"},
                        errors=(403, 415), tag="dashboard", body={"required": True, "content": {
                            "application/x-www-form-urlencoded": {"schema": _obj("token", token={"type": "string"},
                                                                                 csrf={"type": "string"})}}})},
        "/dashboard/logout": {"post": _op("Log out", "monitor", {303: "empty"}, errors=(403,), tag="dashboard")},
        "/dashboard": {"get": _op("Overview page", "monitor", {200: "html", 302: "empty"}, tag="dashboard")},
        "/dashboard/jobs": {"get": _op("Jobs page", "monitor", {200: "html", 302: "empty"}, params=(
            *job_filters, _query("key_id", {"type": "string"})), tag="dashboard")},
        "/dashboard/jobs/{job_id}": {"get": _op("Job page", "monitor", {200: "html", 302: "empty"},
                                                params=(_path_param("job_id"),), tag="dashboard")},
        "/dashboard/jobs/{job_id}/cancel": {"post": _op("Cancel a job (form)", "monitor", {303: "empty"},
                                                        errors=(403, 409), params=(_path_param("job_id"),),
                                                        tag="dashboard")},
        "/dashboard/evals": {"get": _op("Evals page", "monitor", {200: "html", 302: "empty"}, tag="dashboard")},
        "/dashboard/keys": {"get": _op("Keys page", "monitor", {200: "html", 302: "empty"}, tag="dashboard")},
        "/dashboard/runtime": {"get": _op("Runtime page", "monitor", {200: "html", 302: "empty"}, tag="dashboard")},
        "/dashboard/runtime/crash_logs/{name}": {"get": _op("Crash log page", "monitor", {200: "html", 302: "empty"},
                                                            params=(_path_param("name"),), tag="dashboard")},
        "/dashboard/static/{name}": {"get": _op("Dashboard CSS/JS", None, {200: {
            "text/css": {"schema": {"type": "string"}}, "application/javascript": {"schema": {"type": "string"}},
            "text/javascript": {"schema": {"type": "string"}}}}, params=(_path_param("name"),), tag="dashboard")},
    }
    # The collection URL answers with and without the trailing slash (tus-js-client and tuspy differ).
    paths["/v1/upload/"] = paths["/v1/upload"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM Gateway", "version": "1",
                 "description": "OpenAI-compatible realtime proxy, batch queue, TUS uploads, Files/Batches, "
                                "evals and monitoring. Errors are OpenAI-shaped."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A key from AUTH_KEYS_FILE; each route needs one scope "
                                                          "(x-required-scope)."}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "code", "param"], "properties": {
                        "message": {"type": "string"}, "type": {"type": "string"},
                        "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}}},
                "Completion": _obj("object", "choices", id={"type": "string"}, object={"type": "string"},
                                   choices={"type": "array"}, usage={"type": ["object", "null"]}),
                "Job": _obj("id", "object", "status", "model", "status_url", id={"type": "string"},
                            object={"const": "batch.job"}, status={"type": "string"}, model={"type": "string"},
                            status_url={"type": "string"}, priority={"type": "integer"},
                            created_at={"type": "integer"}),
                "File": _obj("id", "object", "bytes", "filename", "purpose", id={"type": "string"},
                             object={"const": "file"}, bytes={"type": "integer"}, filename={"type": "string"},
                             purpose={"type": "string"}),
                "Batch": _obj("id", "object", "endpoint", "status", "input_file_id", id={"type": "string"},
                              object={"const": "batch"}, status={"type": "string"},
                              input_file_id={"type": "string"}),
                "EvalRun": _obj("id", "status", id={"type": "string"}, status={"type": "string"}),
            },
        },
    }


@public
async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: this API's OpenAPI document (public: it holds no secret)."""
    return json_response(build_spec(request.app[SETTINGS].realtime_model))


def setup(app: web.Application) -> None:
    """Add GET /openapi.json."""
    app.router.add_get("/openapi.json", openapi_json)
