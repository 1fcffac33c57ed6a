"""The API-server stand-in stays faithful to the chart: it serves the CRDs the chart
installs, and no others, unless a test installs them."""

from __future__ import annotations

import pytest
from chart_support import template
from fake_apiserver import CHART_CRDS, CRD_BACKED, KINDS

pytestmark = pytest.mark.inprocess


def test_chart_crds_are_the_ones_helm_renders() -> None:
    rendered = {
        f"/apis/{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['plural']}"
        for (kind, _name), crd in template().items() if kind == "CustomResourceDefinition"
        for version in crd["spec"]["versions"] if version.get("served")}
    # Every CRD the chart serves is one the stand-in knows, and it serves exactly these.
    assert rendered and rendered <= set(KINDS)
    assert CHART_CRDS == rendered & CRD_BACKED == rendered
