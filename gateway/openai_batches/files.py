"""Files of the OpenAI Files API: finished uploads of the upload store, seen through OpenAI's file object.

A file id IS an upload id with the prefix `file-`: a file made by POST /v1/files and a finished TUS
upload are the same kind of thing, and a TUS upload needs no copy or mapping to become a file.
Input files have purpose `batch` (the only purpose accepted); the output and error files a batch
writes have purpose `batch_output`.
"""

from __future__ import annotations

import base64
from typing import Any

from gateway.uploads.metadata import UploadMetadata
from gateway.uploads.store import UploadInfo, valid_upload_id

FILE_PREFIX = "file-"
PURPOSE_INPUT = "batch"
PURPOSE_OUTPUT = "batch_output"
DEFAULT_FILENAME = "upload.jsonl"


def file_id(upload_id: str) -> str:
    """The file id of an upload."""
    return FILE_PREFIX + upload_id


def upload_id_of(file_id_: str) -> str | None:
    """The upload id behind a file id (the bare upload id is accepted too), or None if malformed."""
    upload_id = file_id_.removeprefix(FILE_PREFIX)
    return upload_id if valid_upload_id(upload_id) else None


def purpose_of(info: UploadInfo) -> str:
    """An upload's purpose; a TUS upload that declared none is a batch input file."""
    return info.metadata.values.get("purpose") or PURPOSE_INPUT


def file_object(info: UploadInfo) -> dict[str, Any]:
    """OpenAI's file object for a finished upload."""
    return {
        "id": file_id(info.id),
        "object": "file",
        "bytes": info.size,
        "created_at": int(info.completed_at or info.created_at),
        "filename": info.metadata.filename or DEFAULT_FILENAME,
        "purpose": purpose_of(info),
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def make_metadata(values: dict[str, str]) -> UploadMetadata:
    """Upload metadata with a TUS header that says the same (HEAD on the upload echoes it).

    Used for the gateway's own files (batch output) and for multipart uploads, whose values the
    caller has already checked; purposes other than `batch` are only ever set here.
    """
    header = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())
    return UploadMetadata(header=header, values=dict(values))
