"""Several operator replicas: kopf peering lets one act while the others wait.

Two real operators against one emulator: the lower-priority one stays paused (a replica
starts paused and resumes only when no live peer outranks it); once the active one exits,
removing itself from the peering object, the other resumes and takes over.
"""

from __future__ import annotations

import pathlib

import pytest

from kvpool.operator import crd, kube
from tests.operator.conftest import start_operator, wait_for
from tests.operator.test_operator import get_pool, manifest, settled


def peers(client: kube.Client) -> dict:
    obj = client.get("kopf.dev/v1", "ClusterKopfPeering", None, crd.PEERING_NAME)
    return (obj or {}).get("status") or {}


def test_standby_replica_pauses_then_takes_over(
        emulator: pathlib.Path, client: kube.Client, tmp_path: pathlib.Path) -> None:
    active, _ = start_operator(emulator, tmp_path / "active.log", "--priority", "200")
    standby, _ = start_operator(emulator, tmp_path / "standby.log", "--priority", "100")
    try:
        wait_for(lambda: len(peers(client)) == 2, what="both replicas in the peering object")
        # A replica starts paused and resumes only when no peer outranks it.
        wait_for(lambda: "Resuming operations" in active.log.read_text(),
                 what="the active replica to run")

        client.create(manifest("foxtrot"))
        wait_for(lambda: settled(client, "foxtrot", 1), what="foxtrot handled")
        assert "applied 10 children" in active.log.read_text()
        assert "applied 10 children" not in standby.log.read_text()
        assert "Resuming operations" not in standby.log.read_text()

        active.stop()
        wait_for(lambda: "Resuming operations" in standby.log.read_text(), timeout=90,
                 what="the standby replica to resume")
        client.create(manifest("golf"))
        wait_for(lambda: settled(client, "golf", 1), what="golf handled by the new leader")
        assert get_pool(client, "golf")["status"]["inputsHash"]
        assert "applied 10 children" in standby.log.read_text()
    except BaseException:
        for proc in (active, standby):
            print(f"--- {proc.log.name}\n{proc.tail()}")
        raise
    finally:
        active.stop()
        standby.stop()


pytestmark = pytest.mark.timeout(300)
