"""A node's sandbox service killed mid-episode: Ray restarts it, the session is rebuilt from its log,
the episode goes on, and no container of the dead service is left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

KILL_MID_EPISODE = """
import json, os, signal, subprocess, sys
import ray
from sandbox.service import ServiceConfig, node_pool, start_services, stop_services

ray.init(num_cpus=2, include_dashboard=False)
[actor] = start_services(ServiceConfig(size=2)).values()
before = ray.get(actor.info.remote())

@ray.remote(num_cpus=0)
def episode(actor):
    pool, owned = node_pool(size=1)
    with pool.session() as s:  # a worker's episode: state built up over several calls
        s.write_file("notes.txt", "one\\n")
        s.exec("echo two >> notes.txt && mkdir -p d && echo three > d/x")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)  # the service dies between two calls of the episode
        after = s.exec("cat notes.txt d/x").stdout
        s.exec("echo four >> notes.txt")
        final = s.read_file("notes.txt")
    return owned, after, final

owned, after, final = ray.get(episode.remote(actor))
info = ray.get(actor.info.remote())
stopped = stop_services()
names = before["containers"] + info["containers"]
left = subprocess.run(["docker", "ps", "-aq", *[f"--filter=name={n}" for n in names]], capture_output=True, text=True).stdout.split()
print(json.dumps({"owned": owned, "after": after, "final": final, "restarts": info["restarts"],
                  "same": sorted(before["containers"]) == sorted(info["containers"]), "stopped": stopped, "left": left}))
"""


def test_killed_service_restarts_and_the_episode_goes_on_in_a_rebuilt_session():
    r = subprocess.run([sys.executable, "-c", KILL_MID_EPISODE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["owned"]
    assert out["after"] == "one\ntwo\nthree\n"  # the state the episode had made, rebuilt from its log
    assert out["final"] == "one\ntwo\nfour\n"
    assert out["restarts"] >= 1 and not out["same"]  # a new actor with a new pool
    assert out["stopped"] == 1 and out["left"] == []  # the dead service's containers were reaped, the new one's closed


KILL_MID_CALL = """
import json, os, signal, threading
import ray
from sandbox.service import ServiceConfig, node_pool, service_metrics, start_services, stop_services

ray.init(num_cpus=2, include_dashboard=False)
[actor] = start_services(ServiceConfig(size=2)).values()
pool, owned = node_pool(size=1)
pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
ran = pool.run("import time; time.sleep(4); print('ran')")  # in flight when the service dies
after = {"size": pool.size, "restarts": service_metrics()["sandbox/restarts"]}
with pool.session() as s:
    after["session"] = s.exec("echo ok").stdout
stop_services()
print(json.dumps({"owned": owned, "ran": ran.stdout, **after}))
"""


def test_a_pool_call_in_flight_when_the_service_dies_is_sent_again_to_its_restart():
    r = subprocess.run([sys.executable, "-c", KILL_MID_CALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["owned"] and out["restarts"] >= 1
    assert out == {**out, "ran": "ran\n", "size": 2, "session": "ok\n"}
