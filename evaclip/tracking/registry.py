"""The model registry: every evaluated model becomes a version; `champion` moves only when it is better.

Rule (`decide`): a version may replace the champion only if both were evaluated on the same set (its
content, not its path), it has the promotion metric, and it beats the champion's by at least
`tracking.promotion_margin` (strictly, when the margin is 0). Aliases,
not the deprecated stages. The decision and its reason are tags on the version and on the run.

Two pipelines finishing at once must not lose an update, and MLflow has no compare-and-set: so each
promoter stamps its version, and after its own decision recomputes the champion over the champion and
every eligible version stamped in the last 10 minutes, and re-checks after writing, until the alias it reads is the one the rule picks. Whichever promoter writes
last, the final champion is the best eligible version. A local file lock also serializes promoters that
share a SQLite store.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

from ..config import Params
from .runs import TrackingRecord
from .store import connect, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
CONCURRENCY_WINDOW_S = 600  # promotions started this recently may be racing each other


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    champion: str
    metric: Optional[float]
    champion_metric: Optional[float]


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


def decide(candidate: dict, champion: Optional[dict], metric: str, margin: float) -> tuple[bool, str]:
    """(promote?, why) for a candidate's tags against the champion's: it must beat it, by `margin` at least."""
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
    if gain > 0 and gain >= margin:
        return True, f"{metric} {float(value):.4f} beats the champion's {float(champion[metric]):.4f} by >= {margin}"
    return False, f"{metric} {float(value):.4f} does not beat the champion's {float(champion[metric]):.4f} by {margin}"


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
            **{tag_key(k): str(v) for k, v in record.metrics.items()}, **(tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)

    with _local_lock(params):
        champion_version = _alias(client, name, CHAMPION)
        if champion_version == version:  # promoting again changes nothing
            promoted, reason = True, "already the champion"
        else:
            # Concurrent promoters consider each other's recent versions, never old ones (so a manual
            # rollback of the alias stays as the operator left it).
            client.set_model_version_tag(name, version, "promotion_started", f"{time.time():.3f}")
            champion_tags = _tags(client, name, champion_version) if champion_version else None
            promoted, reason = decide(_tags(client, name, version), champion_tags, metric,
                                      params.tracking.promotion_margin)
            eligible = metric in record.metrics
            client.set_model_version_tag(name, version, "promotion_eligible", "true" if eligible else "false")
            client.set_model_version_tag(name, version, "promotion_decision", "promoted" if promoted else "rejected")
            client.set_model_version_tag(name, version, "promotion_reason", reason)
        final = _settle_champion(client, name, metric, params.tracking.promotion_margin)
    _record_on_run(client, record.eval_run_id, name, version, promoted, reason, final)
    final_tags = _tags(client, name, final) if final else {}
    return Decision(name, version, promoted and final == version, reason, final or "",
                    _float(record.metrics.get(metric)), _float(final_tags.get(metric)) if final_tags else None)


def _version_of(client: MlflowClient, name: str, record: TrackingRecord) -> str:
    """The registry version of this run's model: registering twice gives the same version (idempotent)."""
    for existing in client.search_model_versions(f"name='{name}'"):
        if existing.tags.get("eval_run_id") == record.eval_run_id:
            return existing.version
    return mlflow.register_model(record.model_uri, name).version


def _settle_champion(client: MlflowClient, name: str, metric: str, margin: float, rounds: int = 5) -> Optional[str]:
    """Point `champion` at the version the rule picks among all eligible ones; re-check after writing."""
    best = None
    for _ in range(rounds):
        best = _best_eligible(client, name, metric, margin)
        if best is None or _alias(client, name, CHAMPION) == best:
            return best
        client.set_registered_model_alias(name, CHAMPION, best)
        time.sleep(0.2)  # let a concurrent promoter's write land before the re-check
    return best


def _best_eligible(client: MlflowClient, name: str, metric: str, margin: float) -> Optional[str]:
    current = _alias(client, name, CHAMPION)
    best_version, best_tags = current, (_tags(client, name, current) if current else None)
    candidates = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    for candidate in candidates:
        tags = dict(candidate.tags)
        recent = time.time() - float(tags.get("promotion_started", 0)) < CONCURRENCY_WINDOW_S
        if not recent or tags.get("promotion_eligible") != "true" or candidate.version == best_version:
            continue
        if decide(tags, best_tags, metric, margin)[0]:
            best_version, best_tags = candidate.version, tags
    return best_version


def _alias(client: MlflowClient, name: str, alias: str) -> Optional[str]:
    try:
        return client.get_model_version_by_alias(name, alias).version
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


def _local_lock(params: Params):
    uri = tracking_uri(params)
    if not uri.startswith("sqlite:"):
        return nullcontext()
    from filelock import FileLock

    return FileLock(str(Path(uri[len("sqlite:///"):]).with_suffix(".promote.lock")))
