"""The official Python `kubernetes` client against ferry-controlplane: CRUD, list+watch
resumed from a resourceVersion, 410 Gone on a compacted revision, the status subresource.
Run by tests/tests/controlplane.rs with KUBECONFIG set and --compaction-interval 3s."""

import sys
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()
NS = "py"


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)


core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))

# CRUD
cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings", labels={"app": "shop"}),
                        data={"color": "blue"})
created = core.create_namespaced_config_map(NS, cm)
check(created.metadata.uid and created.metadata.resource_version, "create returns uid and rv")
got = core.read_namespaced_config_map("settings", NS)
check(got.data == {"color": "blue"}, "read back")
got.data["size"] = "xl"
replaced = core.replace_namespaced_config_map("settings", NS, got)
check(int(replaced.metadata.resource_version) > int(created.metadata.resource_version), "rv grows")
try:
    stale = got
    stale.metadata.resource_version = created.metadata.resource_version
    core.replace_namespaced_config_map("settings", NS, stale)
    check(False, "a stale update must conflict")
except ApiException as e:
    check(e.status == 409, f"stale update got {e.status}")
core.patch_namespaced_config_map("settings", NS, {"data": {"color": "red"}})
check(core.read_namespaced_config_map("settings", NS).data == {"color": "red", "size": "xl"}, "patch merged")
sel = core.list_namespaced_config_map(NS, label_selector="app=shop")
check([i.metadata.name for i in sel.items] == ["settings"], "label selector")
check(core.list_namespaced_config_map(NS, label_selector="app!=shop").items == [], "!= selector")
core.delete_namespaced_config_map("settings", NS)
try:
    core.read_namespaced_config_map("settings", NS)
    check(False, "deleted object is gone")
except ApiException as e:
    check(e.status == 404, "404 after delete")
# Pagination with limit/continue.
for i in range(7):
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"page-{i}")))
names, token = [], None
while True:
    page = core.list_namespaced_config_map(NS, limit=3, _continue=token)
    names += [i.metadata.name for i in page.items]
    token = page.metadata._continue
    if not token:
        break
check(names == [f"page-{i}" for i in range(7)], f"paged list: {names}")
# deletecollection with a label selector.
for i in range(3):
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"tmp-{i}", labels={"tmp": "yes"})))
core.delete_collection_namespaced_config_map(NS, label_selector="tmp=yes")
left = [i.metadata.name for i in core.list_namespaced_config_map(NS).items]
check(not any(n.startswith("tmp-") for n in left) and "page-0" in left, f"deletecollection: {left}")
# Concurrent NodePort Services never share a cluster IP or a node port.
from concurrent.futures import ThreadPoolExecutor


def make_svc(i):
    svc = client.V1Service(metadata=client.V1ObjectMeta(name=f"np-{i}"), spec=client.V1ServiceSpec(
        type="NodePort", selector={"app": "x"}, ports=[client.V1ServicePort(port=80, target_port=8080)]))
    return core.create_namespaced_service(NS, svc)


with ThreadPoolExecutor(max_workers=16) as pool:
    svcs = list(pool.map(make_svc, range(40)))
ips = {s.spec.cluster_ip for s in svcs}
ports = {s.spec.ports[0].node_port for s in svcs}
check(len(ips) == 40 and len(ports) == 40, f"allocations collided: {len(ips)} IPs, {len(ports)} ports")
check(all(30000 <= p <= 32767 for p in ports), "node ports in range")
print("crud ok")

# list + watch, resumed from a resourceVersion.
rv = core.list_namespaced_config_map(NS).metadata.resource_version
for i in range(3):
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"w-{i}")))
w = watch.Watch()
seen = []
for ev in w.stream(core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=10):
    seen.append((ev["type"], ev["object"].metadata.name))
    last_rv = ev["object"].metadata.resource_version
    if len(seen) == 3:
        w.stop()
check(seen == [("ADDED", "w-0"), ("ADDED", "w-1"), ("ADDED", "w-2")], f"watch from rv: {seen}")
core.delete_namespaced_config_map("w-1", NS)
core.patch_namespaced_config_map("w-2", NS, {"data": {"k": "v"}})
seen = []
for ev in w.stream(core.list_namespaced_config_map, NS, resource_version=last_rv, timeout_seconds=10):
    seen.append((ev["type"], ev["object"].metadata.name))
    if len(seen) == 2:
        w.stop()
check(seen == [("DELETED", "w-1"), ("MODIFIED", "w-2")], f"resumed watch: {seen}")
print("watch resume ok")

# 410 Gone once the revision is compacted (compaction runs every 3 s on this server).
old_rv = rv
for i in range(3):
    core.patch_namespaced_config_map("w-0", NS, {"data": {"n": str(i)}})
time.sleep(8)
core.patch_namespaced_config_map("w-0", NS, {"data": {"n": "late"}})
try:
    for ev in watch.Watch().stream(core.list_namespaced_config_map, NS, resource_version=old_rv, timeout_seconds=5):
        check(False, f"watch from a compacted revision delivered {ev['type']}")
    check(False, "watch from a compacted revision ended without an error")
except ApiException as e:
    check(e.status == 410, f"expected 410, got {e.status}")
print("gone ok")

# Status subresource: status changes through /status only.
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="api"),
    spec=client.V1DeploymentSpec(
        replicas=2,
        selector=client.V1LabelSelector(match_labels={"app": "api"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "api"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="api", image="ferry/echo:1")]))))
d = apps.create_namespaced_deployment(NS, dep)
d.status = client.V1DeploymentStatus(replicas=2, ready_replicas=1, observed_generation=1)
apps.replace_namespaced_deployment_status("api", NS, d)
got = apps.read_namespaced_deployment("api", NS)
check(got.status.ready_replicas == 1 and got.spec.replicas == 2, "status written through /status")
got.status.ready_replicas = 2
got.spec.replicas = 3
apps.replace_namespaced_deployment("api", NS, got)
got = apps.read_namespaced_deployment("api", NS)
check(got.status.ready_replicas == 1, "an update of the object leaves status alone")
check(got.spec.replicas == 3 and got.metadata.generation == 2, "spec change bumps generation")
apps.patch_namespaced_deployment_status("api", NS, {"status": {"availableReplicas": 1}})
got = apps.read_namespaced_deployment_status("api", NS)
check(got.status.available_replicas == 1 and got.spec.replicas == 3, "status patch")
print("status ok")
