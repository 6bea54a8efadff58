"""Creates ConfigMaps from 4 threads as fast as the server takes them and prints
`ACK <name> <resourceVersion>` for each acknowledged create, until killed or the server
goes away. The crash test kills the server with SIGKILL mid-stream and checks each ACK."""

import sys
import threading

from kubernetes import client, config

config.load_kube_config()
prefix = sys.argv[1]
lock = threading.Lock()


def writer(t):
    api = client.CoreV1Api()
    i = 0
    while True:
        name = f"{prefix}-{t}-{i}"
        try:
            out = api.create_namespaced_config_map(
                "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"i": str(i)}),
                _request_timeout=5)
        except Exception:
            return
        with lock:
            print(f"ACK {name} {out.metadata.resource_version}", flush=True)
        i += 1


threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
