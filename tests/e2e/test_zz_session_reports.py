"""Every report the end-to-end session produced, whatever test caused it, is conformant."""

from __future__ import annotations

import json
from collections import Counter

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.conftest import TopicTap


async def test_every_report_of_the_session_passes_conformance_and_is_unique(tap: TopicTap) -> None:
    """All reports on medmesh.reports.diagnostic pass our conformance checks, one per request."""
    reports = tap.matching(topics.REPORTS_DIAGNOSTIC, lambda _record: True)
    assert len(reports) >= 10
    problems = {
        r.headers.get(h.CORRELATION_ID, "?"): check_report_bundle(json.loads(r.value))
        for r in reports
    }
    assert {cid: p for cid, p in problems.items() if p} == {}
    per_request = Counter(r.headers.get(h.CORRELATION_ID) for r in reports)
    assert [cid for cid, n in per_request.items() if n > 1] == []
