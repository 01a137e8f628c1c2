"""Resumable uploads (TUS 1.0.0): storage on local disk, protocol rules and the expiry sweeper.

The HTTP routes live in `gateway.http.uploads`; the Files API reads finished uploads through
`UploadStore` (`lookup`, `open_finished`, `iter_finished`, `data_path`, `delete`).
"""

from gateway.uploads.errors import BodyInterrupted, UploadError
from gateway.uploads.metadata import UploadMetadata, parse_metadata
from gateway.uploads.store import UploadInfo, UploadStore, valid_upload_id
from gateway.uploads.sweeper import UploadSweeper

__all__ = ["BodyInterrupted", "UploadError", "UploadInfo", "UploadMetadata", "UploadStore", "UploadSweeper",
           "parse_metadata", "valid_upload_id"]
