"""The batch queue: job schemas, the Redis queue with its Lua scripts, and the job event stream.

The rules (priority with aging, leases, retries, model grouping) are written down in docs/batch.md.
"""
