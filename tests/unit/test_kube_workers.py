"""How the Kubernetes platform sees a worker: readiness from its pod, whether it runs the latest revision."""

from __future__ import annotations

from datetime import UTC, datetime

from kubernetes import client

from weir_operator import kube, render
from weir_operator.plans import Observed, WorkerState

NAME = "revenue"


def _sts(
    replicas: int,
    *,
    generation: int = 2,
    observed: int | None = 2,
    update_revision: str | None = "revenue-new",
    ready: int | None = None,
    updated: int | None = None,
    status: bool = True,
) -> client.V1StatefulSet:
    return client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name=NAME, generation=generation),
        spec=client.V1StatefulSetSpec(replicas=replicas, selector=client.V1LabelSelector(),
                                      service_name=NAME, template=client.V1PodTemplateSpec()),
        status=client.V1StatefulSetStatus(
            replicas=replicas, observed_generation=observed, update_revision=update_revision,
            current_revision="revenue-old", ready_replicas=ready, updated_replicas=updated,
        ) if status else None,
    )


def _pod(
    index: int,
    *,
    revision: str | None = "revenue-new",
    ready: bool = True,
    restarts: int = 0,
    waiting: str | None = None,
    terminating: bool = False,
) -> client.V1Pod:
    labels = {**render.selector(NAME), render.POD_INDEX_LABEL: str(index)}
    if revision is not None:
        labels[kube.REVISION_LABEL] = revision
    waits = client.V1ContainerStateWaiting(reason=waiting)
    state = client.V1ContainerState(waiting=waits) if waiting else None
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=f"{NAME}-{index}", labels=labels,
            deletion_timestamp=datetime(2026, 1, 1, tzinfo=UTC) if terminating else None,
        ),
        status=client.V1PodStatus(
            conditions=[client.V1PodCondition(type="Ready", status="True" if ready else "False")],
            container_statuses=[client.V1ContainerStatus(
                name="worker", image="weir:test", image_id="", ready=ready, restart_count=restarts,
                state=state,
            )],
        ),
    )


def test_a_ready_pod_of_the_update_revision_is_a_ready_current_worker() -> None:
    states = kube._worker_states([_pod(0), _pod(1)], _sts(2))

    assert states == (WorkerState(0, ready=True), WorkerState(1, ready=True))
    assert Observed(workers=states).ready_workers == 2


def test_a_ready_pod_of_the_previous_revision_is_not_current_and_not_counted_as_ready() -> None:
    states = kube._worker_states([_pod(0, revision="revenue-old"), _pod(1)], _sts(2))

    assert [(w.ready, w.current) for w in states] == [(True, False), (True, True)]
    assert Observed(workers=states).ready_workers == 1


def test_before_the_controller_has_seen_the_new_spec_no_pod_is_current_whatever_its_revision() -> None:
    # Right after an apply: generation 3, the status still describes generation 2 (the old pods).
    stale = _sts(2, generation=3, observed=2, update_revision="revenue-old", ready=2, updated=2)
    states = kube._worker_states([_pod(0, revision="revenue-old"), _pod(1, revision="revenue-old")], stale)

    assert [(w.ready, w.current) for w in states] == [(True, False), (True, False)]
    assert Observed(workers=states).ready_workers == 0


def test_readiness_comes_from_the_pod_not_from_the_stateful_sets_stale_ready_count() -> None:
    # A crash-looping new pod while the StatefulSet still says 1 ready (the old pod's count).
    states = kube._worker_states(
        [_pod(0, ready=False, restarts=4, waiting="CrashLoopBackOff")], _sts(1, ready=1, updated=1)
    )

    assert states == (WorkerState(0, ready=False, restarts=4, crash_looping=True, reason="CrashLoopBackOff"),)
    assert Observed(workers=states).ready_workers == 0


def test_a_terminating_pod_is_not_current() -> None:
    states = kube._worker_states([_pod(0, terminating=True)], _sts(1))

    assert states == (WorkerState(0, ready=True, current=False, reason="terminating"),)


def test_without_an_update_revision_a_pod_of_an_observed_spec_counts_as_current() -> None:
    # No controller writes revisions on the test API server: pods created by hand carry none.
    states = kube._worker_states([_pod(0, revision=None)], _sts(1, update_revision=None))

    assert states == (WorkerState(0, ready=True, current=True),)


def test_without_pod_objects_the_observed_status_counts_stand_in() -> None:
    states = kube._worker_states([], _sts(3, ready=2, updated=1))

    assert [(w.ready, w.current) for w in states] == [(True, True), (True, False), (False, False)]
    assert Observed(workers=states).ready_workers == 1


def test_without_pod_objects_a_status_of_an_older_generation_makes_no_worker_ready_or_current() -> None:
    states = kube._worker_states([], _sts(2, generation=5, observed=4, ready=2, updated=2))

    assert [(w.ready, w.current) for w in states] == [(False, False), (False, False)]


def test_a_stateful_set_without_a_status_has_no_ready_or_current_worker() -> None:
    states = kube._worker_states([], _sts(1, status=False))

    assert states == (WorkerState(0, ready=False, current=False, reason="no pod"),)


def test_an_ordinal_without_a_pod_beside_others_that_have_one_is_not_ready() -> None:
    states = kube._worker_states([_pod(1)], _sts(2, ready=2, updated=2))

    assert states == (WorkerState(0, ready=False, current=False, reason="no pod"), WorkerState(1, ready=True))
