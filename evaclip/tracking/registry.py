"""The model registry: every evaluated model becomes a version; `champion` moves only when it is better.

Rule (`decide`): a version may replace the champion only if both were evaluated on the same set (its
content, not its path), it has the promotion metric, beats the champion's by at least
`tracking.promotion_margin` (strictly, when the margin is 0), and loses no more than `tracking.guard_margin`
on any guard metric of another evaluation set both were evaluated on. Aliases, not the deprecated stages.
The decision and its reason are tags on the version and on the run.

Two pipelines finishing at once must not interleave their read of `champion` and their write of it, and
MLflow has no compare-and-set: so a promoter holds a lock while it decides, and the lock is a registered
model of its own (`<name>.promotion-lock`), whose creation the store makes atomic (its name is unique in
SQLite and PostgreSQL alike). It is deleted afterwards; one left by a promoter that died is broken after
`LOCK_LEASE_S` (as a waiter's own clock sees it held by the same holder), and a holder checks that it still holds it before it moves the
alias. No extra service: the same code serializes promoters on SQLite and on a tracking server.
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

from ..config import Params
from ..errors import EvaclipError
from .runs import TrackingRecord
from .store import connect

CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_S = 900  # a promotion takes seconds (minutes if its server restarts meanwhile); older: its holder died
LOCK_WAIT_S = 1800
OTHER_SET = "eval_set."  # tag prefix: eval_set.<name> = identity of an evaluation set after the first


class PromotionBusyError(EvaclipError):
    exit_code = 6


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    champion: str
    metric: Optional[float]
    champion_metric: Optional[float]
    previous: Optional[str] = None  # the champion before this decision

    @property
    def moved(self) -> bool:
        """Whether this decision moved `champion` (operators are told)."""
        return self.promoted and self.previous != self.champion


def registered_name(params: Params) -> str:
    name = params.tracking.registered_model or params.model.name
    return name if name.startswith("evaclip") else f"evaclip-{name}"


def champion_uri(params: Params) -> Optional[str]:
    """`models:/<name>/<version>` of this architecture's champion (pinned: the alias moves), or None."""
    client = connect(params)
    name = registered_name(params)
    version = _alias(client, name, CHAMPION)
    return f"models:/{name}/{version}" if version else None


def tag_key(metric: str) -> str:
    """A metric name as stored in MLflow tags and metrics (no '/' or '@')."""
    return metric.replace("/", "_").replace("@", "_at_")


def decide(candidate: dict, champion: Optional[dict], metric: str, margin: float,
           guard_metrics: tuple[str, ...] = (), guard_margin: float = 0.0) -> tuple[bool, str]:
    """(promote?, why) for a candidate's tags against the champion's: it must beat it, by `margin` at least,
    and lose at most `guard_margin` on each `guard_metrics` of every other evaluation set both share."""
    metric = tag_key(metric)
    value = candidate.get(metric)
    if value is None:
        return False, f"no {metric} recorded"
    if champion is None:
        return True, "no champion yet"
    if candidate.get("eval_set") != champion.get("eval_set"):
        return False, f"evaluated on {candidate.get('eval_set')}, the champion on {champion.get('eval_set')}"
    if champion.get(metric) is None:
        return True, "the champion has no comparable metric"
    gain = float(value) - float(champion[metric])
    if not (gain > 0 and gain >= margin):
        return False, f"{metric} {float(value):.4f} does not beat the champion's {float(champion[metric]):.4f} by {margin}"
    why = f"{metric} {float(value):.4f} beats the champion's {float(champion[metric]):.4f} by >= {margin}"
    compared = []
    for key, identity in sorted(candidate.items()):
        if not key.startswith(OTHER_SET) or champion.get(key) != identity:
            continue  # the champion was not evaluated on this set (or on other content under its name)
        set_name = key[len(OTHER_SET):]
        for guard in guard_metrics:
            guard_key = tag_key(f"{set_name}/{guard}")
            if candidate.get(guard_key) is None or champion.get(guard_key) is None:
                continue
            compared.append(guard_key)
            loss = float(champion[guard_key]) - float(candidate[guard_key])
            if loss > guard_margin:
                return False, (f"{why}, but loses {loss:.4f} on {guard_key} ({float(candidate[guard_key]):.4f} against "
                               f"{float(champion[guard_key]):.4f}), more than guard_margin {guard_margin}")
    if compared:
        why += f"; loses at most {guard_margin} on {', '.join(compared)}"
    return True, why


def register_and_promote(params: Params, record: TrackingRecord, tags: Optional[dict[str, str]] = None) -> Decision:
    """Register the record's model (idempotent), tag it (`tags`: e.g. the DVC experiment), decide on `champion`."""
    client = connect(params)
    name = registered_name(params)
    metric = params.tracking.promotion_metric
    try:
        client.create_registered_model(name, description=f"EVA-CLIP {params.model.name} models")
    except mlflow.exceptions.MlflowException:
        pass  # exists already
    version = _version_of(client, name, record)
    tags = {"eval_set": record.eval_set, "data_version": record.data_version or "",
            "data_manifest": record.data_manifest or "", "eval_run_id": record.eval_run_id,
            **{f"{OTHER_SET}{set_name}": identity for set_name, identity in record.other_sets.items()},
            **{tag_key(k): str(v) for k, v in record.metrics.items()}, **(tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

    with promotion_lock(client, name) as still_held:
        # Inside the lock: two promoters setting the same alias at once race in MLflow's store (its check-then-
        # insert failed with a unique violation on PostgreSQL under load).
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion_version = _alias(client, name, CHAMPION)
        if champion_version == version:  # promoting again changes nothing
            promoted, reason = True, "already the champion"
        else:
            champion_tags = _tags(client, name, champion_version) if champion_version else None
            promoted, reason = decide(_tags(client, name, version), champion_tags, metric,
                                      params.tracking.promotion_margin, tuple(params.tracking.guard_metrics),
                                      params.tracking.guard_margin)
            client.set_model_version_tag(name, version, "promotion_decision", "promoted" if promoted else "rejected")
            client.set_model_version_tag(name, version, "promotion_reason", reason)
            client.set_model_version_tag(name, version, "promotion_compared_with", champion_version or "")
            if promoted:
                still_held()
                client.set_registered_model_alias(name, CHAMPION, version)
        final = _alias(client, name, CHAMPION)
    _record_on_run(client, record.eval_run_id, name, version, promoted, reason, final)
    final_tags = _tags(client, name, final) if final else {}
    return Decision(name, version, promoted and final == version, reason, final or "",
                    _float(record.metrics.get(metric)), _float(final_tags.get(metric)) if final_tags else None,
                    champion_version)


@contextmanager
def promotion_lock(client: MlflowClient, name: str, wait_s: float = LOCK_WAIT_S):
    """Hold `<name>.promotion-lock` (a registered model: creating it is atomic) while deciding on `champion`."""
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    seen: dict[str, float] = {}  # holder -> when this waiter first saw it
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "acquired": f"{time.time():.3f}"},
                                           description="held while a pipeline decides on champion; deleted after")
            break
        except mlflow.exceptions.MlflowException as err:
            # Taken (or SQLite busy with the other promoter's write): wait. Anything else (no permission) is an error.
            if err.error_code != "RESOURCE_ALREADY_EXISTS" and "locked" not in str(err):
                raise
        _break_if_stale(client, lock, seen)
        if time.monotonic() > deadline:
            raise PromotionBusyError(f"registered model {lock} has been held for over {wait_s:.0f} s by another "
                                     "promoter; delete it in MLflow if no pipeline is promoting")
        time.sleep(0.1 + random.random() * 0.4)
    def still_held() -> None:
        if client.get_registered_model(lock).tags.get("holder") != holder:
            raise PromotionBusyError(f"{lock} was broken as stale while this promoter held it; promote again")

    try:
        yield still_held
    finally:
        try:
            if client.get_registered_model(lock).tags.get("holder") == holder:
                client.delete_registered_model(lock)
        except mlflow.exceptions.MlflowException:
            pass  # broken as stale meanwhile: not ours any more


def _break_if_stale(client: MlflowClient, lock: str, seen: dict[str, float]) -> None:
    """Delete the lock if the same holder has held it for LOCK_LEASE_S of this waiter's own clock (no clock of
    another machine is compared)."""
    try:
        holder = client.get_registered_model(lock).tags.get("holder", "")
    except mlflow.exceptions.MlflowException:
        return  # released meanwhile
    first_seen = seen.setdefault(holder, time.monotonic())
    if time.monotonic() - first_seen > LOCK_LEASE_S:
        try:
            client.delete_registered_model(lock)
        except mlflow.exceptions.MlflowException:
            pass


def _version_of(client: MlflowClient, name: str, record: TrackingRecord) -> str:
    """The registry version of this run's model: registering twice gives the same version (idempotent)."""
    for existing in client.search_model_versions(f"name='{name}'"):
        if existing.tags.get("eval_run_id") == record.eval_run_id:
            return str(existing.version)
    return str(mlflow.register_model(record.model_uri, name).version)


def _alias(client: MlflowClient, name: str, alias: str) -> Optional[str]:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _tags(client: MlflowClient, name: str, version: str) -> dict:
    return dict(client.get_model_version(name, version).tags)


def _float(value) -> Optional[float]:
    return None if value in (None, "") else float(value)


def _record_on_run(client, run_id, name, version, promoted, reason, champion) -> None:
    for key, value in {"registered_model": name, "model_version": version,
                       "promotion_decision": "promoted" if promoted else "rejected",
                       "promotion_reason": reason, "champion_version": champion or ""}.items():
        client.set_tag(run_id, key, value)
