"""The OpenAI Files and Batches API on top of the upload store and the batch queue.

`files` maps finished uploads to OpenAI file objects; `lines` reads and checks JSONL input lines;
`records` keeps batch records in Redis; `manager` is the actor that drives each batch's lifecycle.
The HTTP routes live in `gateway.http.files` and `gateway.http.batches`.
"""
