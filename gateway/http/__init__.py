"""The aiohttp front: app factory, middleware and one module per route family."""
