"""TUS 1.0.0 uploads: the real tuspy client, raw requests for every error case, storage and sweeper."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from gateway.bootstrap import create_app
from gateway.http.appkeys import UPLOAD_SWEEPER, UPLOADS
from gateway.metrics import REGISTRY
from gateway.settings import SettingsError, load_settings
from gateway.uploads import UploadStore, parse_metadata
from gateway.uploads.errors import InvalidUploadRequest, UploadNotFinished, UploadTooLarge
from gateway.uploads.protocol import parse_concat
from gateway.uploads.store import SHARED_MARKER, UploadInfo
from tests.conftest import (
    KEY_IDS,
    REALTIME_MODEL,
    REDIS_URL,
    TOKENS,
    auth,
    eventually,
    free_port,
    wait_http,
    write_keys_file,
)

pytestmark = pytest.mark.slow  # TUS uploads with real clients, restarts and SIGKILL

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
MiB = 1024 * 1024
JS_DIR = Path(__file__).parent / "js"

Client = Any
MakeGateway = Callable[..., Awaitable[Client]]


def upload_files(directory: Path) -> list[Path]:
    """What the store keeps in an upload directory (not the fleet's shared-directory marker)."""
    return [p for p in directory.iterdir() if p.name != SHARED_MARKER]


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    """Where the uploads of a test live."""
    return tmp_path / "uploads"


@pytest.fixture
def make_gateway(aiohttp_client: Any, make_settings: Any, upload_dir: Path) -> MakeGateway:
    """Build a full gateway (create_app) whose uploads go to the test's directory."""

    async def build(**overrides: Any) -> Client:
        values: dict[str, Any] = {"upload_dir": str(upload_dir)}
        values.update(overrides)
        return await aiohttp_client(create_app(make_settings(**values)))

    return build


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> Client:
    """A gateway with default upload settings."""
    return await make_gateway()


def headers(role: str = "upload", **extra: str) -> dict[str, str]:
    """TUS request headers for one of the test keys."""
    return {**TUS, **auth(role), **{k.replace("_", "-"): v for k, v in extra.items()}}


def b64(text: str | bytes) -> str:
    """Base64 of a metadata value."""
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def digest_header(algorithm: str, data: bytes) -> str:
    """An Upload-Checksum header value."""
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


async def create(client: Client, length: int | None = 100, role: str = "upload", **extra: str) -> str:
    """Create an upload; returns its URL path."""
    sizes = {"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"}
    resp = await client.post("/v1/upload/", headers={**headers(role, **extra), **sizes})
    assert resp.status == 201, await resp.text()
    location = str(resp.headers["Location"])
    assert location.startswith("/v1/upload/")
    return location


async def patch(client: Client, url: str, offset: int, data: Any, role: str = "upload", **extra: str) -> Any:
    """PATCH a chunk."""
    return await client.patch(url, data=data, headers={**headers(role, **extra), "Upload-Offset": str(offset),
                                                       "Content-Type": OCTETS})


async def head(client: Client, url: str, role: str = "upload") -> Any:
    """HEAD an upload."""
    return await client.head(url, headers=headers(role))


async def error_code(resp: Any) -> str:
    """The OpenAI-shaped error code of a response."""
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["message"]
    return str(body["error"]["code"])


def store_of(client: Client) -> UploadStore:
    """The app's upload store."""
    store: UploadStore = client.app[UPLOADS]
    return store


def upload_id(url: str) -> str:
    """The id at the end of an upload URL."""
    return url.rsplit("/", 1)[1]


def sample(name: str) -> float:
    """Current value of an upload metric."""
    return REGISTRY.get_sample_value(name) or 0.0


# --- the real client
async def test_tuspy_uploads_in_chunks_with_checksums_and_metadata(gw: Client, upload_dir: Path) -> None:
    data = os.urandom(11 * MiB + 123)  # chunks above the 4 MiB realtime body limit must work
    created, completed = sample("llm_gateway_uploads_created_total"), sample("llm_gateway_uploads_completed_total")
    received = sample("llm_gateway_upload_received_bytes_total")
    tus = tus_client.TusClient(str(gw.make_url("/v1/upload/")), headers=auth("upload"))

    def run() -> str:
        uploader = tus.uploader(file_stream=io.BytesIO(data), chunk_size=5 * MiB, upload_checksum=True,
                                metadata={"filename": "prompts.jsonl", "filetype": "application/jsonl",
                                          "purpose": "batch"})
        uploader.upload()
        return str(uploader.url)

    url = await asyncio.to_thread(run)
    assert url == str(gw.make_url("/v1/upload/" + upload_id(url)))
    resp = await head(gw, "/v1/upload/" + upload_id(url))
    assert resp.status == 200
    assert resp.headers["Upload-Offset"] == resp.headers["Upload-Length"] == str(len(data))
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Upload-Expires" not in resp.headers  # finished uploads do not expire
    meta = parse_metadata(resp.headers["Upload-Metadata"])
    assert meta.values == {"filename": "prompts.jsonl", "filetype": "application/jsonl", "purpose": "batch"}

    store = store_of(gw)
    info = store.lookup(upload_id(url), KEY_IDS["upload"])
    assert info.finished and info.size == len(data) and info.metadata.purpose == "batch"
    with store.open_finished(info.id) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert (upload_dir / f"{info.id}.bin").stat().st_size == len(data)
    assert sample("llm_gateway_uploads_created_total") == created + 1
    assert sample("llm_gateway_uploads_completed_total") == completed + 1
    assert sample("llm_gateway_upload_received_bytes_total") == received + len(data)


async def test_tuspy_interrupted_then_resumed_from_head_offset(gw: Client) -> None:
    data = os.urandom(3 * MiB + 17)
    chunk = 1 * MiB
    tus = tus_client.TusClient(str(gw.make_url("/v1/upload/")), headers=auth("upload"))

    def first_part() -> str:
        uploader = tus.uploader(file_stream=io.BytesIO(data), chunk_size=chunk, upload_checksum=True)
        uploader.upload(stop_at=2 * chunk)  # the "connection drops" after two chunks
        return str(uploader.url)

    url = await asyncio.to_thread(first_part)
    resp = await head(gw, "/v1/upload/" + upload_id(url))
    assert resp.headers["Upload-Offset"] == str(2 * chunk)
    assert "Upload-Expires" in resp.headers

    def resume() -> int:
        # A fresh uploader given only the URL asks HEAD for the offset, then sends the rest.
        uploader = tus.uploader(file_stream=io.BytesIO(data), url=url, chunk_size=chunk, upload_checksum=True)
        start = int(uploader.offset)
        uploader.upload()
        return start

    assert await asyncio.to_thread(resume) == 2 * chunk
    info = store_of(gw).lookup(upload_id(url), KEY_IDS["upload"])
    assert info.finished
    assert b"".join([piece async for piece in store_of(gw).iter_finished(info.id, 100_000)]) == data


async def test_tuspy_sees_other_keys_upload_as_missing(gw: Client) -> None:
    url = await create(gw, 10)
    other = tus_client.TusClient(str(gw.make_url("/v1/upload/")), headers=auth("upload2"))

    def resume_as_other() -> None:
        other.uploader(file_stream=io.BytesIO(b"0123456789"), url=str(gw.make_url(url)))

    with pytest.raises(TusCommunicationError) as caught:
        await asyncio.to_thread(resume_as_other)
    assert caught.value.status_code == 404


# --- the real tus-js-client under node: parallelUploads, i.e. the concatenation extension
@pytest.fixture(scope="session")
def tus_js_script() -> Path:
    """The node script that drives tus-js-client, with the client installed from tests/js/package-lock.json.

    `make test` installs it first (target `js`); this installs it too when the suite runs on its own.
    """
    npm = shutil.which("npm")
    assert shutil.which("node") and npm, "node and npm are needed for the tus-js-client tests (make js installs them)"
    if not (JS_DIR / "node_modules" / "tus-js-client" / "package.json").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    return JS_DIR / "parallel_upload.mjs"


async def run_tus_js(script: Path, endpoint: str, path: Path, *, parallel: int, chunk_size: int, role: str,
                     metadata: dict[str, str], **env: str) -> dict[str, Any]:
    """Upload a file with tus-js-client; returns its report (final URL and every request it sent).

    `env` passes the script's other settings (TUS_URL_STORAGE, TUS_STOP_AT)."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), endpoint, str(path), str(parallel), str(chunk_size),
        env={**os.environ, "TUS_TOKEN": TOKENS[role], "TUS_METADATA": json.dumps(metadata), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


async def test_tus_js_client_parallel_uploads_become_one_file(make_gateway: MakeGateway, upload_dir: Path,
                                                              tmp_path: Path, tus_js_script: Path) -> None:
    # The key holds the upload and the batch scope, so the result is also a file of the Files API.
    gw = await make_gateway()
    data = os.urandom(3 * MiB + 12_345)
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(data)
    report = await run_tus_js(tus_js_script, str(gw.make_url("/v1/upload/")), source, parallel=4,
                              chunk_size=512 * 1024, role="all",
                              metadata={"filename": "prompts.jsonl", "purpose": "batch"})

    # tus-js-client's sequence: four partial creations and their PATCHes, then one final creation.
    requests_sent = report["requests"]
    posts = [r for r in requests_sent if r["method"] == "POST"]
    assert [r["concat"] for r in posts[:-1]] == ["partial"] * 4
    assert requests_sent[-1] is not None and posts[-1] == requests_sent[-1]
    assert posts[-1]["concat"].startswith("final;") and len(posts[-1]["concat"].split()) == 4
    assert {r["concat"] for r in requests_sent if r["method"] == "PATCH"} == {"partial"}
    assert len([r for r in requests_sent if r["method"] == "PATCH"]) > 4  # the parts went in several chunks

    final_id = upload_id(report["url"])
    store = store_of(gw)
    info = store.lookup(final_id, KEY_IDS["all"])
    assert info.finished and info.concat == "final" and len(info.parts) == 4
    assert info.metadata.filename == "prompts.jsonl"
    with store.open_finished(final_id) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    # The partial uploads were consumed: their bytes count once, as the final upload's.
    assert [i.id for i in store.list_for_key(KEY_IDS["all"])] == [final_id]
    assert store.usage(KEY_IDS["all"]) == len(data)
    assert sorted(p.name for p in upload_files(upload_dir)) == [f"{final_id}.bin", f"{final_id}.json"]

    resp = await head(gw, "/v1/upload/" + final_id, role="all")
    assert resp.status == 200 and resp.headers["Upload-Length"] == resp.headers["Upload-Offset"] == str(len(data))
    assert resp.headers["Upload-Concat"] == "final;" + " ".join(f"/v1/upload/{part}" for part in info.parts)
    resp = await gw.get("/v1/files", headers=auth("all"))
    assert [f["id"] for f in (await resp.json())["data"]] == [f"file-{final_id}"]
    resp = await gw.get(f"/v1/files/file-{final_id}/content", headers=auth("all"))
    assert await resp.read() == data


async def test_tus_js_client_killed_mid_parallel_upload_resumes_its_parts(
        make_gateway: MakeGateway, upload_dir: Path, tmp_path: Path, tus_js_script: Path) -> None:
    gw = await make_gateway()
    store = store_of(gw)
    data = os.urandom(2 * MiB + 7)
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(data)
    urls = tmp_path / "tus-urls.json"
    endpoint = str(gw.make_url("/v1/upload/"))
    first = await run_tus_js(tus_js_script, endpoint, source, parallel=3, chunk_size=128 * 1024, role="all",
                             metadata={"filename": "prompts.jsonl"}, TUS_URL_STORAGE=str(urls),
                             TUS_STOP_AT=str(len(data) // 2))
    assert first["stopped"] and not first["resumed"]
    # The client is gone mid-PATCH: three partial uploads, none finished, no final upload, no file.
    uploads = store.list_for_key(KEY_IDS["all"])
    await eventually(lambda: not any(store.busy(i.id) for i in uploads))
    uploads = store.list_for_key(KEY_IDS["all"])
    assert len(uploads) == 3 and {i.concat for i in uploads} == {"partial"}
    assert not all(i.finished for i in uploads) and 0 < sum(i.offset for i in uploads) < len(data)
    assert (await (await gw.get("/v1/files", headers=auth("all"))).json())["data"] == []

    second = await run_tus_js(tus_js_script, endpoint, source, parallel=3, chunk_size=128 * 1024, role="all",
                              metadata={"filename": "prompts.jsonl"}, TUS_URL_STORAGE=str(urls))
    assert second["resumed"] and not second["stopped"]
    sent = second["requests"]
    # Resumed, not restarted: each part is asked for its offset, and the only creation is the final one.
    assert sorted(upload_id(r["url"]) for r in sent if r["method"] == "HEAD") == sorted(i.id for i in uploads)
    assert [r["concat"].split(";")[0] for r in sent if r["method"] == "POST"] == ["final"]
    final_id = upload_id(second["url"])
    with store.open_finished(final_id) as f:
        assert f.read() == data
    assert [i.id for i in store.list_for_key(KEY_IDS["all"])] == [final_id]
    assert store.usage(KEY_IDS["all"]) == len(data)


async def test_concatenation_rules(make_gateway: MakeGateway, upload_dir: Path) -> None:
    # The quota is exactly what the partial uploads hold: concatenating them must need no more.
    gw = await make_gateway(upload_key_quota_bytes=11 + 4 + 10, upload_concat_max_parts=3)
    store = store_of(gw)
    key_id = KEY_IDS["all"]
    a = await create(gw, 5, role="all", Upload_Concat="partial")
    resp = await head(gw, a, role="all")
    assert resp.headers["Upload-Concat"] == "partial" and "Upload-Expires" in resp.headers
    assert (await patch(gw, a, 0, b"hello", role="all")).status == 204
    b = await create(gw, None, role="all", Upload_Concat="partial")  # a deferred length is fine for a part
    assert (await patch(gw, b, 0, b" world", role="all", Upload_Length="6")).status == 204
    unfinished = await create(gw, 4, role="all", Upload_Concat="partial")
    plain = await create(gw, 10, role="all")
    theirs = await create(gw, 3, role="upload", Upload_Concat="partial")
    assert (await patch(gw, theirs, 0, b"abc", role="upload")).status == 204

    # A finished partial upload is a piece of a file to be, not a file; and it still expires.
    resp = await head(gw, a, role="all")
    assert resp.headers["Upload-Offset"] == "5" and "Upload-Expires" in resp.headers
    resp = await gw.get(f"/v1/files/file-{upload_id(a)}", headers=auth("all"))
    assert resp.status == 404
    assert (await (await gw.get("/v1/files", headers=auth("all"))).json())["data"] == []

    def final(*urls: str) -> dict[str, str]:
        return {**headers("all"), "Upload-Concat": "final;" + " ".join(urls)}

    count = store.count(key_id)
    for concat_headers, status, code in (
        (final(a, unfinished), 400, "partial_upload_not_finished"),
        (final(a, plain), 400, "invalid_upload_concat"),
        (final(a, theirs), 404, "upload_not_found"),
        (final(a, a), 400, "invalid_upload_concat"),
        (final(a, b, a, b), 400, "invalid_upload_concat"),  # more than UPLOAD_CONCAT_MAX_PARTS
        (final(a, "/elsewhere/" + upload_id(b)), 400, "invalid_upload_concat"),
        ({**headers("all"), "Upload-Concat": "final;"}, 400, "invalid_upload_concat"),
        ({**headers("all"), "Upload-Concat": "whole"}, 400, "invalid_upload_concat"),
        ({**final(a, b), "Upload-Length": "11"}, 400, "invalid_header"),
    ):
        resp = await gw.post("/v1/upload/", headers=concat_headers)
        assert resp.status == status, (concat_headers["Upload-Concat"], await resp.text())
        assert await error_code(resp) == code
    resp = await gw.post("/v1/upload/", data=b"x", headers={**final(a, b), "Content-Type": OCTETS})
    assert resp.status == 403 and await error_code(resp) == "upload_is_final"
    assert store.count(key_id) == count  # nothing was created, nothing consumed

    # Parts are named by absolute URL (as tus-js-client sends them) or by path; their order is kept.
    resp = await gw.post("/v1/upload/", headers={**final(str(gw.make_url(a)), b),
                                                  "Upload-Metadata": f"filename {b64('joined.jsonl')}"})
    assert resp.status == 201, await resp.text()
    url = resp.headers["Location"]
    resp = await head(gw, url, role="all")
    assert resp.headers["Upload-Offset"] == resp.headers["Upload-Length"] == "11"
    assert resp.headers["Upload-Concat"] == f"final;{a} {b}" and "Upload-Expires" not in resp.headers
    with store.open_finished(upload_id(url)) as f:
        assert f.read() == b"hello world"
    for part in (a, b):
        assert (await head(gw, part, role="all")).status == 404
    assert store.usage(key_id) == 11 + 4 + 10 and store.count(key_id) == count - 1
    resp = await gw.get("/v1/files", headers=auth("all"))
    assert [(f["id"], f["filename"], f["bytes"]) for f in (await resp.json())["data"]] == [
        (f"file-{upload_id(url)}", "joined.jsonl", 11)]
    resp = await patch(gw, url, 11, b"", role="all")
    assert resp.status == 403 and await error_code(resp) == "upload_is_final"
    resp = await gw.post("/v1/upload/", headers=final(a, b))  # consumed: they cannot be joined again
    assert resp.status == 404

    # A partial upload that is never concatenated expires even though it is finished.
    real_clock = store.clock
    store.clock = lambda: real_clock() + 24 * 3600 + 1
    assert (await head(gw, theirs, role="upload")).status == 410
    assert store.sweep() == 3  # it, the unfinished partial upload and the unfinished plain one
    assert (await head(gw, url, role="all")).status == 200 and (await head(gw, plain, role="all")).status == 410


async def test_a_crash_after_concatenation_is_finished_at_load(tmp_path: Path) -> None:
    directory = tmp_path / "up"
    store = _store(directory)
    store.load()
    parts = [await store.create("k1", 3, partial=True) for _ in range(2)]
    for part, data in zip(parts, (b"abc", b"def"), strict=True):
        await store.append(part.id, offset=0, chunks=_chunks(data))
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}
    final = await store.concatenate("k1", [p.id for p in parts])
    # The crash: the final upload was committed, its parts' files were never removed.
    for name, content in saved.items():
        (directory / name).write_bytes(content)

    restarted = _store(directory)
    restarted.load()
    assert [i.id for i in restarted.list_for_key("k1")] == [final.id]
    assert restarted.usage("k1") == 6 and restarted.count("k1") == 1
    assert sorted(p.name for p in directory.iterdir()) == [f"{final.id}.bin", f"{final.id}.json"]
    with restarted.open_finished(final.id) as f:
        assert f.read() == b"abcdef"


# --- discovery and version
async def test_options_advertises_the_protocol_without_a_key(gw: Client) -> None:
    for path in ("/v1/upload/", "/v1/upload", "/v1/upload/anything"):
        resp = await gw.options(path)
        assert resp.status == 204
        assert resp.headers["Tus-Version"] == "1.0.0"
        assert resp.headers["Tus-Resumable"] == "1.0.0"
        assert set(resp.headers["Tus-Extension"].split(",")) == {
            "creation", "creation-with-upload", "creation-defer-length", "expiration", "checksum", "termination",
            "concatenation"}
        assert resp.headers["Tus-Max-Size"] == str(1024 ** 3)
        assert resp.headers["Tus-Checksum-Algorithm"].split(",") == ["sha1", "sha256", "md5"]


@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0", ""])
async def test_unsupported_or_missing_version_is_412_and_not_processed(gw: Client, version: str | None) -> None:
    base = {**auth("upload"), "Upload-Length": "10"}
    if version is not None:
        base["Tus-Resumable"] = version
    resp = await gw.post("/v1/upload/", headers=base)
    assert resp.status == 412
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert await error_code(resp) == "unsupported_tus_version"
    assert store_of(gw).usage(KEY_IDS["upload"]) == 0  # nothing was created


async def test_routes_need_the_upload_scope(gw: Client) -> None:
    resp = await gw.post("/v1/upload/", headers={**TUS, "Upload-Length": "1"})
    assert resp.status == 401
    resp = await gw.post("/v1/upload/", headers={**TUS, **auth("batch"), "Upload-Length": "1"})
    assert resp.status == 401
    resp = await gw.post("/v1/upload/", headers={**TUS, **auth("all"), "Upload-Length": "1"})
    assert resp.status == 201


# --- creation
async def test_creation_returns_location_and_expiry(gw: Client) -> None:
    before = time.time()
    resp = await gw.post("/v1/upload/", headers={**headers(), "Upload-Length": "100",
                                                  "Upload-Metadata": f"filename {b64('a.jsonl')},flag"})
    assert resp.status == 201
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    expires = parsedate_to_datetime(resp.headers["Upload-Expires"]).timestamp()
    assert before + 24 * 3600 - 5 <= expires <= time.time() + 24 * 3600 + 5
    url = resp.headers["Location"]
    resp = await head(gw, url)
    assert resp.status == 200
    assert resp.headers["Upload-Offset"] == "0" and resp.headers["Upload-Length"] == "100"
    assert resp.headers["Upload-Metadata"] == f"filename {b64('a.jsonl')},flag"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_creation_without_trailing_slash_and_with_empty_metadata(gw: Client) -> None:
    resp = await gw.post("/v1/upload", headers={**headers(), "Upload-Length": "5", "Upload-Metadata": ""})
    assert resp.status == 201
    resp = await head(gw, resp.headers["Location"])
    assert "Upload-Metadata" not in resp.headers


async def test_zero_length_upload_is_finished_at_creation(gw: Client) -> None:
    url = await create(gw, 0)
    resp = await head(gw, url)
    assert resp.headers["Upload-Offset"] == "0" and "Upload-Expires" not in resp.headers
    with store_of(gw).open_finished(upload_id(url)) as f:
        assert f.read() == b""


@pytest.mark.parametrize(("extra", "code"), [
    ({}, "missing_upload_length"),
    ({"Upload-Length": "-1"}, "invalid_header"),
    ({"Upload-Length": "12abc"}, "invalid_header"),
    ({"Upload-Length": "10", "Upload-Defer-Length": "1"}, "invalid_header"),
    ({"Upload-Defer-Length": "2"}, "invalid_header"),
    ({"Upload-Length": "10", "Upload-Metadata": "filename not-base64!"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": f"a {b64('x')},a {b64('y')}"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": f"filename {b64('../../etc/passwd')}"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": f"filename {b64('a' * 256)}"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": f"filetype {b64('not a mime')}"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": f"purpose {b64('fine-tune')}"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": f"filename {b64(bytes([0xff, 0xfe]))}"}, "invalid_upload_metadata"),
    ({"Upload-Length": "10", "Upload-Metadata": "bad key x"}, "invalid_upload_metadata"),
])
async def test_bad_creation_requests_are_400(gw: Client, extra: dict[str, str], code: str) -> None:
    resp = await gw.post("/v1/upload/", headers={**headers(), **extra})
    assert resp.status == 400
    assert await error_code(resp) == code
    assert store_of(gw).list_for_key(KEY_IDS["upload"]) == []


async def test_upload_length_above_max_is_413(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upload_max_size=1000)
    resp = await gw.post("/v1/upload/", headers={**headers(), "Upload-Length": "1001"})
    assert resp.status == 413
    assert await error_code(resp) == "upload_too_large"
    assert "1000" in (await resp.json())["error"]["message"]
    assert (await gw.options("/v1/upload/")).headers["Tus-Max-Size"] == "1000"
    assert await create(gw, 1000)


async def test_creation_with_upload(gw: Client) -> None:
    checksum = digest_header("sha256", b"hello")
    resp = await gw.post("/v1/upload/", data=b"hello", headers={
        **headers(), "Upload-Length": "11", "Content-Type": OCTETS, "Upload-Checksum": checksum})
    assert resp.status == 201
    assert resp.headers["Upload-Offset"] == "5"
    url = resp.headers["Location"]
    resp = await patch(gw, url, 5, b" world")
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "11"
    with store_of(gw).open_finished(upload_id(url)) as f:
        assert f.read() == b"hello world"


async def test_creation_with_upload_checksum_mismatch_keeps_the_empty_upload(gw: Client) -> None:
    resp = await gw.post("/v1/upload/", data=b"hello", headers={
        **headers(), "Upload-Length": "11", "Content-Type": OCTETS, "Upload-Checksum": digest_header("md5", b"HELLO")})
    assert resp.status == 460
    assert await error_code(resp) == "checksum_mismatch"
    assert resp.headers["Upload-Offset"] == "0"
    resp = await head(gw, resp.headers["Location"])
    assert resp.headers["Upload-Offset"] == "0"


async def test_creation_with_upload_larger_than_length_creates_nothing(gw: Client) -> None:
    resp = await gw.post("/v1/upload/", data=b"x" * 20, headers={**headers(), "Upload-Length": "10",
                                                                 "Content-Type": OCTETS})
    assert resp.status == 413
    assert store_of(gw).list_for_key(KEY_IDS["upload"]) == []


async def test_creation_with_body_needs_the_offset_content_type(gw: Client) -> None:
    resp = await gw.post("/v1/upload/", data=b"hello", headers={**headers(), "Upload-Length": "10",
                                                                "Content-Type": "text/plain"})
    assert resp.status == 415
    assert store_of(gw).list_for_key(KEY_IDS["upload"]) == []


# --- PATCH errors
async def test_patch_wrong_content_type_is_415(gw: Client) -> None:
    url = await create(gw, 10)
    for content_type in ("application/octet-stream", "text/plain", ""):
        resp = await gw.patch(url, data=b"abc", headers={**headers(), "Upload-Offset": "0",
                                                         "Content-Type": content_type})
        assert resp.status == 415, content_type
        assert await error_code(resp) == "unsupported_media_type"
    assert (await head(gw, url)).headers["Upload-Offset"] == "0"


async def test_patch_offset_mismatch_is_409_and_changes_nothing(gw: Client, upload_dir: Path) -> None:
    url = await create(gw, 10)
    assert (await patch(gw, url, 0, b"abc")).status == 204
    for offset in (0, 2, 5):
        resp = await patch(gw, url, offset, b"zzz")
        assert resp.status == 409
        assert await error_code(resp) == "upload_offset_mismatch"
    assert (await head(gw, url)).headers["Upload-Offset"] == "3"
    assert (upload_dir / f"{upload_id(url)}.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("offset", [None, "-1", "x", "1.5", "99999999999999999999"])
async def test_patch_bad_or_missing_offset_is_400(gw: Client, offset: str | None) -> None:
    url = await create(gw, 10)
    extra = {"Content-Type": OCTETS} | ({"Upload-Offset": offset} if offset is not None else {})
    resp = await gw.patch(url, data=b"abc", headers={**headers(), **extra})
    assert resp.status == 400
    assert await error_code(resp) in {"missing_upload_offset", "invalid_header"}


async def test_bytes_beyond_upload_length_are_413(gw: Client, upload_dir: Path) -> None:
    url = await create(gw, 10)
    assert (await patch(gw, url, 0, b"12345")).status == 204
    resp = await patch(gw, url, 5, b"6789012")  # Content-Length says it up front
    assert resp.status == 413
    assert await error_code(resp) == "upload_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: found out while streaming
        yield b"678"
        yield b"9012"

    resp = await patch(gw, url, 5, chunked())
    assert resp.status == 413
    assert (await head(gw, url)).headers["Upload-Offset"] == "5"
    assert (upload_dir / f"{upload_id(url)}.bin").read_bytes() == b"12345"
    assert (await patch(gw, url, 5, b"67890")).status == 204


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
async def test_checksums(gw: Client, upload_dir: Path, algorithm: str) -> None:
    url = await create(gw, 8)
    resp = await patch(gw, url, 0, b"abcd", Upload_Checksum=digest_header(algorithm, b"abcd"))
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "4"
    resp = await patch(gw, url, 4, b"efgh", Upload_Checksum=digest_header(algorithm, b"efgX"))
    assert resp.status == 460
    assert resp.reason == "Checksum Mismatch"
    assert await error_code(resp) == "checksum_mismatch"
    assert (await head(gw, url)).headers["Upload-Offset"] == "4"
    assert (upload_dir / f"{upload_id(url)}.bin").read_bytes() == b"abcd"  # the chunk was discarded
    resp = await patch(gw, url, 4, b"efgh", Upload_Checksum=digest_header(algorithm, b"efgh"))
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "8"


@pytest.mark.parametrize(("value", "code"), [
    ("crc32 AAAAAA==", "unsupported_checksum_algorithm"),
    ("SHA1 " + base64.b64encode(hashlib.sha1(b"abc").digest()).decode(), "unsupported_checksum_algorithm"),
    ("sha1 not*base64", "invalid_checksum"),
    ("sha256 " + base64.b64encode(hashlib.sha1(b"abc").digest()).decode(), "invalid_checksum"),
])
async def test_bad_checksum_headers_are_400(gw: Client, value: str, code: str) -> None:
    url = await create(gw, 8)
    resp = await patch(gw, url, 0, b"abc", Upload_Checksum=value)
    assert resp.status == 400
    assert await error_code(resp) == code
    assert (await head(gw, url)).headers["Upload-Offset"] == "0"


# --- not found, ownership, expiry
@pytest.mark.parametrize("path", [
    "/v1/upload/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "/v1/upload/short",
    "/v1/upload/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/upload/..%2Fauth.keys.json",
    "/v1/upload/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.json",
])
async def test_unknown_or_malformed_ids_are_404(gw: Client, path: str) -> None:
    for method in ("HEAD", "PATCH", "DELETE"):
        resp = await gw.request(method, path, headers={**headers(), "Upload-Offset": "0", "Content-Type": OCTETS},
                                data=b"x" if method == "PATCH" else None)
        assert resp.status == 404, (method, path)
        assert "Upload-Offset" not in resp.headers
        if method == "HEAD":
            assert resp.headers["Cache-Control"] == "no-store"
        else:
            assert await error_code(resp) == "upload_not_found"


async def test_path_traversal_reaches_no_file(gw: Client, upload_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.json").write_text("{}")
    url = await create(gw, 4)
    for path in ("/v1/upload/..%2Fsecret", "/v1/upload/%2e%2e%2fsecret", "/v1/upload/%2E%2E",
                 f"{url}%2F..%2F..%2Fsecret", "/v1/upload/../secret.json"):
        resp = await gw.delete(path, headers=headers())
        assert resp.status == 404
    assert (tmp_path / "secret.json").exists()
    assert (await head(gw, url)).status == 200


async def test_other_key_gets_404_for_everything(gw: Client) -> None:
    url = await create(gw, 10)
    assert (await patch(gw, url, 0, b"abc")).status == 204
    assert (await head(gw, url, role="upload2")).status == 404
    resp = await patch(gw, url, 3, b"def", role="upload2")
    assert resp.status == 404 and await error_code(resp) == "upload_not_found"
    assert (await gw.delete(url, headers=headers("upload2"))).status == 404
    resp = await head(gw, url)
    assert resp.status == 200 and resp.headers["Upload-Offset"] == "3"


async def test_expired_upload_is_410_then_swept_with_a_tombstone(gw: Client, upload_dir: Path) -> None:
    store = store_of(gw)
    url = await create(gw, 10)
    done = await create(gw, 3)
    assert (await patch(gw, url, 0, b"abc")).status == 204
    assert (await patch(gw, done, 0, b"xyz")).status == 204
    expired_before = sample("llm_gateway_uploads_expired_total")
    real_clock = store.clock
    store.clock = lambda: real_clock() + 24 * 3600 + 1
    resp = await head(gw, url)
    assert resp.status == 410 and "Upload-Offset" not in resp.headers
    resp = await patch(gw, url, 3, b"def")
    assert resp.status == 410 and await error_code(resp) == "upload_expired"
    assert (await head(gw, url, role="upload2")).status == 404

    assert await gw.app[UPLOAD_SWEEPER].sweep_now() == 1
    assert sample("llm_gateway_uploads_expired_total") == expired_before + 1
    uid = upload_id(url)
    assert not (upload_dir / f"{uid}.bin").exists() and not (upload_dir / f"{uid}.json").exists()
    assert (upload_dir / f"{uid}.gone").exists()
    assert (await head(gw, url)).status == 410  # the tombstone remembers it
    assert (await head(gw, url, role="upload2")).status == 404
    assert (await head(gw, done)).status == 200  # finished uploads do not expire
    assert store.usage(KEY_IDS["upload"]) == 3

    # After the tombstone's own retention it is an unknown upload.
    store.clock = lambda: real_clock() + 3 * 24 * 3600
    store.sweep()
    assert not (upload_dir / f"{uid}.gone").exists()
    assert (await head(gw, url)).status == 404


async def test_sweeper_runs_on_its_timer(make_gateway: MakeGateway, upload_dir: Path) -> None:
    gw = await make_gateway(upload_expiry_seconds=0.2, upload_sweep_interval=0.05)
    url = await create(gw, 10)
    uid = upload_id(url)
    assert (upload_dir / f"{uid}.bin").exists()
    await eventually(lambda: not (upload_dir / f"{uid}.bin").exists(), timeout=20)
    assert (await head(gw, url)).status == 410


async def test_patch_slides_the_expiry(gw: Client) -> None:
    store = store_of(gw)
    url = await create(gw, 10)
    real_clock = store.clock
    store.clock = lambda: real_clock() + 20 * 3600
    resp = await patch(gw, url, 0, b"abc")
    assert resp.status == 204
    expires = parsedate_to_datetime(resp.headers["Upload-Expires"]).timestamp()
    assert expires >= real_clock() + 43 * 3600
    store.clock = lambda: real_clock() + 30 * 3600  # past the first expiry, within the new one
    assert (await head(gw, url)).status == 200


# --- termination, method override, deferred length
async def test_termination(gw: Client, upload_dir: Path) -> None:
    url = await create(gw, 10)
    assert (await patch(gw, url, 0, b"abc")).status == 204
    assert store_of(gw).usage(KEY_IDS["upload"]) == 10
    resp = await gw.delete(url, headers=headers())
    assert resp.status == 204 and resp.headers["Tus-Resumable"] == "1.0.0"
    assert (await head(gw, url)).status == 404
    assert upload_files(upload_dir) == []
    assert store_of(gw).usage(KEY_IDS["upload"]) == 0
    assert (await gw.delete(url, headers=headers())).status == 404


async def test_x_http_method_override(gw: Client) -> None:
    url = await create(gw, 6)
    resp = await gw.post(url, data=b"abc", headers={**headers(), "X-HTTP-Method-Override": "PATCH",
                                                    "Upload-Offset": "0", "Content-Type": OCTETS})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "3"
    resp = await gw.post(url, headers={**headers(), "X-HTTP-Method-Override": "HEAD"})
    assert resp.status == 200 and resp.headers["Upload-Offset"] == "3"
    resp = await gw.post(url, headers=headers())  # a bare POST is not a TUS request on an upload URL
    assert resp.status == 405
    resp = await gw.post(url, headers={**headers(), "X-HTTP-Method-Override": "GET"})
    assert resp.status == 400 and await error_code(resp) == "invalid_method_override"
    resp = await gw.post(url, headers={**headers(), "X-HTTP-Method-Override": "DELETE"})
    assert resp.status == 204
    assert (await head(gw, url)).status == 404


async def test_deferred_length(gw: Client) -> None:
    url = await create(gw, None)
    resp = await head(gw, url)
    assert resp.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in resp.headers
    assert (await patch(gw, url, 0, b"abc")).status == 204
    assert store_of(gw).usage(KEY_IDS["upload"]) == 3
    resp = await patch(gw, url, 3, b"de", Upload_Length="2")  # shorter than what has arrived
    assert resp.status == 400 and await error_code(resp) == "invalid_upload_length"
    resp = await patch(gw, url, 3, b"de", Upload_Length="7")
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "5"
    resp = await head(gw, url)
    assert resp.headers["Upload-Length"] == "7" and "Upload-Defer-Length" not in resp.headers
    resp = await patch(gw, url, 5, b"fg", Upload_Length="8")  # once set, it cannot change
    assert resp.status == 400 and await error_code(resp) == "invalid_upload_length"
    resp = await patch(gw, url, 5, b"fg", Upload_Length="7")
    assert resp.status == 204
    with store_of(gw).open_finished(upload_id(url)) as f:
        assert f.read() == b"abcdefg"


async def test_deferred_length_upload_is_capped_by_max_size(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upload_max_size=10)
    url = await create(gw, None)
    assert (await patch(gw, url, 0, b"x" * 8)).status == 204
    resp = await patch(gw, url, 8, b"x" * 3)
    assert resp.status == 413 and await error_code(resp) == "upload_too_large"
    resp = await patch(gw, url, 8, b"", Upload_Length="11")
    assert resp.status == 413
    assert (await head(gw, url)).headers["Upload-Offset"] == "8"


# --- quota
async def test_per_key_quota(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upload_key_quota_bytes=1000)
    first = await create(gw, 600)
    resp = await gw.post("/v1/upload/", headers={**headers(), "Upload-Length": "401"})
    assert resp.status == 413
    assert await error_code(resp) == "upload_quota_exceeded"
    message = (await resp.json())["error"]["message"]
    assert "quota" in message and "1000" in message
    assert not any(token in message for token in TOKENS.values())
    assert await create(gw, 400)  # exactly at the quota
    assert await create(gw, 1000, role="upload2")  # quotas are per key
    assert (await gw.delete(first, headers=headers())).status == 204
    assert await create(gw, 600)


async def test_quota_applies_while_a_deferred_upload_grows(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upload_key_quota_bytes=100)
    await create(gw, 60)
    url = await create(gw, None)
    assert (await patch(gw, url, 0, b"x" * 30)).status == 204
    resp = await patch(gw, url, 30, b"x" * 20)
    assert resp.status == 413 and await error_code(resp) == "upload_quota_exceeded"
    assert (await head(gw, url)).headers["Upload-Offset"] == "30"
    resp = await patch(gw, url, 30, b"", Upload_Length="41")
    assert resp.status == 413 and await error_code(resp) == "upload_quota_exceeded"
    assert (await patch(gw, url, 30, b"x" * 10, Upload_Length="40")).status == 204


async def test_quota_holds_while_deferred_uploads_stream_at_once(make_gateway: MakeGateway,
                                                                 upload_dir: Path) -> None:
    # Six deferred-length uploads stream 10 MiB each at the same time against a 20 MiB quota: every
    # byte is reserved before it is written, so no interleaving gets more than the quota onto the disk.
    quota = 20 * MiB
    gw = await make_gateway(upload_key_quota_bytes=quota)
    store = store_of(gw)
    urls = [await create(gw, None) for _ in range(6)]
    all_writing = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * MiB
        await all_writing.wait()  # each PATCH is inside the store before any of them goes on
        for _ in range(9):
            yield b"x" * MiB

    patches = [asyncio.ensure_future(patch(gw, url, 0, body())) for url in urls]
    await eventually(lambda: all(store.busy(upload_id(url)) for url in urls))
    all_writing.set()
    statuses = []
    for resp in await asyncio.gather(*patches):
        statuses.append(resp.status)
        if resp.status == 413:
            assert await error_code(resp) == "upload_quota_exceeded"
    assert set(statuses) <= {204, 413} and 204 in statuses and 413 in statuses
    offsets = [int((await head(gw, url)).headers["Upload-Offset"]) for url in urls]
    assert sum(offsets) <= quota
    assert sum(p.stat().st_size for p in upload_dir.glob("*.bin")) <= quota
    assert store.usage(KEY_IDS["upload"]) == sum(offsets)
    # What was refused is released again: the key can still use the room that is left.
    room = quota - sum(offsets)
    if room:
        last = await create(gw, None)
        assert (await patch(gw, last, 0, b"y" * room)).status == 204


async def test_quota_is_reserved_for_a_declared_body_before_it_is_read(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upload_key_quota_bytes=100)
    first, second = await create(gw, None), await create(gw, None)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await release.wait()
        yield b"x" * 50

    store = store_of(gw)
    streaming = asyncio.ensure_future(gw.patch(first, data=slow_body(), headers={
        **headers(), "Upload-Offset": "0", "Content-Type": OCTETS, "Content-Length": "60"}))
    await eventually(lambda: store.busy(upload_id(first)))
    assert store.usage(KEY_IDS["upload"]) == 60  # the declared body is held before its bytes arrive
    resp = await patch(gw, second, 0, b"x" * 41)
    assert resp.status == 413 and await error_code(resp) == "upload_quota_exceeded"
    release.set()
    assert (await streaming).status == 204
    assert (await patch(gw, second, 0, b"x" * 40)).status == 204
    assert store.usage(KEY_IDS["upload"]) == 100


async def test_expiry_moves_only_with_progress_and_never_past_the_max_lifetime(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upload_expiry_seconds=3600, upload_max_lifetime_seconds=3 * 3600)
    store = store_of(gw)
    real_clock = store.clock
    start = real_clock()
    url = await create(gw, None)

    def expires(resp: Any) -> float:
        return parsedate_to_datetime(resp.headers["Upload-Expires"]).timestamp()

    first = expires(await head(gw, url))
    store.clock = lambda: start + 1800
    resp = await patch(gw, url, 0, b"")  # an empty PATCH is no progress: the expiry stays
    assert resp.status == 204 and expires(resp) == first
    resp = await patch(gw, url, 0, b"", Upload_Length="3")  # nor is declaring the length
    assert resp.status == 204 and expires(resp) == first
    store.clock = lambda: start + 3601
    assert (await head(gw, url)).status == 410

    store.clock = lambda: start
    url = await create(gw, 10)
    for offset, minutes in enumerate((50, 100, 150, 170)):  # progress every 50 minutes keeps it alive ...
        store.clock = lambda m=minutes: start + m * 60  # type: ignore[misc]
        resp = await patch(gw, url, offset, b"x")
        assert resp.status == 204
    assert expires(resp) <= start + 3 * 3600 + 1  # ... but no longer than the lifetime since creation
    store.clock = lambda: start + 3 * 3600 + 2
    assert (await head(gw, url)).status == 410


async def test_upload_count_and_metadata_size_per_key_are_bounded(make_gateway: MakeGateway,
                                                                  upload_dir: Path) -> None:
    gw = await make_gateway(upload_key_max_uploads=5, upload_metadata_max_bytes=512)
    big = f"filename {b64('a.jsonl')},pad {b64('x' * 600)}"
    resp = await gw.post("/v1/upload/", headers={**headers(), "Upload-Length": "0", "Upload-Metadata": big})
    assert resp.status == 400 and await error_code(resp) == "invalid_upload_metadata"
    assert "UPLOAD_METADATA_MAX_BYTES" in (await resp.json())["error"]["message"]
    urls = [await create(gw, 0, Upload_Metadata=f"pad {b64('x' * 300)}") for _ in range(5)]
    for length in ("0", "10"):
        resp = await gw.post("/v1/upload/", headers={**headers(), "Upload-Length": length})
        assert resp.status == 403 and await error_code(resp) == "upload_count_exceeded"
        assert "UPLOAD_KEY_MAX_UPLOADS" in (await resp.json())["error"]["message"]
    assert len(upload_files(upload_dir)) == 10  # nothing more was created
    assert await create(gw, 0, role="upload2")  # the bound is per key
    assert (await gw.delete(urls[0], headers=headers())).status == 204
    assert await create(gw, 0)


# --- concurrency, interrupted bodies, crash consistency, restart
async def test_a_second_writer_is_refused_while_one_streams(gw: Client) -> None:
    url = await create(gw, 10)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"abc"
        await release.wait()
        yield b"de"

    first = asyncio.ensure_future(patch(gw, url, 0, slow_body()))
    store = store_of(gw)
    await eventually(lambda: store.busy(upload_id(url)))
    resp = await patch(gw, url, 0, b"zz")
    assert resp.status == 423 and await error_code(resp) == "upload_locked"
    assert (await gw.delete(url, headers=headers())).status == 423
    assert (await head(gw, url)).headers["Upload-Offset"] == "0"  # nothing acknowledged yet
    release.set()
    resp = await first
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "5"


async def _send_partial_patch(client: Client, url: str, declared: int, sent: bytes, **extra: str) -> None:
    """Send a PATCH whose body stops short of its Content-Length, then drop the connection."""
    _, writer = await asyncio.open_connection(client.server.host, client.server.port)
    lines = [f"PATCH {url} HTTP/1.1", f"Host: {client.server.host}", f"Content-Length: {declared}",
             f"Content-Type: {OCTETS}", "Upload-Offset: 0", "Tus-Resumable: 1.0.0",
             f"Authorization: {auth('upload')['Authorization']}", *(f"{k}: {v}" for k, v in extra.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()


async def test_interrupted_body_keeps_the_bytes_that_arrived(gw: Client, upload_dir: Path) -> None:
    url = await create(gw, 1000)
    data = os.urandom(400)
    await _send_partial_patch(gw, url, 1000, data)
    store = store_of(gw)
    uid = upload_id(url)
    await eventually(lambda: not store.busy(uid) and store.get(uid).offset == 400)  # type: ignore[union-attr]
    resp = await head(gw, url)
    assert resp.headers["Upload-Offset"] == "400"
    assert (upload_dir / f"{uid}.bin").read_bytes() == data
    rest = os.urandom(600)
    assert (await patch(gw, url, 400, rest)).status == 204
    with store.open_finished(uid) as f:
        assert f.read() == data + rest


async def test_interrupted_checksummed_body_is_discarded(gw: Client, upload_dir: Path) -> None:
    url = await create(gw, 1000)
    data = os.urandom(1000)
    await _send_partial_patch(gw, url, 1000, data[:400], **{"Upload-Checksum": digest_header("sha1", data)})
    store = store_of(gw)
    uid = upload_id(url)
    await eventually(lambda: not store.busy(uid) and (upload_dir / f"{uid}.bin").stat().st_size == 0)
    assert (await head(gw, url)).headers["Upload-Offset"] == "0"


async def test_unacknowledged_tail_is_cut_to_the_persisted_offset(gw: Client, upload_dir: Path) -> None:
    url = await create(gw, 10)
    uid = upload_id(url)
    assert (await patch(gw, url, 0, b"abcd")).status == 204
    # A crash after writing bytes but before their offset was persisted leaves this behind:
    with (upload_dir / f"{uid}.bin").open("ab") as f:
        f.write(b"GARBAGE")
    resp = await head(gw, url)
    assert resp.headers["Upload-Offset"] == "4"
    assert (upload_dir / f"{uid}.bin").read_bytes() == b"abcd"
    with (upload_dir / f"{uid}.bin").open("ab") as f:
        f.write(b"MORE")
    assert (await patch(gw, url, 4, b"efghij")).status == 204  # a PATCH cuts it too before writing
    with store_of(gw).open_finished(uid) as f:
        assert f.read() == b"abcdefghij"


def _store(directory: Path, **kw: Any) -> UploadStore:
    values: dict[str, Any] = {"max_size": 10_000, "key_quota": 100_000, "expiry_seconds": 3600.0}
    values.update(kw)
    return UploadStore(directory, **values)


async def _chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def test_load_repairs_what_a_crash_left(tmp_path: Path) -> None:
    directory = tmp_path / "up"
    store = _store(directory)
    store.load()
    a = await store.create("k1", 10)
    b = await store.create("k1", 10)
    await store.append(a.id, offset=0, chunks=_chunks(b"0123"))
    await store.append(b.id, offset=0, chunks=_chunks(b"abcdef"))

    # Crash 1: bytes written past the offset, no info update.
    with (directory / f"{a.id}.bin").open("ab") as f:
        f.write(b"4567")
    # Crash 2: bytes written and fsynced, new info written to the temp file but never renamed.
    with (directory / f"{b.id}.bin").open("ab") as f:
        f.write(b"ghij")
    newer = UploadInfo.from_json((directory / f"{b.id}.json").read_bytes())
    (directory / f"{b.id}.json.tmp").write_bytes(replace(newer, offset=10).to_json())
    # Crash 3: a data file created for an upload whose info never reached the disk.
    orphan = "O" * 32
    (directory / f"{orphan}.bin").write_bytes(b"x")
    # Not ours: left alone.
    (directory / "README").write_text("operator notes")

    restarted = _store(directory)
    restarted.load()
    assert restarted.get(a.id).offset == 4  # type: ignore[union-attr]
    assert (directory / f"{a.id}.bin").read_bytes() == b"0123"
    assert restarted.get(b.id).offset == 6  # type: ignore[union-attr]
    assert (directory / f"{b.id}.bin").read_bytes() == b"abcdef"
    assert not (directory / f"{b.id}.json.tmp").exists()
    assert not (directory / f"{orphan}.bin").exists()
    assert (directory / "README").exists()
    assert restarted.usage("k1") == 20
    info = await restarted.append(b.id, offset=6, chunks=_chunks(b"ghij"))
    assert info.finished
    with restarted.open_finished(b.id) as f:
        assert f.read() == b"abcdefghij"


async def test_uploads_survive_a_gateway_restart(make_gateway: MakeGateway) -> None:
    first = await make_gateway()
    url = await create(first, 6, Upload_Metadata=f"filename {b64('p.jsonl')}")
    assert (await patch(first, url, 0, b"abc")).status == 204
    await first.close()

    second = await make_gateway()
    resp = await head(second, url)
    assert resp.status == 200 and resp.headers["Upload-Offset"] == "3"
    assert resp.headers["Upload-Metadata"] == f"filename {b64('p.jsonl')}"
    assert (await patch(second, url, 3, b"def")).status == 204
    assert store_of(second).lookup(upload_id(url), KEY_IDS["upload"]).finished


# --- the store API the Files API builds on
async def test_store_api_for_files(tmp_path: Path) -> None:
    store = _store(tmp_path / "up")
    store.load()
    meta = parse_metadata(f"filename {b64('in.jsonl')},purpose {b64('batch')}")
    info = await store.create("k1", 5, meta)
    with pytest.raises(UploadNotFinished):
        store.open_finished(info.id)
    info = await store.append(info.id, offset=0, chunks=_chunks(b"he", b"llo"))
    assert info.finished and info.size == 5 and info.completed_at is not None and info.expires_at is None
    assert info.metadata.filename == "in.jsonl" and info.metadata.purpose == "batch"
    assert [i.id for i in store.list_for_key("k1")] == [info.id]
    assert store.list_for_key("k2") == []
    assert b"".join([p async for p in store.iter_finished(info.id, 2)]) == b"hello"
    assert store.data_path(info.id).read_bytes() == b"hello"
    assert store.usage("k1") == 5
    assert await store.delete(info.id) is True
    assert await store.delete(info.id) is False
    assert store.usage("k1") == 0 and store.get(info.id) is None

    # put(): a whole stream of unknown size becomes a finished upload at once.
    put = await store.put("k1", _chunks(b"{}\n", b"[]\n"), meta)
    assert put.finished and put.length == 6 and put.metadata.filename == "in.jsonl"
    with store.open_finished(put.id) as f:
        assert f.read() == b"{}\n[]\n"
    with pytest.raises(UploadTooLarge):
        await store.put("k1", _chunks(b"x" * 6000, b"x" * 6000))  # max_size is 10,000
    assert [i.id for i in store.list_for_key("k1")] == [put.id]  # the failed one left nothing
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == [f"{put.id}.bin", f"{put.id}.json"]


def test_metadata_parsing() -> None:
    meta = parse_metadata(f"filename {b64('a b.jsonl')}, empty,purpose {b64('batch')},bin {b64(bytes([255]))}")
    assert meta.values == {"filename": "a b.jsonl", "empty": "", "purpose": "batch"}
    assert parse_metadata(None).values == {} and parse_metadata("  ").header == ""
    for bad in ("a b c", ",", f"x {b64('y')}=", "k " + "A" * 5000, ",".join(f"k{i}" for i in range(40))):
        with pytest.raises(InvalidUploadRequest):
            parse_metadata(bad)


def test_upload_concat_parsing() -> None:
    a, b = "A" * 32, "B" * 32
    assert parse_concat(None, base_path="/v1/upload/", max_parts=2) == (None, ())
    assert parse_concat(" partial ", base_path="/v1/upload/", max_parts=2) == ("partial", ())
    value = f"final;https://gw.example/prefix/v1/upload/{a}  /v1/upload/{b}/"
    assert parse_concat(value, base_path="/v1/upload/", max_parts=2) == ("final", (a, b))
    for bad in ("final;", "final", "partial;x", f"final;/v1/upload/{a}%2Fx", f"final;/v1/uploads/{a}",
                f"final;/v1/upload/{a} /v1/upload/{b} /v1/upload/{a}b", "finale;/v1/upload/x"):
        with pytest.raises(InvalidUploadRequest):
            parse_concat(bad, base_path="/v1/upload/", max_parts=2)


def test_upload_settings_are_validated() -> None:
    for name, value in (("upload_max_size", 0), ("upload_key_quota_bytes", -1), ("upload_expiry_seconds", 0),
                        ("upload_sweep_interval", -5), ("upload_dir", ""), ("upload_max_lifetime_seconds", 0),
                        ("upload_key_max_uploads", 0), ("upload_metadata_max_bytes", 10),
                        ("upload_metadata_max_bytes", 100_000), ("upload_concat_max_parts", 0)):
        with pytest.raises(SettingsError) as caught:
            load_settings(_env_file=None, **{name: value})
        assert name.upper() in str(caught.value)


# --- a real crash: SIGKILL of `python -m gateway serve` in the middle of a PATCH
def _serve(tmp_path: Path, port: int, upload_dir: Path, sim_url: str, redis_prefix: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "REDIS_URL": REDIS_URL,
           "REDIS_PREFIX": redis_prefix, "AUTH_KEYS_FILE": str(write_keys_file(tmp_path / "keys.json")),
           "RUNTIME_BACKEND": "external", "RUNTIME_URL": sim_url, "REALTIME_MODEL": REALTIME_MODEL,
           "UPLOAD_DIR": str(upload_dir), "LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
    return proc


def test_sigkill_mid_patch_keeps_exactly_the_acknowledged_bytes(tmp_path: Path, upload_dir: Path, sim_url: str,
                                                                 redis_prefix: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = os.urandom(3 * MiB)
    proc = _serve(tmp_path, port, upload_dir, sim_url, redis_prefix)
    try:
        resp = requests.post(base + "/v1/upload/", headers={**headers(), "Upload-Length": str(len(data))}, timeout=10)
        url = base + resp.headers["Location"]
        uid = upload_id(url)
        resp = requests.patch(url, data=data[:MiB], timeout=10,
                              headers={**headers(), "Upload-Offset": "0", "Content-Type": OCTETS})
        assert resp.status_code == 204 and resp.headers["Upload-Offset"] == str(MiB)

        # Half of the next chunk reaches the disk, then the process dies before acknowledging it.
        sock = socket.create_connection(("127.0.0.1", port))
        request = (f"PATCH /v1/upload/{uid} HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * MiB}\r\n"
                   f"Content-Type: {OCTETS}\r\nUpload-Offset: {MiB}\r\nTus-Resumable: 1.0.0\r\n"
                   f"Authorization: {auth('upload')['Authorization']}\r\n\r\n").encode()
        sock.sendall(request + data[MiB:MiB + MiB // 2])
        deadline = time.monotonic() + 20
        while (upload_dir / f"{uid}.bin").stat().st_size < MiB + MiB // 2:
            assert time.monotonic() < deadline, "the streamed bytes never reached the data file"
            time.sleep(0.02)
        proc.kill()
        proc.wait(10)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert (upload_dir / f"{uid}.bin").stat().st_size == MiB + MiB // 2  # the unacknowledged tail is on disk
    assert UploadInfo.from_json((upload_dir / f"{uid}.json").read_bytes()).offset == MiB

    proc = _serve(tmp_path, port, upload_dir, sim_url, redis_prefix)
    try:
        resp = requests.head(url, headers=headers(), timeout=10)
        assert resp.status_code == 200 and resp.headers["Upload-Offset"] == str(MiB)
        assert (upload_dir / f"{uid}.bin").read_bytes() == data[:MiB]
        resp = requests.patch(url, data=data[MiB:], timeout=10,
                              headers={**headers(), "Upload-Offset": str(MiB), "Content-Type": OCTETS})
        assert resp.status_code == 204 and resp.headers["Upload-Offset"] == str(len(data))
        assert (upload_dir / f"{uid}.bin").read_bytes() == data
    finally:
        proc.terminate()
        proc.wait(30)
