"""Operators hear about it: a failed or crashed pipeline run and a moved `champion`, through Prefect.

    NOTIFY_URL=https://hooks.example.org/evaclip python -m flows.notifications    # `make stack` runs it

One webhook block (`evaclip-webhook`, a JSON POST of subject and text) and two automations on the Prefect
server: flow runs of `evaclip-pipeline` entering Failed or Crashed (scheduled runs included), and the event
`evaclip.champion.moved` that the pipeline emits when promotion moves the alias. Idempotent: a second call
updates the block and the automations in place.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Optional
from urllib.parse import urlsplit

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events import emit_event

BLOCK = "evaclip-webhook"
FLOW = "evaclip-pipeline"
CHAMPION_EVENT = "evaclip.champion.moved"


def ensure_notifications(url: str) -> None:
    """Create or update the webhook block and both automations on the Prefect API of the environment."""
    # The block's json_data takes its own {{subject}}/{{body}} placeholders; the actions' texts are Jinja.
    CustomWebhookNotificationBlock(name="evaclip", url=url, method="POST", timeout=10,
                                   json_data={"source": "{{name}}", "subject": "{{subject}}", "text": "{{body}}"},
                                   ).save(BLOCK, overwrite=True)  # keeps its id, which the automations name
    block_id = CustomWebhookNotificationBlock.load(BLOCK)._block_document_id
    _upsert(Automation(
        name="evaclip: pipeline run failed", description=f"a {FLOW} flow run failed or crashed",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(
            block_document_id=block_id, subject="evaclip: pipeline run {{ flow_run.name }} {{ flow_run.state.name }}",
            body="Flow run {{ flow_run.name }} ({{ flow_run.id }}) of {{ flow.name }} entered {{ flow_run.state.name }}: "
                 "{{ flow_run.state.message }}")]))
    _upsert(Automation(
        name="evaclip: champion moved", description="promotion moved a registered model's champion alias",
        trigger=EventTrigger(expect={CHAMPION_EVENT}, match={"prefect.resource.id": "evaclip.registered-model.*"},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(
            block_document_id=block_id, subject="evaclip: champion of {{ event.resource.name }} moved",
            body="Champion of {{ event.resource.name }} is now version {{ event.payload.version }} (was "
                 "{{ event.payload.previous }}): {{ event.payload.reason }}")]))


def emit_champion_moved(model: str, version: str, previous: Optional[str], reason: str) -> None:
    """The event the `champion moved` automation listens to (from inside a flow run: it is related to it)."""
    emit_event(event=CHAMPION_EVENT,
               resource={"prefect.resource.id": f"evaclip.registered-model.{model}", "prefect.resource.name": model},
               payload={"version": str(version), "previous": previous or "none", "reason": reason})


def _upsert(automation: Automation) -> None:
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        if not existing:
            automation.create()
            return
        automation.id = existing[0].id
        automation.update()
        for duplicate in existing[1:]:  # two stacks starting at once
            client.delete_automation(duplicate.id)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NOTIFY_URL", "")
    if target:
        ensure_notifications(target)
        host = urlsplit(target).hostname  # the rest of the URL may be a token
        print(f"notifications: failed pipeline runs and champion moves are POSTed to {host}")
    else:
        print("notifications: no NOTIFY_URL, none configured")
