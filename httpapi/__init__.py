"""billcore's HTTP/JSON API for integrators: an edge that maps HTTP + JSON onto URFA calls.

``POST /api/v1/calls/{name}`` calls ``name`` as the bearer token's own core
session; ``GET /api/v1/openapi.json`` is the OpenAPI 3.1 document of that
session's call table.  The pieces: ``openapi`` (the document, pure),
``values`` (JSON <-> URFA values by declared types, pure), ``problems``
(error codes -> HTTP statuses, pure), ``limits`` (per-token rate, pure),
``tokens`` (token -> core session) and ``app`` (the aiohttp app and the
``httpapi`` role).  Like every edge it imports nothing of billcore but
``billcore.common``.
"""
