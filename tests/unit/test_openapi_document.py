"""The OpenAPI document describes every answer: each operation has a success with a schema or a media type,
and no JSON answer is an untyped object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support.api_client import faked_pacs_client

METHODS = ("get", "post", "put", "patch", "delete")
JSON = "application/json"


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    client = faked_pacs_client(Path(tmp_path_factory.mktemp("openapi")))
    answer: dict[str, Any] = client.get("/api/v1/openapi.json").json()
    return answer


def _operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{method.upper()} {path}", operation) for path, item in document["paths"].items()
            for method, operation in item.items() if method in METHODS]


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][name]
    return schema


def _free_form(document: dict[str, Any], schema: dict[str, Any]) -> bool:
    """An object with no properties of its own (or nothing at all) where a model should be."""
    schema = _resolve(document, schema)
    if schema.get("type") == "array":
        return _free_form(document, schema.get("items", {}))
    if "anyOf" in schema:
        return any(_free_form(document, part) for part in schema["anyOf"] if part.get("type") != "null")
    return not schema or (schema.get("type") == "object" and "properties" not in schema)


def test_the_document_has_the_api_operations(document: dict[str, Any]) -> None:
    assert len(_operations(document)) > 30


def test_every_operation_documents_a_success_with_a_schema_or_media_type(document: dict[str, Any]) -> None:
    undocumented = []
    for name, operation in _operations(document):
        successes = [answer for status, answer in operation["responses"].items() if status.startswith("2")]
        if not any(answer.get("content") for answer in successes):
            undocumented.append(name)
            continue
        for answer in successes:
            for media_type, content in answer.get("content", {}).items():
                if media_type == JSON and not content.get("schema"):
                    undocumented.append(f"{name} ({media_type} without a schema)")
    assert not undocumented, undocumented


def test_no_json_answer_is_an_untyped_object(document: dict[str, Any]) -> None:
    untyped = [
        f"{name} {status}"
        for name, operation in _operations(document)
        for status, answer in operation["responses"].items()
        if JSON in answer.get("content", {}) and _free_form(document, answer["content"][JSON].get("schema", {}))
    ]
    assert not untyped, untyped


def test_every_operation_documents_the_error_body(document: dict[str, Any]) -> None:
    for name, operation in _operations(document):
        for status in ("401", "403", "404", "422", "500", "503"):
            schema = operation["responses"][status]["content"][JSON]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (name, status)
