"""What operators read: the JSON API (with its live feed), the operator page and the metrics.

``register_routes(app, service)`` gives an app those the host asked init_app for, each at
its path, and makes sure none of them shadows a rule of the host's (or is shadowed by one);
the shared HTTP pieces are http.py's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flask import Blueprint, Flask
from werkzeug.routing import Rule

from ..app_state import RouteClashError, app_state
from ..inference.service import InferenceService
from . import calls, daily, events, openapi, routes  # noqa: F401  (their routes are on bp)
from .http import bp
from .live import metrics_bp, register_live

# Our blueprints' names: an endpoint of ours is "<name>.<view>".
OUR_BLUEPRINTS = ("inference_api", "inference_console", "inference_metrics")
# Methods Flask answers by itself for every rule (HEAD with GET, OPTIONS always): two rules
# sharing only these do not take each other's requests.
_AUTOMATIC = frozenset({"HEAD", "OPTIONS"})
# A variable part of a rule, whose name does not change what the rule matches.
_VARIABLE = re.compile(r"<(?:([^>:]+(?:\([^>]*\))?):)?[^>:]+>")


def register_routes(app: Flask, service: InferenceService, page: Blueprint | None) -> None:
    """Attach the API under the app's url_prefix, and the page (``page``: the page's
    blueprint, which reads this API) and /metrics where the host put them; hook the service
    to the live feed. RouteClashError if a rule the app already
    has is one of ours; rules the host adds later are checked at the service's start and
    before the app's first request."""
    state = app_state(app)
    app.register_blueprint(bp, url_prefix=state.url_prefix)
    if page is not None:
        app.register_blueprint(page, url_prefix=state.page_path)
    if state.metrics_path is not None:
        app.register_blueprint(metrics_bp, url_prefix=state.metrics_path)
    register_live(app)
    check_routes(app)

    checked = False

    def check_once() -> None:
        # Cheap after the first request: one flag. Left unset while a clash stands, so every
        # request says so rather than being answered by whichever rule won.
        nonlocal checked
        if not checked:
            check_routes(app)
            checked = True

    app.before_request(check_once)
    service.on_start(lambda: check_routes(app))


def check_routes(app: Flask) -> None:
    """RouteClashError naming every rule of ours that is also one of the app's own (the same
    rule, variable names aside, and a method in common)."""
    ours = [r for r in app.url_map.iter_rules() if _is_ours(r.endpoint)]
    theirs: dict[str, list[Rule]] = {}
    for rule in app.url_map.iter_rules():
        if not _is_ours(rule.endpoint):
            theirs.setdefault(_shape(rule.rule), []).append(rule)
    clashes = []
    for rule in ours:
        for other in theirs.get(_shape(rule.rule), ()):
            shared = _shared(rule.methods, other.methods)
            if shared:
                clashes.append(
                    f"{'/'.join(sorted(shared))} {rule.rule}: {rule.endpoint} clashes with "
                    f"the host's {other.endpoint}"
                )
    if clashes:
        state = app_state(app)
        raise RouteClashError(
            f"{'; '.join(clashes)}; give init_app a url_prefix= (now {state.url_prefix!r}), "
            f"page_path= or metrics_path= that the host does not use"
        )


def _is_ours(endpoint: str) -> bool:
    return endpoint.partition(".")[0] in OUR_BLUEPRINTS


def _shape(rule: str) -> str:
    """The rule with its variables' names dropped: /calls/<int:id> and /calls/<int:n> match
    the same URLs."""
    return _VARIABLE.sub(lambda m: f"<{m.group(1) or 'default'}>", rule)


def _shared(one: Iterable[str] | None, other: Iterable[str] | None) -> set[str]:
    """The methods both rules answer, but those Flask answers for any rule (unless that is
    all a rule has); a rule without methods answers them all."""
    if one is None or other is None:
        given = one if one is not None else other
        return {"*"} if given is None else set(given) - _AUTOMATIC or set(given)
    a, b = set(one), set(other)
    return (a - _AUTOMATIC or a) & (b - _AUTOMATIC or b)
