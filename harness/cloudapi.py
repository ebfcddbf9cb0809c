"""A local stand-in for the three Cloud APIs deploy/monitoring.py applies to.

Cloud Logging's MetricsServiceV2, Cloud Monitoring's AlertPolicyService and
the Dashboards API, over gRPC with loopback (local TCP) credentials, holding
what they are sent in memory, with the real services' messages (the client
libraries' own types) and the behaviour deploy relies on: NOT_FOUND for a
metric that does not exist, ALREADY_EXISTS for one created twice, generated
names for policies and dashboards, and a dashboard update refused (ABORTED)
unless it carries the current etag. Every call must carry `authorization:
Bearer TOKEN` (UNAUTHENTICATED otherwise); `calls` records each method called.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.cloud.logging_v2 import types as logging_types
from google.cloud.monitoring_dashboard_v1 import types as dashboard_types
from google.cloud.monitoring_v3 import types as monitoring_types

LOGGING = "google.logging.v2.MetricsServiceV2"
POLICIES = "google.monitoring.v3.AlertPolicyService"
DASHBOARDS = "google.monitoring.dashboard.v1.DashboardsService"


@dataclass
class CloudApis:
    token: str
    metrics: dict[str, Any] = field(default_factory=dict)  # full name -> LogMetric
    policies: dict[str, Any] = field(default_factory=dict)  # name -> AlertPolicy
    dashboards: dict[str, Any] = field(default_factory=dict)  # name -> Dashboard
    calls: list[str] = field(default_factory=list)
    port: int = 0
    server: grpc.Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)

    # -- Cloud Logging: log-based metrics -------------------------------------

    def GetLogMetric(self, request: Any, context: grpc.ServicerContext) -> Any:
        metric = self.metrics.get(request.metric_name)
        if metric is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.metric_name} not found")
        return metric

    def CreateLogMetric(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = f"{request.parent}/metrics/{request.metric.name}"
        if name in self.metrics:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{name} already exists")
        self.metrics[name] = request.metric
        return request.metric

    def UpdateLogMetric(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.metric_name not in self.metrics:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.metric_name} not found")
        self.metrics[request.metric_name] = request.metric
        return request.metric

    # -- Cloud Monitoring: alert policies ----------------------------------------

    def ListAlertPolicies(self, request: Any, context: grpc.ServicerContext) -> Any:
        mine = [p for n, p in self.policies.items() if n.startswith(request.name + "/")]
        return monitoring_types.ListAlertPoliciesResponse(alert_policies=mine)

    def CreateAlertPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        policy = request.alert_policy
        policy.name = f"{request.name}/alertPolicies/{uuid.uuid4().int % 10**18}"
        self.policies[policy.name] = policy
        return policy

    def UpdateAlertPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        policy = request.alert_policy
        if policy.name not in self.policies:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{policy.name} not found")
        self.policies[policy.name] = policy
        return policy

    # -- Dashboards --------------------------------------------------------------

    def ListDashboards(self, request: Any, context: grpc.ServicerContext) -> Any:
        mine = [d for n, d in self.dashboards.items() if n.startswith(request.parent + "/")]
        return dashboard_types.ListDashboardsResponse(dashboards=mine)

    def CreateDashboard(self, request: Any, context: grpc.ServicerContext) -> Any:
        dashboard = request.dashboard
        dashboard.name = f"{request.parent}/dashboards/{uuid.uuid4()}"
        dashboard.etag = uuid.uuid4().hex
        self.dashboards[dashboard.name] = dashboard
        return dashboard

    def UpdateDashboard(self, request: Any, context: grpc.ServicerContext) -> Any:
        dashboard = request.dashboard
        current = self.dashboards.get(dashboard.name)
        if current is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{dashboard.name} not found")
        if dashboard.etag != current.etag:
            context.abort(grpc.StatusCode.ABORTED, "etag mismatch: the dashboard changed")
        dashboard.etag = uuid.uuid4().hex
        self.dashboards[dashboard.name] = dashboard
        return dashboard


def _handler(
    apis: CloudApis, name: str, request_type: Any, response_type: Any
) -> grpc.RpcMethodHandler:
    method: Callable[[Any, grpc.ServicerContext], Any] = getattr(apis, name)

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {apis.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid bearer token")
        with apis._lock:
            apis.calls.append(name)
            return method(request, context)

    return grpc.unary_unary_rpc_method_handler(
        call,
        request_deserializer=request_type.deserialize,
        response_serializer=response_type.serialize,
    )


def start_cloud_apis(token: str) -> CloudApis:
    apis = CloudApis(token=token)
    lt, mt, dt = logging_types, monitoring_types, dashboard_types
    services = {
        LOGGING: {
            "GetLogMetric": (lt.GetLogMetricRequest, lt.LogMetric),
            "CreateLogMetric": (lt.CreateLogMetricRequest, lt.LogMetric),
            "UpdateLogMetric": (lt.UpdateLogMetricRequest, lt.LogMetric),
        },
        POLICIES: {
            "ListAlertPolicies": (mt.ListAlertPoliciesRequest, mt.ListAlertPoliciesResponse),
            "CreateAlertPolicy": (mt.CreateAlertPolicyRequest, mt.AlertPolicy),
            "UpdateAlertPolicy": (mt.UpdateAlertPolicyRequest, mt.AlertPolicy),
        },
        DASHBOARDS: {
            "ListDashboards": (dt.ListDashboardsRequest, dt.ListDashboardsResponse),
            "CreateDashboard": (dt.CreateDashboardRequest, dt.Dashboard),
            "UpdateDashboard": (dt.UpdateDashboardRequest, dt.Dashboard),
        },
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for service, methods in services.items():
        handlers = {
            name: _handler(apis, name, request, response)
            for name, (request, response) in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    apis.port = server.add_secure_port(
        "127.0.0.1:0", grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    )
    server.start()
    apis.server = server
    return apis


__all__ = ["CloudApis", "start_cloud_apis"]
