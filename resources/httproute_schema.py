"""A hand-written schema check of the Gateway API v1 ``HTTPRoute`` that Kiln renders (``resources/kubernetes.py``).

HTTPRoute is a CRD: kubernetes-validate bundles core Kubernetes schemas only, and no installed package ships the
Gateway API CRDs. HTTPROUTE_SCHEMA is therefore HAND-WRITTEN, not the upstream CRD schema: a focused structural check
(JSON Schema, checked with ``jsonschema``, which kubernetes-validate depends on) of the HTTPRoute fields Kiln uses, with
the limits and patterns of the v1 API (weights 0..1000000, at most 16 rules/backendRefs/filters, 32 parentRefs, DNS
patterns) and two of its CEL rules (a Service reference needs a port; a RequestMirror filter needs ``requestMirror``).
Unknown fields are refused at every level, as kubernetes-validate --strict does for core objects.
Used by ``platform_defs/k8s.py: validate_objects`` and tests/test_k8s_release.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_DNS_SUBDOMAIN = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
_NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_REF = {"group": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN}, "kind": _KIND,
        "name": {"type": "string", "minLength": 1, "maxLength": 253}, "namespace": _NAMESPACE, "port": _PORT}
# CEL rule of BackendObjectReference: a Service (the default kind, core group) must name a port.
_SERVICE_NEEDS_PORT = {"if": {"properties": {"kind": {"const": "Service"}, "group": {"const": ""}}},
                       "then": {"required": ["port"]}}
_BACKEND_OBJECT_REF = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": _REF, **_SERVICE_NEEDS_PORT}
HTTPROUTE_SCHEMA: dict[str, Any] = {  # hand-written, see the module docstring
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": _DNS_SUBDOMAIN}, "namespace": _NAMESPACE,
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False, "properties": {
            "parentRefs": {"type": "array", "maxItems": 32, "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": _REF | {"sectionName": {"type": "string", "minLength": 1, "maxLength": 253}}}},
            "hostnames": {"type": "array", "maxItems": 16, "items": {"type": "string", "minLength": 1, "maxLength": 253}},
            "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 253},
                    "matches": {"type": "array", "maxItems": 64, "items": {
                        "type": "object", "additionalProperties": False, "properties": {
                            "path": {"type": "object", "additionalProperties": False, "properties": {
                                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                "value": {"type": "string", "maxLength": 1024}}}}}},
                    "filters": {"type": "array", "maxItems": 16, "items": {
                        "type": "object", "additionalProperties": False, "required": ["type"],
                        "properties": {
                            "type": {"enum": ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect",
                                              "URLRewrite", "ExtensionRef", "CORS"]},
                            "requestMirror": {"type": "object", "additionalProperties": False, "required": ["backendRef"],
                                              "properties": {"backendRef": _BACKEND_OBJECT_REF,
                                                             "percent": {"type": "integer", "minimum": 0, "maximum": 100}}}},
                        # CEL rule of HTTPRouteFilter: the RequestMirror type needs its requestMirror field.
                        "if": {"properties": {"type": {"const": "RequestMirror"}}}, "then": {"required": ["requestMirror"]}}},
                    "backendRefs": {"type": "array", "maxItems": 16, "items": {
                        "type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": _REF | {"weight": {"type": "integer", "minimum": 0, "maximum": 1000000}},
                        **_SERVICE_NEEDS_PORT}},
                }}},
        }},
    },
}


def httproute_error(route: Mapping[str, Any]) -> str | None:
    """None when ``route`` passes HTTPROUTE_SCHEMA, else ``<field path>: <message>`` of the first error found."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(HTTPROUTE_SCHEMA).iter_errors(dict(route)))
    if error is None:
        return None
    return f"{'.'.join(str(p) for p in error.absolute_path) or '(top level)'}: {error.message}"
