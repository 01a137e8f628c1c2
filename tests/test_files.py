"""OpenAI Files API: the official `openai` SDK and raw multipart requests against a full gateway."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import openai
import pytest

from gateway.bootstrap import create_app
from gateway.http.appkeys import UPLOADS
from tests.conftest import KEY_IDS, auth, free_port, sdk

TUS = {"Tus-Resumable": "1.0.0"}


def form(data: bytes, *, filename: str = "in.jsonl", purpose: str | None = "batch",
         purpose_first: bool = True) -> aiohttp.FormData:
    """A multipart body like the SDK's (the purpose before or after the file)."""
    fd = aiohttp.FormData()
    if purpose is not None and purpose_first:
        fd.add_field("purpose", purpose)
    fd.add_field("file", io.BytesIO(data), filename=filename, content_type="application/jsonl")
    if purpose is not None and not purpose_first:
        fd.add_field("purpose", purpose)
    return fd


async def test_sdk_create_retrieve_list_content_delete(gateway: Any) -> None:
    client = sdk(gateway)
    data = b'{"a": 1}\n{"b": 2}\n'
    created = await client.files.create(file=("prompts.jsonl", data), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(data) and created.filename == "prompts.jsonl"
    assert created.purpose == "batch" and created.status == "processed" and created.created_at > 0

    assert (await client.files.retrieve(created.id)).id == created.id
    listed = await client.files.list()
    assert [f.id for f in listed.data] == [created.id]
    assert [f.id for f in (await client.files.list(purpose="batch_output")).data] == []
    content = await client.files.content(created.id)
    assert content.content == data

    deleted = await client.files.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(created.id)
    assert gateway.app[UPLOADS].list_for_key(KEY_IDS["batch"]) == []


async def test_list_pagination_and_order(gateway: Any) -> None:
    client = sdk(gateway)
    ids = [(await client.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="batch")).id for i in range(3)]
    resp = await gateway.get("/v1/files?limit=2", headers=auth("batch"))
    page = await resp.json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    resp = await gateway.get(f"/v1/files?limit=2&after={page['last_id']}", headers=auth("batch"))
    page = await resp.json()
    assert [f["id"] for f in page["data"]] == [ids[0]] and page["has_more"] is False
    resp = await gateway.get("/v1/files?order=asc", headers=auth("batch"))
    assert [f["id"] for f in (await resp.json())["data"]] == ids
    for query in ("limit=0", "order=sideways", "purpose=fine-tune", "after=file-nope"):
        resp = await gateway.get(f"/v1/files?{query}", headers=auth("batch"))
        assert resp.status == 400, query
        assert (await resp.json())["error"]["param"] in ("limit", "order", "purpose", "after")


async def test_another_keys_file_is_404(gateway: Any) -> None:
    mine = await sdk(gateway).files.create(file=("mine.jsonl", b"{}\n"), purpose="batch")
    other = sdk(gateway, "batch2")
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(mine.id)
    assert (await other.files.list()).data == []
    assert (await sdk(gateway).files.retrieve(mine.id)).id == mine.id  # still there


async def test_multipart_field_order_and_errors(gateway: Any) -> None:
    data = b'{"x": 1}\n'
    resp = await gateway.post("/v1/files", data=form(data, purpose_first=False), headers=auth("batch"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["bytes"] == len(data)

    store = gateway.app[UPLOADS]
    before = len(store.list_for_key(KEY_IDS["batch"]))
    cases = [
        (form(data, purpose=None), "purpose"),
        (form(data, purpose="fine-tune"), "purpose"),
        (form(data, purpose="fine-tune", purpose_first=False), "purpose"),
    ]
    for body, param in cases:
        resp = await gateway.post("/v1/files", data=body, headers=auth("batch"))
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == param
    fd = aiohttp.FormData()
    fd.add_field("purpose", "batch")
    resp = await gateway.post("/v1/files", data=fd, headers=auth("batch"))
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "file"
    resp = await gateway.post("/v1/files", json={"file": "x"}, headers=auth("batch"))
    assert resp.status == 400 and "multipart" in (await resp.json())["error"]["message"]
    # A refused upload leaves nothing behind (the file part may have been stored before the purpose came).
    assert len(store.list_for_key(KEY_IDS["batch"])) == before

    # A path in the part's file name never survives as a path.
    resp = await gateway.post("/v1/files", data=form(data, filename="../../etc/x.jsonl"), headers=auth("batch"))
    name = (await resp.json())["filename"]
    assert "/" not in name and name.endswith("x.jsonl")


async def test_upload_larger_than_client_max_size_is_streamed(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(max_body_bytes=64 * 1024)))
    data = b"".join(b'{"custom_id": "%d"}\n' % i for i in range(60_000))  # ~1.2 MB, far above 64 KiB
    created = await sdk(client).files.create(file=("big.jsonl", data), purpose="batch")
    assert created.bytes == len(data)
    assert (await sdk(client).files.content(created.id)).content == data


async def test_size_limit_and_quota_are_413(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(upload_max_size=1000, upload_key_quota_bytes=1500)))
    resp = await client.post("/v1/files", data=form(b"x" * 1001), headers=auth("batch"))
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "upload_too_large"
    resp = await client.post("/v1/files", data=form(b"x" * 900), headers=auth("batch"))
    assert resp.status == 200
    resp = await client.post("/v1/files", data=form(b"x" * 900), headers=auth("batch"))
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "upload_quota_exceeded"
    assert len(client.app[UPLOADS].list_for_key(KEY_IDS["batch"])) == 1


async def test_finished_tus_upload_is_a_file_of_the_same_key(gateway: Any) -> None:
    # The "all" key holds both the upload and the batch scope.
    data = b'{"custom_id": "a"}\n'
    resp = await gateway.post("/v1/upload/", headers={**auth("all"), **TUS, "Upload-Length": str(len(data))})
    assert resp.status == 201
    upload_id = resp.headers["Location"].rsplit("/", 1)[-1]
    fid = f"file-{upload_id}"
    # Unfinished: not a file yet.
    resp = await gateway.get(f"/v1/files/{fid}", headers=auth("all"))
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "upload_not_finished"
    assert (await sdk(gateway, "all").files.list()).data == []
    resp = await gateway.patch(f"/v1/upload/{upload_id}", data=data, headers={
        **auth("all"), **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert resp.status == 204

    client = sdk(gateway, "all")
    info = await client.files.retrieve(fid)
    assert info.bytes == len(data) and info.purpose == "batch" and info.filename == "upload.jsonl"
    assert [f.id for f in (await client.files.list()).data] == [fid]
    assert (await client.files.content(fid)).content == data
    # The bare upload id works too; other keys see nothing.
    assert (await client.files.retrieve(upload_id)).id == fid
    with pytest.raises(openai.NotFoundError):
        await sdk(gateway, "batch").files.retrieve(fid)


async def test_scopes_of_the_files_routes(gateway: Any) -> None:
    for role in ("upload", "realtime", "monitor", "eval"):
        resp = await gateway.get("/v1/files", headers=auth(role))
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_scope"
    resp = await gateway.get("/v1/files")
    assert resp.status == 401
    assert (await gateway.get("/v1/files", headers=auth("batch"))).status == 200


async def test_redis_down_is_a_503_not_a_500(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")))
    # The Batches routes, and every other route that needs Redis (jobs, evals): one answer for all.
    # (Ids of the right shape: a malformed one is a 404 without asking Redis.)
    batch_id = "batch_" + "0" * 24
    routes = (("GET", "/v1/batches", "batch"), ("GET", f"/v1/batches/{batch_id}", "batch"),
              ("POST", f"/v1/batches/{batch_id}/cancel", "batch"), ("GET", "/v1/jobs", "batch"),
              ("GET", "/v1/jobs/job_0123456789abcdef01234567", "batch"), ("GET", "/eval/runs", "eval"))
    for method, path, role in routes:
        resp = await client.request(method, path, headers=auth(role))
        assert resp.status == 503, (path, await resp.text())
        assert resp.headers["Retry-After"] == "5"
        assert (await resp.json())["error"]["code"] == "redis_unavailable"
    # Files live on local disk: listing them still works without Redis.
    assert (await client.get("/v1/files", headers=auth("batch"))).status == 200


@pytest.mark.parametrize("filename", ['a"; x="y.jsonl', "prüfung ✓ €.jsonl", "plain.jsonl", "back\\slash;=%.jsonl"])
async def test_download_content_disposition_follows_rfc_6266(gateway: Any, filename: str) -> None:
    data = b'{"a": 1}\n'
    resp = await gateway.post("/v1/files", data=form(data, filename=filename), headers=auth("batch"))
    assert resp.status == 200, await resp.text()
    stored = (await resp.json())["filename"]
    resp = await gateway.get(f"/v1/files/{(await resp.json())['id']}/content", headers=auth("batch"))
    assert resp.status == 200 and await resp.read() == data
    raw = resp.raw_headers
    value = next(v for k, v in raw if k.lower() == b"content-disposition")
    value.decode("ascii")  # never raw UTF-8 on the wire
    disposition, params = aiohttp.multipart.parse_content_disposition(value.decode("ascii"))
    assert disposition == "attachment"
    # A quote in the name cannot smuggle in another parameter: only the two filename forms are there.
    assert set(params) == {"filename", "filename*"}
    assert params["filename"].isascii()
    assert aiohttp.multipart.content_disposition_filename(params, "filename") == stored


async def test_files_count_against_the_per_key_upload_count(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(upload_key_max_uploads=2)))
    for _ in range(2):
        assert (await client.post("/v1/files", data=form(b""), headers=auth("batch"))).status == 200
    resp = await client.post("/v1/files", data=form(b"{}\n"), headers=auth("batch"))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "upload_count_exceeded"
    assert len(client.app[UPLOADS].list_for_key(KEY_IDS["batch"])) == 2
