"""The ceiling for the accept benchmark: a bare Starlette endpoint that parses JSON and answers 202."""

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def completions(request: Request) -> JSONResponse:
    json.loads(await request.body())
    return JSONResponse({"result": "OK"}, 202)


app = Starlette(routes=[Route("/engines/{code}/{token}/completions", completions, methods=["POST"])])
