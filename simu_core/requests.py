"""Sequential deletion requests (``data.requests``): which forget items each request removes.

A request is a list of selectors over the forget split's item ids (``forget-<row>``): one item,
``forget-12``, or a half-open range, ``forget-0:10``. ``data.requests = N`` cuts the forget split
into N contiguous batches in item order (``numpy.array_split``'s sizes: the first ``len % N``
batches one item longer). Requests must not share items. Request i is evaluated on the union of
requests 1..i in :func:`union_order` (the requests in turn), so that ``eval.max_items`` evaluates
items of every request. No Prefect and no heavy imports here:
the config validates ``data.requests`` with :func:`check_requests`, so this module is behind every
stage's code version (``tasks/versions.py``); it imports nothing from ``simu_core`` (not even for
type hints), so the benchmark loaders do not join them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

PREFIX = "forget"
_SELECTOR = re.compile(rf"^{PREFIX}-(\d+)(?::(\d+))?$")
_SHOWN = 5  # ids named in an error message before "... (N in all)"

Requests = int | list[list[str]]


class RequestError(ValueError):
    """``data.requests`` is invalid; the message names the request and the selector or items."""


def item_id(row: int) -> str:
    """The forget split's item id of a row."""
    return f"{PREFIX}-{row}"


def _listing(parts: Sequence[range]) -> str:
    """The item ids of disjoint row ranges, the first few named (ranges are never materialised:
    a mistyped ``forget-0:10000000000`` must not fill the memory)."""
    parts = sorted(parts, key=lambda part: part.start)
    total = sum(len(part) for part in parts)
    shown = [item_id(row) for part in parts for row in part[:_SHOWN]][:_SHOWN]
    return ", ".join(shown) if total <= _SHOWN else f"{', '.join(shown)}, ... ({total} in all)"


def parse_selector(selector: Any, request: int) -> range:
    """Rows a selector names: ``forget-12`` -> 12, ``forget-0:10`` -> 0..9 (``request``: 1-based, for messages)."""
    where = f"data.requests: request {request}, selector {selector!r}"
    match = _SELECTOR.match(selector) if isinstance(selector, str) else None
    if match is None:
        raise RequestError(f"{where}: expected an item id '{PREFIX}-<row>' or a range '{PREFIX}-<start>:<end>'")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start + 1
    if end <= start:
        raise RequestError(f"{where}: empty range (the end is exclusive and must be above the start)")
    return range(start, end)


def check_requests(requests: Any) -> Requests | None:
    """Validate ``data.requests`` as written (no benchmark needed); return it unchanged.

    An int must be >= 2; a list must hold non-empty requests of well-formed selectors, and no
    item may be named twice (within a request or by two requests). Raises :class:`RequestError`.
    """
    if requests is None:
        return None
    if isinstance(requests, bool) or not isinstance(requests, (int, list)):
        raise RequestError(f"data.requests: expected a number of requests (>= 2) or a list of requests "
                           f"(lists of item ids / ranges)")
    if isinstance(requests, int):
        if requests < 2:
            raise RequestError(f"data.requests: {requests} is too few: sequential deletion needs at least 2 "
                               "requests (leave data.requests unset for one forget set)")
        return requests
    if not requests:
        raise RequestError("data.requests: empty list: give at least one request (or leave it unset)")
    named: list[tuple[range, int]] = []  # every selector's rows so far, with its request
    for index, request in enumerate(requests, 1):
        if not isinstance(request, list) or not request:
            raise RequestError(f"data.requests: request {index} is {request!r}: expected a non-empty list of "
                               f"item ids ('{PREFIX}-12') or ranges ('{PREFIX}-0:10')")
        for selector in request:
            rows = parse_selector(selector, index)
            shared = [(range(max(rows.start, other.start), min(rows.stop, other.stop)), owner)
                      for other, owner in named if max(rows.start, other.start) < min(rows.stop, other.stop)]
            if shared:
                others = sorted({owner for _, owner in shared} - {index})
                who = (f"requests {', '.join(map(str, others))} and {index} overlap" if others else
                       f"request {index} names these items twice")
                raise RequestError(f"data.requests: {who} (selector {selector!r}): "
                                   f"{_listing([part for part, _ in shared])}")
            named.append((rows, index))
    return requests


def expand_requests(requests: Requests, forget_size: int) -> list[list[str]]:
    """The item ids of every request, in order, for a forget split of ``forget_size`` items.

    Raises :class:`RequestError` when a request names items the benchmark lacks, or when more
    requests are asked than there are forget items.
    """
    check_requests(requests)
    if isinstance(requests, int):
        if requests > forget_size:
            raise RequestError(f"data.requests={requests}: more requests than the {forget_size} forget items "
                               "(every request needs at least one)")
        size, extra = divmod(forget_size, requests)
        bounds = [index * size + min(index, extra) for index in range(requests + 1)]
        return [[item_id(row) for row in range(start, end)] for start, end in zip(bounds, bounds[1:])]
    expanded = []
    for index, request in enumerate(requests, 1):
        parts = [parse_selector(selector, index) for selector in request]
        missing = [range(max(part.start, forget_size), part.stop) for part in parts if part.stop > forget_size]
        if missing:
            raise RequestError(f"data.requests: request {index} names items not in the benchmark (its forget split "
                               f"has {forget_size} items, {item_id(0)} to {item_id(forget_size - 1)}): "
                               f"{_listing(missing)}")
        expanded.append([item_id(row) for part in parts for row in part])
    return expanded


def request_count(requests: Requests) -> int:
    """How many requests ``data.requests`` (as written) makes."""
    return requests if isinstance(requests, int) else len(requests)


def union_order(requests: Sequence[Sequence[str]]) -> list[str]:
    """The items of the requests so far, taken from each request in turn (round-robin: the first
    item of every request, then the second, ...; a request that has run out is skipped).

    The union's evaluation keeps the first ``eval.max_items`` forget items; in this order that cut
    holds items of every request (at least one each when ``eval.max_items >= len(requests)``, which
    the config requires) rather than request 1's only.
    """
    order: list[str] = []
    for rank in range(max((len(request) for request in requests), default=0)):
        order.extend(request[rank] for request in requests if rank < len(request))
    return order


def restrict_forget(benchmark: "QABenchmark", item_ids: Sequence[str]) -> "QABenchmark":  # noqa: F821
    """The benchmark (``simu_core.data.schema.QABenchmark``) with its forget split cut to ``item_ids``
    (in that order); other splits unchanged."""
    forget = benchmark["forget"]
    positions = {item: position for position, item in enumerate(forget["item_id"].astype(str))}
    missing = [item for item in item_ids if item not in positions]
    if missing:
        more = f", ... ({len(missing)} in all)" if len(missing) > _SHOWN else ""
        raise RequestError(f"items not in the forget split ({len(forget)} items): {', '.join(missing[:_SHOWN])}{more}")
    chosen = forget.iloc[[positions[item] for item in item_ids]].reset_index(drop=True)
    return dataclasses.replace(benchmark, splits={**benchmark.splits, "forget": chosen})
