"""Server-side apply from the official Python `kubernetes` client: the dynamic client's
server_side_apply and a typed patch with the apply content type, two managers, a conflict
refused with its causes, force, a field given up by its last manager removed, the status
subresource applied on its own. Run by tests/tests/controlplane.rs with KUBECONFIG set."""

import json
import sys

from kubernetes import client, config, dynamic
from kubernetes.client.rest import ApiException

config.load_kube_config()
api = client.ApiClient()
dyn = dynamic.DynamicClient(api)
NS = "default"


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)


def managers(obj):
    """(manager, operation) pairs of a dynamic (camelCase) or typed (snake_case) object."""
    meta = obj.to_dict()["metadata"]
    entries = meta.get("managedFields") or meta.get("managed_fields") or []
    return sorted((m["manager"], m["operation"]) for m in entries)


cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
cfg = {"apiVersion": "v1", "kind": "ConfigMap",
       "metadata": {"name": "py-ssa", "namespace": NS, "labels": {"team": "a"}},
       "data": {"a": "1", "b": "2"}}
made = cms.server_side_apply(body=cfg, name="py-ssa", namespace=NS, field_manager="py-a")
check(made.to_dict()["data"] == {"a": "1", "b": "2"}, "apply creates the object")
check(managers(made) == [("py-a", "Apply")], f"one Apply manager: {managers(made)}")

other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "py-ssa"},
         "data": {"a": "9"}}
try:
    cms.server_side_apply(body=other, name="py-ssa", namespace=NS, field_manager="py-b")
    check(False, "a second manager changing a field must conflict")
except ApiException as e:
    body = json.loads(e.body)
    check(e.status == 409, f"conflict is 409, got {e.status}")
    causes = body["details"]["causes"]
    check(causes == [{"reason": "FieldManagerConflict", "field": ".data.a",
                      "message": "conflict with \"py-a\" using v1"}], f"causes: {causes}")
print("conflict ok")

forced = cms.server_side_apply(body=other, name="py-ssa", namespace=NS, field_manager="py-b",
                               force_conflicts=True)
check(forced.to_dict()["data"] == {"a": "9", "b": "2"}, f"forced: {forced.to_dict()}")
# py-a stops applying data.b and data.a: b goes (py-a was its only manager), a stays (py-b's).
core = client.CoreV1Api()
mine = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "py-ssa", "labels": {"team": "a"}}}
after = core.patch_namespaced_config_map("py-ssa", NS, mine, field_manager="py-a",
                                         _content_type="application/apply-patch+yaml")
check(after.data == {"a": "9"}, f"removal: {after.data}")
check(managers(after) == [("py-a", "Apply"), ("py-b", "Apply")], f"managers: {managers(after)}")
print("force ok")

# Status applied through /status by its own manager; the object's apply never touches it.
deps = dyn.resources.get(api_version="apps/v1", kind="Deployment")
dep = {"apiVersion": "apps/v1", "kind": "Deployment",
       "metadata": {"name": "py-ssa", "namespace": NS},
       "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "py"}},
                "template": {"metadata": {"labels": {"app": "py"}},
                             "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}}}
deps.server_side_apply(body=dep, name="py-ssa", namespace=NS, field_manager="py-a")
status = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "py-ssa"},
          "status": {"observedGeneration": 1, "replicas": 1}}
client.AppsV1Api().patch_namespaced_deployment_status(
    "py-ssa", NS, status, field_manager="py-status",
    _content_type="application/apply-patch+yaml")
got = client.AppsV1Api().read_namespaced_deployment("py-ssa", NS)
check(got.status.replicas == 1, f"status applied: {got.status}")
subs = sorted((m.manager, m.subresource or "") for m in got.metadata.managed_fields)
check(("py-status", "status") in subs, f"status manager recorded with its subresource: {subs}")
print("status ok")

# Bad requests: no field manager; a field the kind does not have.
try:
    core.patch_namespaced_config_map("py-ssa", NS, mine,
                                     _content_type="application/apply-patch+yaml")
    check(False, "an apply without a field manager must be refused")
except ApiException as e:
    check(e.status == 422 and "fieldManager: Required value" in e.body, f"{e.status} {e.body}")
bad = dict(mine, spec={"replicas": 1})
try:
    core.patch_namespaced_config_map("py-ssa", NS, bad, field_manager="py-a",
                                     _content_type="application/apply-patch+yaml")
    check(False, "an unknown field must be refused")
except ApiException as e:
    check(e.status == 400 and "unknown field \\\"spec\\\"" in e.body, f"{e.status} {e.body}")
print("bad requests ok")
