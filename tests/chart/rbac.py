"""Ask the real API server what a ServiceAccount may do (SubjectAccessReview).

Used by tests/chart/test_rbac.py. A review answers with the same authorizer that serves real
requests (RBAC here), for the ServiceAccount's user name and groups, so it says what a request
carrying that account's token would be allowed to do.
"""

from __future__ import annotations

from typing import Any

import kubernetes.client

from tests.chart.access import Access, Scope

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


def allowed(
    api_client: Any, namespace: str, sa: str, access: Access, in_namespace: str | None = None
) -> bool:
    """May `namespace`/`sa` do `access`? `in_namespace` overrides where a namespaced access is
    asked: default the release namespace for RELEASE_NAMESPACE, all namespaces ("") otherwise."""
    if in_namespace is None:
        in_namespace = namespace if access.scope is Scope.RELEASE_NAMESPACE else ""
    if access.scope is Scope.CLUSTER:
        in_namespace = ""
    review = kubernetes.client.V1SubjectAccessReview(
        spec=kubernetes.client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{namespace}:{sa}",
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            resource_attributes=kubernetes.client.V1ResourceAttributes(
                verb=access.verb,
                group=access.group,
                resource=access.resource,
                subresource=access.subresource or None,
                namespace=in_namespace or None,
                name=access.name or None,
            ),
        )
    )
    api = kubernetes.client.AuthorizationV1Api(api_client)
    answer = api.create_subject_access_review(review)
    return bool(answer.status.allowed)
