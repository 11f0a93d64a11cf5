"""Form bodies for POST /v1/videos: OpenAI's SDK (``client.videos.create``) sends multipart/form-data, whose values
are all text. ``FormAsJsonRoute`` turns such a body into the JSON object the route validates, numbers as numbers, so
a form and a JSON body take the same checks and get the same errors; a JSON body passes through untouched.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import UploadFile

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Reference images or videos (OpenAI's input_reference): this server makes videos from text only.
_UPLOADS = "text to video only: no reference image or video"


def _number_kind(annotation: object) -> type | None:
    """int or float when a field takes one (``int | None`` included), else None (text, enums)."""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(
        annotation) is typing.Union else (annotation,)
    for kind in (int, float):
        if kind in kinds:
            return kind
    return None


# What JSON would take as a number: int() and float() also take spaces, underscores and other scripts' digits.
_NUMBER = {int: re.compile(r"-?[0-9]+"), float: re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")}


def _as_json_value(model: type[BaseModel], name: str, text: str) -> object:
    field = model.model_fields.get(name)
    kind = _number_kind(field.annotation) if field is not None else None
    if kind is None or not _NUMBER[kind].fullmatch(text):
        return text  # text, or not a number: the model names the field and its accepted range
    return kind(text)


async def form_as_object(request: Request, model: type[BaseModel]) -> dict[str, object]:
    form = await request.form()
    try:
        data: dict[str, object] = {}
        errors = []
        for name in dict.fromkeys(form.keys()):
            values = form.getlist(name)
            if any(isinstance(v, UploadFile) for v in values):
                errors.append({"loc": ("body", name), "msg": f"files are not accepted ({_UPLOADS})",
                               "type": "value_error", "input": None})
            elif len(values) > 1:
                errors.append({"loc": ("body", name), "msg": "given more than once", "type": "value_error",
                               "input": None})
            else:
                data[name] = _as_json_value(model, name, str(values[0]))
        if errors:
            raise RequestValidationError(errors)
        return data
    finally:
        await form.close()


class FormAsJsonRoute(APIRoute):
    """An APIRoute whose JSON body model may also come as a form."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None

        async def route(request: Request) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if model is not None and kind in FORM_TYPES:
                body = json.dumps(await form_as_object(request, model)).encode()
                scope = dict(request.scope)
                scope["headers"] = [(k, v) for k, v in request.scope["headers"]
                                    if k not in (b"content-type", b"content-length")]
                scope["headers"] += [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(body)).encode())]

                async def receive() -> dict:
                    return {"type": "http.request", "body": body, "more_body": False}

                request = Request(scope, receive)
            return await handler(request)

        return route


def form_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` that documents the form bodies beside the JSON one."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        **{kind: {"schema": schema} for kind in FORM_TYPES},
    }}}
