"""The API's own OpenAPI schema as a test's map: operationId to method and path, and
components as JSON Schema validators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema

METHODS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    path: str  # a template: /api/grants/{id}/links/
    spec: dict[str, Any]

    def url(self, **params: object) -> str:
        return self.path.format(**params)


def operations(schema: dict) -> dict[str, Operation]:
    return {
        spec["operationId"]: Operation(spec["operationId"], method.upper(), path, spec)
        for path, item in schema["paths"].items()
        for method, spec in item.items()
        if method in METHODS
    }


def component_validator(schema: dict, name: str) -> jsonschema.Validator:
    """Validates a value against components/schemas/<name>, its $refs resolved in `schema`."""
    root = {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}
    return jsonschema.Draft4Validator(root)
