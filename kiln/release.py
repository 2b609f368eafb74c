"""How a pipeline's model versions meet traffic: the route table of a release, decided from ``serving.release``.

One pure function, :func:`route_table`, turns the spec's release (``none`` | ``canary`` | ``shadow``) and the
champion/challenger versions into backends with integer weights (summing to 100) and, for shadow, a mirror target.
Renderers (``resources/kubernetes.py``: Deployments, Services and a Gateway API HTTPRoute) read it, so the
weights a cluster routes by and the release the spec asks for cannot disagree.

- ``none``: the champion serves 100%; a challenger, if any, is not routed (and not deployed).
- ``canary``: the challenger serves ``round(challenger_share * 100)`` (half up) of 100, the champion the rest. A share
  strictly between 0 and 1 never rounds to an arm with nothing (at least 1, at most 99), so a canary that asks for
  traffic gets some and the champion keeps some. Share 0: the champion only (the challenger would serve nothing).
  Share 1: the challenger 100 and the champion kept with weight 0, deployed and ready to take traffic back.
- ``shadow``: the champion serves 100%; every request is also mirrored to the challenger, whose answers are never
  served.
- no challenger: the champion only, whatever the mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from kiln.spec import PipelineSpec

Version = str  # a model registry version of the pipeline's model, e.g. MLflow's "7"
Role = Literal["champion", "challenger"]
TOTAL_WEIGHT = 100
# A version names Kubernetes objects (`<p>-v<version>`) and label values: lower-case letters, digits and '-' inside.
VERSION_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class ReleaseError(ValueError):
    """A route table cannot be built; the message names the pipeline, the field and the reason."""


@dataclass(frozen=True)
class Backend:
    """One served (or mirrored) model version: ``name`` is ``<p>-v<version>``, ``weight`` its share of 100."""

    name: str
    role: Role
    version: Version
    weight: int


@dataclass(frozen=True)
class RouteTable:
    """Where a pipeline's traffic goes: weighted ``backends`` (weights sum to 100) and an optional ``mirror``."""

    pipeline: str
    mode: Literal["none", "canary", "shadow"]
    backends: tuple[Backend, ...]
    mirror: Backend | None = None

    @property
    def champion(self) -> Backend:
        return next(b for b in self.backends if b.role == "champion")

    @property
    def versions(self) -> tuple[Version, ...]:
        """Every version that must be running: the served backends, then the mirror target."""
        return tuple(b.version for b in self.backends) + ((self.mirror.version,) if self.mirror else ())

    def weights(self) -> dict[Version, int]:
        """Served share of 100 per version (a mirror serves nothing and is not listed)."""
        return {b.version: b.weight for b in self.backends}


def backend_name(pipeline: str, version: Version) -> str:
    """The name of a version's backend: ``<p>-v<version>``."""
    return f"{pipeline}-v{version}"


def _checked_version(pipeline: str, field: str, version: object) -> Version:
    text = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
    if not isinstance(text, str) or not VERSION_PATTERN.fullmatch(text):
        raise ReleaseError(f"{pipeline}: release: {field} version {version!r} must match {VERSION_PATTERN.pattern} "
                           "(it names Kubernetes objects and labels)")
    return text


def canary_weight(share: float) -> int:
    """The challenger's integer weight of 100 for a canary share: half-up rounding, kept in [1, 99] for 0 < share < 1."""
    if not 0 <= share <= 1:
        raise ReleaseError(f"serving.release.challenger_share: {share} is not in [0, 1]")
    weight = int((Decimal(repr(share)) * TOTAL_WEIGHT).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if 0 < share < 1:
        weight = min(TOTAL_WEIGHT - 1, max(1, weight))
    return weight


def route_table(spec: PipelineSpec, champion: Version, challenger: Version | None) -> RouteTable:
    """The route table of ``spec.serving.release`` for these champion and challenger versions (see the module doc)."""
    name = spec.name
    release = spec.serving.release
    champion = _checked_version(name, "champion", champion)
    if challenger is not None:
        challenger = _checked_version(name, "challenger", challenger)
        if challenger == champion:
            raise ReleaseError(f"{name}: release: the challenger is the champion (version {champion}); "
                               "pass challenger=None to serve the champion alone")

    def backend(role: Role, version: Version, weight: int) -> Backend:
        return Backend(backend_name(name, version), role, version, weight)

    if challenger is None or release.mode == "none":
        return RouteTable(name, release.mode, (backend("champion", champion, TOTAL_WEIGHT),))
    if release.mode == "shadow":
        return RouteTable(name, "shadow", (backend("champion", champion, TOTAL_WEIGHT),), mirror=backend("challenger", challenger, 0))
    if release.mode == "canary":
        weight = canary_weight(release.challenger_share)
        if weight == 0:
            return RouteTable(name, "canary", (backend("champion", champion, TOTAL_WEIGHT),))
        return RouteTable(name, "canary", (backend("champion", champion, TOTAL_WEIGHT - weight), backend("challenger", challenger, weight)))
    raise ReleaseError(f"{name}: serving.release.mode: {release.mode!r} is not one of none, canary, shadow")
