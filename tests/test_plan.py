"""The plan's verdict on single rows (jobs/plan.py), without Ray: what a work row says before any actor."""

from __future__ import annotations

from actors.models import describe_model
from jobs.plan import PlanState, plan_row


def state(**fields) -> PlanState:
    return PlanState(models={"default": describe_model("default", "tiny").defaults()}, watermark="sdfleet", **fields)


def test_a_row_naming_a_broken_adapter_twice_fails_with_its_reason_once():
    raw = {"id": "mug", "prompt": "a red mug", "adapters": [{"name": "x", "scale": 1.0}, {"name": "x", "scale": 0.5}]}
    work = plan_row(raw, source="m.parquet", row=3, state=state(adapter_errors={"x": "adapter 'x': not in the store"}))
    assert (work["status"], work["error"]) == ("failed", "adapter 'x': not in the store")


def test_a_row_too_small_for_the_mark_is_invalid_naming_where_it_is_and_the_way_out():
    work = plan_row({"id": "small", "prompt": "a mug", "width": 128}, source="m.parquet", row=0, state=state())
    assert work["status"] == "invalid"
    assert work["error"].startswith("m.parquet row 0 (`small`): 128x256 is too small") and "--no-watermark" in work["error"]
