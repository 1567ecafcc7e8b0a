"""Access control: an optional key per API group, checked in constant time on REST and gRPC alike.

Groups (coarser than Triton's restricted API groups, same idea):

  inference  POST /classify, /explain, /v2/models/{name}/infer; gRPC ModelInfer
  metadata   the model's metadata, configuration and statistics: GET /v1/models, /v2, /v2/models/{name},
             .../config, .../stats; gRPC ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics
  metrics    GET /metrics

Open, whatever is set: the probes (/healthz, /readyz, /v2/health/*, model ready; gRPC ServerLive,
ServerReady, ModelReady), the web page and its files, the model's example images, /docs, /redoc and
/openapi.json. A group whose key (``PATCHLIFE_API_KEY_<GROUP>``) is unset is open too.

A caller presents ``Authorization: Bearer <key>`` (over gRPC, the metadata ``authorization``). A
missing or wrong key is 401 with ``WWW-Authenticate: Bearer`` (RFC 6750), or gRPC UNAUTHENTICATED.
Both sides are hashed (SHA-256) and the digests compared with :func:`hmac.compare_digest`: the time
taken depends neither on where the first wrong character is nor on the key's length.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from ..settings import Settings
from .errors import ApiError


class Group(str, Enum):
    INFERENCE = "inference"
    METADATA = "metadata"
    METRICS = "metrics"

    @property
    def setting(self) -> str:
        return f"PATCHLIFE_API_KEY_{self.name}"


REALM = "patchlife"
log = logging.getLogger("patchlife.access")


class Unauthorized(ApiError):
    """No key, or the wrong key, for a group that has one: 401 with the challenge a client expects."""
    status, code, reason = 401, "unauthorized", "unauthorized"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (the scheme is case-insensitive), else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class Keys:
    """The SHA-256 digest of each group's key; a group absent here is open. The keys themselves are
    not kept."""

    digests: dict[Group, bytes] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        digests = {}
        for group in Group:
            secret = getattr(settings, f"api_key_{group.value}")
            if secret is not None and secret.get_secret_value():
                digests[group] = _digest(secret.get_secret_value())
        return cls(digests)

    def required(self, group: Group) -> bool:
        return group in self.digests

    def allows(self, group: Group, authorization: str | None) -> bool:
        """True if ``group`` is open or ``authorization`` carries its key. The comparison runs whether
        or not a token was sent, on digests of equal length."""
        expected = self.digests.get(group)
        if expected is None:
            return True
        token = bearer_token(authorization)
        same = hmac.compare_digest(_digest(token or ""), expected)
        return same and token is not None

    def check(self, group: Group, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless :meth:`allows`."""
        if self.allows(group, authorization):
            return
        if bearer_token(authorization) is None:  # RFC 6750 3.1: no error code when no credentials came
            challenge = f'Bearer realm="{REALM}"'
            message = f"this needs the {group.value} key: send 'Authorization: Bearer <key>' ({group.setting})"
        else:
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
            message = f"wrong key for the {group.value} API group ({group.setting})"
        raise Unauthorized(message, headers={"WWW-Authenticate": challenge})


def require(group: Group) -> Any:
    """A route dependency (``dependencies=[require(Group.INFERENCE)]``) that answers 401 unless the
    request carries ``group``'s key. It runs before the handler reads the body. The function carries
    ``access_group`` so that the OpenAPI schema can say which operations need a key."""

    async def check_key(request: Request) -> None:
        keys: Keys = request.app.state.frontend.keys
        keys.check(group, request.headers.get("authorization"))

    check_key.access_group = group  # type: ignore[attr-defined]
    return Depends(check_key)


def api_routes(routes: Iterable[Any]) -> Iterator[APIRoute]:
    """Every APIRoute under ``routes`` (an app's), also those of routers that newer FastAPI releases
    (0.165 here) keep included as a unit (``original_router``) rather than copied into the app's list."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:
            yield from api_routes(router.routes)


def route_group(route: APIRoute) -> Group | None:
    """The access group of a route (from its router's or its own :func:`require`), None if open."""
    groups = {g for d in route.dependencies if (g := group_of(d.dependency)) is not None}
    if len(groups) > 1:
        raise ValueError(f"{route.path} is in several access groups: {sorted(g.value for g in groups)}")
    return groups.pop() if groups else None


def group_of(dependency: Any) -> Group | None:
    """The group a :func:`require` dependency checks (None for any other dependency)."""
    return getattr(dependency, "access_group", None)


# -- gRPC: every RPC of the .proto and its group (None: open) -------------------------------------
GRPC_GROUPS: dict[str, Group | None] = {
    "ServerLive": None, "ServerReady": None, "ModelReady": None,
    "ServerMetadata": Group.METADATA, "ModelMetadata": Group.METADATA, "ModelConfig": Group.METADATA,
    "ModelStatistics": Group.METADATA, "ModelInfer": Group.INFERENCE}


def grpc_authorization(metadata: Any) -> str | None:
    """The ``authorization`` value of a call's invocation metadata (keys arrive lower-case)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


# -- the warning at start -------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_groups_warning(settings: Settings) -> str | None:
    """What ``patchlife serve`` warns about at start: groups without a key on a non-loopback address."""
    if is_loopback(settings.host):
        return None
    keys = Keys.from_settings(settings)
    open_groups = [g for g in Group if not keys.required(g)]
    if not open_groups:
        return None
    names = ", ".join(g.value for g in open_groups)
    settings_names = ", ".join(g.setting for g in open_groups)
    return (f"serving on {settings.host} (not a loopback address) with no key for: {names}; anyone who "
            f"reaches the port may call them. Set {settings_names} to require a key.")


def warn_if_open(settings: Settings) -> None:
    """Log :func:`open_groups_warning` (once, by ``patchlife serve`` before it starts any process)."""
    message = open_groups_warning(settings)
    if message is not None:
        log.warning("%s", message)
