"""Zero-configuration join (issue 18): mDNS advertising and discovery, and the join-token proof.

The discovery tests run real coordinators, real clients and real multicast DNS inside a
network namespace each test creates (tests/netns.py): nothing leaves the machine, and no
other test or host sees these announcements.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from coordinator.leader.advertise import addresses_to_advertise, service_info
from coordinator.settings import Settings
from gpu_client.discover import Found, choose
from gpu_client.handshake import ProvingConnection, Unproven, proving, signed
from gpu_client.settings import ClientSettings
from gpumesh.cli.discover import table
from shared import proof
from shared.protocol import Register, encode
from tests.conftest import (
    TEST_JOIN_TOKEN,
    LiveCoordinator,
    Proc,
    run_coordinator,
    wait_until,
)
from tests.netns import ADDR, RELAY, ROGUE, Netns

# --- the proof, without a network ----------------------------------------------------------


def test_proofs_are_bound_to_role_node_nonces_and_the_address_dialed() -> None:
    n, c = proof.new_nonce(), proof.new_nonce()
    here = proof.binding("mdns", "10.0.0.5:8001")
    mine = proof.mac("tok", "coordinator", "n1", n, c, here)
    assert mine != proof.mac("tok", "node", "n1", n, c, here)  # one side's is not the other's
    assert mine != proof.mac("tok", "coordinator", "n2", n, c, here)
    assert mine != proof.mac("tok", "coordinator", "n1", c, n, here)
    assert mine != proof.mac("other", "coordinator", "n1", n, c, here)
    for other in (proof.binding("mdns", "10.0.0.6:8001"), proof.binding("", "10.0.0.5:8001")):
        assert mine != proof.mac("tok", "coordinator", "n1", n, c, other)
    assert proof.binding("", "a:1") == proof.binding("url", "b:2") == "url"  # proxies rewrite Host
    nonce_c, header = proof.coordinator_header("tok", "n1", n, here)
    assert proof.check_coordinator("tok", "n1", n, here, header) == nonce_c
    for bad, why in [
        (None, "no join-token proof"), ("v1.short.x", "malformed"),
        ("v2" + header[2:], "malformed"), (header[:-2] + "AA", "wrong"),
    ]:
        with pytest.raises(Unproven, match=why):
            proof.check_coordinator("tok", "n1", n, here, bad)
    with pytest.raises(Unproven, match="wrong"):  # a recorded answer to another nonce
        proof.check_coordinator("tok", "n1", proof.new_nonce(), here, header)
    with pytest.raises(Unproven, match="relays"):  # an answer made for another address
        proof.check_coordinator("tok", "n1", n, proof.binding("mdns", "10.0.0.66:8001"), header)


def _found(name: str, mesh: str, port: int, seen: float = 0.0, proto: int | None = 1) -> Found:
    return Found(name=name, mesh=mesh, proto=proto, scheme="ws", path="/ws",
                 addresses=(ADDR,), port=port, seen=seen)


def test_choose_joins_the_named_or_the_only_mesh_and_never_guesses() -> None:
    a1, a2 = _found("a1", "alpha", 1, seen=1.0), _found("a2", "alpha", 2, seen=2.0)
    b = _found("b", "beta", 3)
    assert choose([a1, a2], "", {}, 0).candidates == [a2, a1]  # newest announcement first
    assert choose([a1, b], "beta", {}, 0).candidates == [b]
    several = choose([a1, b], "", {}, 0)
    assert several.candidates == [] and "(alpha, beta): set MESH_NAME" in several.why
    assert choose([a1], "gamma", {}, 0).candidates == []
    assert choose([a1, a2], "alpha", {a2.url: 10.0}, 5.0).candidates == [a1]  # a2 held
    assert choose([a1, a2], "alpha", {a2.url: 10.0}, 11.0).candidates == [a2, a1]
    assert choose([_found("old", "alpha", 4, proto=99)], "", {}, 0).candidates == []
    homed = replace(a1, addresses=("172.17.0.1", "192.168.1.10"))  # a docker bridge, the LAN
    assert homed.urls([ipaddress.IPv4Network("192.168.1.0/24")]) == [
        "ws://192.168.1.10:1", "ws://172.17.0.1:1"]
    assert choose([homed], "", {"ws://192.168.1.10:1": 9.0}, 5.0).candidates == [homed]


def test_what_is_advertised_where() -> None:
    on = Settings(mdns=True, port=8001)
    assert addresses_to_advertise(replace(on, mdns=False))[1] == "MESH_ADVERTISE=off"
    for host in ("127.0.0.1", "::1", "localhost"):
        assert addresses_to_advertise(replace(on, host=host)) == (
            [], f"bound to loopback only ({host}): nobody else could reach it")
    assert addresses_to_advertise(replace(on, host="192.0.2.7")) == (["192.0.2.7"], "")
    assert addresses_to_advertise(replace(on, host="127.0.0.1", mdns_addresses=("127.0.0.1",))
                                  ) == (["127.0.0.1"], "")
    assert all(not a.startswith("127.") for a in addresses_to_advertise(on)[0])  # 0.0.0.0
    info = service_info(replace(on, mesh_name="lab", tls_cert=Path("c.pem")), ["192.0.2.7"])
    assert info.properties == {b"scheme": b"wss", b"mesh": b"lab", b"proto": b"1",
                               b"path": b"/ws"}
    assert info.name.startswith("lab on ") and info.port == 8001


def test_discover_prints_a_table_for_people() -> None:
    lines = table([_found("lab on gpu-box:8001", "lab", 8001)]).splitlines()
    assert lines[0].split() == ["NAME", "URL", "MESH", "PROTO"]
    assert lines[1].split() == ["lab", "on", "gpu-box:8001", f"ws://{ADDR}:8001", "lab", "1"]


def test_the_url_always_wins_and_discovery_can_be_turned_off() -> None:
    base = {"NODE_NAME": "n"}
    assert ClientSettings.from_env(base).discover
    assert not ClientSettings.from_env(base | {"MESH_COORDINATOR_URL": "ws://lead:8001"}).discover
    off = ClientSettings.from_env(base | {"MESH_DISCOVERY": "off"})
    assert not off.discover and off.coordinator_url == "ws://localhost:8001"
    assert ClientSettings.from_env(base | {"MESH_NAME": "lab"}).mesh_name == "lab"
    coord = Settings.from_env({"MESH_NAME": "lab", "MESH_MDNS_ADDRESSES": "10.0.0.5"})
    assert (coord.mdns, coord.mesh_name, coord.mdns_addresses) == (True, "lab", ("10.0.0.5",))
    assert not Settings.from_env({"MESH_ADVERTISE": "off"}).mdns and not Settings().mdns


# --- the proof over a real WebSocket (explicit URL, in-process coordinator) ----------------


async def _token() -> str:
    return TEST_JOIN_TOKEN


REGISTER = Register(executors=["builtin"], token=TEST_JOIN_TOKEN)


async def test_a_proven_coordinator_gets_a_proof_and_never_the_token(
    coordinator: LiveCoordinator,
) -> None:
    url = f"{coordinator.ws_url}/ws/raw"
    async with connect(url, create_connection=proving(_token, "raw", discovered=False)) as ws:
        assert isinstance(ws, ProvingConnection) and ws.proven
        reg = signed(REGISTER, ws)
        assert reg.token == "" and reg.proof
        await ws.send(encode(reg))
        assert json.loads(await ws.recv())["type"] == "registered"
    # The same proof on another connection (other nonces) is refused like a bad token.
    async with connect(f"{coordinator.ws_url}/ws/raw2",
                       create_connection=proving(_token, "raw2", discovered=False)) as ws:
        await ws.send(encode(msgspec.structs.replace(REGISTER, token="", proof=reg.proof)))
        assert "bad join-token proof" in json.loads(await ws.recv())["reason"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_found_by_mdns_at_an_address_not_advertised_gets_no_proof(
    coordinator: LiveCoordinator,
) -> None:
    """What a relay gets when it passes a discovered node's handshake on unchanged: this
    coordinator advertises nothing, so a node that claims to have found it by mDNS at
    127.0.0.1 reached it through something else."""
    with pytest.raises(Unproven, match="sent no join-token proof"):
        await connect(f"{coordinator.ws_url}/ws/n",
                      create_connection=proving(_token, "n", discovered=True))


async def test_old_clients_without_a_nonce_still_join_with_the_token(
    coordinator: LiveCoordinator,
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/old") as ws:
        assert ws.response is not None and proof.PROOF_HEADER not in ws.response.headers
        await ws.send(encode(REGISTER))
        assert json.loads(await ws.recv())["type"] == "registered"


async def test_a_node_with_another_token_refuses_the_coordinator_before_register(
    settings: Settings, spawn_client: Callable[..., Proc]
) -> None:
    async with run_coordinator(replace(settings, token="the-real-one")) as live:
        async def wrong() -> str:
            return "not-the-real-one"

        with pytest.raises(Unproven, match="does not know this mesh's join token"):
            await connect(f"{live.ws_url}/ws/n", create_connection=proving(wrong, "n",
                                                                          discovered=False))
        client = spawn_client("n", live.ws_url, MESH_TOKEN="not-the-real-one")
        assert await asyncio.to_thread(client.popen.wait, 20) == 2  # type: ignore[union-attr]
        assert "does not know this mesh's join token" in client.output()
        assert "n" not in live.mesh.nodes  # it never sent register


# --- real multicast DNS in a network namespace ----------------------------------------------


@pytest.fixture
async def netns(tmp_path: Path) -> AsyncIterator[Netns]:
    ns = Netns(tmp_path)
    ns.create()
    try:
        yield ns
    finally:
        await asyncio.to_thread(ns.remove)


def _logged(proc: Proc, text: str) -> bool:
    return text in proc.output()


async def test_a_client_without_url_finds_and_joins_a_coordinator_started_after_it(
    netns: Netns,
) -> None:
    client = netns.client("early")
    await wait_until(lambda: _logged(client, "waiting for a coordinator"), 20, "client browsing")
    coord = netns.coordinator("alpha", 18001, MESH_NAME="alpha")
    await wait_until(lambda: netns.nodes_online(18001), 30, "the node joined")
    assert await netns.nodes_online(18001) == {"early"}
    await wait_until(lambda: _logged(client, f"registered with ws://{ADDR}:18001"), 10, "log")
    assert "trying the only mesh in sight ('alpha')" in client.output()
    await wait_until(lambda: _logged(coord, "advertised 'alpha on"), 10, "announcements done")
    # Work flows: a task runs on the discovered node.
    sub = await netns.get(18001, "/tasks/submit", {"task_type": "test"})
    done = await netns.get(18001, f"/tasks/{sub['task_id']}?wait=20")
    assert (done["status"], done["node"]) == ("completed", "early"), done
    # The coordinator moves (same data, another port): the node follows, same credential.
    await asyncio.to_thread(coord.stop)
    netns.coordinator("alpha-moved", 18009, data="alpha", MESH_NAME="alpha")
    await wait_until(lambda: netns.nodes_online(18009), 30, "the node found the moved one")
    await wait_until(lambda: _logged(client, f"registered with ws://{ADDR}:18009"), 10, "log")
    assert client.output().count("credential issued") == 1  # it presented the one it had


async def test_two_meshes_side_by_side_each_client_joins_its_own(netns: Netns) -> None:
    # One join token for both, so only MESH_NAME keeps a client out of the other mesh.
    alpha = netns.coordinator("alpha", 18001, MESH_NAME="alpha")
    beta = netns.coordinator("beta", 18002, MESH_NAME="beta")
    netns.client("a1", MESH_NAME="alpha")
    netns.client("b1", MESH_NAME="beta")
    await wait_until(lambda: _logged(alpha, "advertised") and _logged(beta, "advertised"), 20,
                     "both meshes advertised")
    undecided = netns.client("anyone")

    async def settled() -> bool:
        return (await netns.nodes_online(18001) == {"a1"}
                and await netns.nodes_online(18002) == {"b1"})

    await wait_until(settled, 30, "a1 in alpha and b1 in beta")
    await wait_until(lambda: _logged(undecided, "found 2 meshes (alpha, beta): set MESH_NAME"),
                     10, "the client without MESH_NAME waiting")
    assert "registered with" not in undecided.output()
    assert await settled()  # and the undecided client joined neither




async def test_a_rogue_coordinator_gets_nothing_and_the_node_joins_the_real_one(
    netns: Netns, tmp_path: Path
) -> None:
    marker = tmp_path / "rogue-ran-something"
    records = {mode: tmp_path / f"rogue-{mode}.jsonl" for mode in ("forged", "silent")}
    for port, (mode, record) in zip((18101, 18102), records.items(), strict=True):
        netns.spawn(f"rogue-{mode}", [sys.executable, "-c", ROGUE, str(port), "alpha",
                                      str(record), mode, ADDR, str(marker)])
    for record in records.values():
        await wait_until(lambda r=record: r.exists() and "advertised" in r.read_text(), 20,
                         "rogue advertised")
    client = netns.client("n1", MESH_NAME="alpha")
    await wait_until(lambda: client.output().count("refused coordinator") >= 2, 30,
                     "the node refusing both rogues")
    out = client.output()
    assert "its join-token proof is wrong" in out and "sent no join-token proof" in out, out
    # It lists first an address this node cannot reach (not on its networks): it still joins.
    netns.coordinator("real", 18001, MESH_NAME="alpha", MESH_MDNS_ADDRESSES=f"192.0.2.1,{ADDR}")
    await wait_until(lambda: netns.nodes_online(18001), 30, "the node joined the real mesh")
    for mode, record in records.items():
        events = [json.loads(line) for line in record.read_text().splitlines()]
        shakes = [e for e in events if e["event"] == "handshake"]
        assert shakes and all(proof.valid_nonce(e["nonce"] or "") for e in shakes), events
        assert not [e for e in events if e["event"] == "frame"], f"{mode} rogue got {events}"
    assert not marker.exists(), "the node ran what a rogue sent"
    assert "running task pwn" not in client.output()


async def test_advertising_off_or_loopback_leaves_nothing_and_shutdown_withdraws(
    netns: Netns,
) -> None:
    off = netns.coordinator("off", 18001, MESH_ADVERTISE="off")
    loop = netns.coordinator("loop", 18002, host="127.0.0.1")
    await wait_until(lambda: _logged(off, "not advertised") and _logged(loop, "not advertised"),
                     20, "both coordinators started")
    assert "MESH_ADVERTISE=off" in off.output() and "loopback only" in loop.output()
    code, seen = await asyncio.to_thread(netns.discover)
    assert (code, seen) == (1, []), seen
    # The same browse does see an advertised coordinator, and sees it go when it stops.
    on = netns.coordinator("on", 18003, MESH_NAME="lab")
    await wait_until(lambda: _logged(on, "advertised 'lab on"), 20, "advertised")
    code, seen = await asyncio.to_thread(netns.discover)
    assert code == 0 and [(f["mesh"], f["url"], f["proto"]) for f in seen] == [
        ("lab", f"ws://{ADDR}:18003", 1)], seen
    await asyncio.to_thread(on.stop)
    assert "withdrew the local-network advertisement" in on.output()
    code, seen = await asyncio.to_thread(netns.discover)
    assert (code, seen) == (1, []), seen




async def test_a_relay_to_the_real_coordinator_gets_nothing(netns: Netns, tmp_path: Path) -> None:
    """A rogue without the token that advertises itself and passes the node's handshake on
    to the real coordinator (which does prove itself) still gets no register: passed on
    byte for byte, the coordinator sees a discovered node that dialed an address it does
    not advertise and proves nothing; re-dialed, the proof is bound to the real address,
    not the relay's, and the node refuses it."""
    real = netns.coordinator("real", 18001, MESH_NAME="elsewhere")  # the node looks for alpha
    await wait_until(lambda: _logged(real, "advertised 'elsewhere on"), 20, "real advertised")
    records = {mode: tmp_path / f"relay-{mode}.jsonl" for mode in ("tcp", "ws")}
    for port, (mode, record) in zip((18201, 18202), records.items(), strict=True):
        netns.spawn(f"relay-{mode}", [sys.executable, "-c", RELAY, str(port), "alpha",
                                      str(record), mode, ADDR, f"{ADDR}:18001"])
    for record in records.values():
        await wait_until(lambda r=record: r.exists() and "advertised" in r.read_text(), 20,
                         "relay advertised")
    client = netns.client("n1", MESH_NAME="alpha")
    await wait_until(lambda: client.output().count("refused coordinator") >= 2, 30,
                     "the node refusing both relays")
    out = client.output()
    assert "alpha tcp relay' at ws://10.251.0.1:18201 (mesh alpha): it sent no join-token" in out
    assert "alpha ws relay' at ws://10.251.0.1:18202 (mesh alpha): its join-token proof is " \
           "wrong" in out, out
    assert "relayed? no proof given" in real.output()
    passed = "".join(json.loads(line).get("data", "")
                     for line in records["tcp"].read_text().splitlines())
    assert passed.startswith("GET /ws/n1 ") and passed.endswith("\r\n\r\n"), passed
    assert passed.count("\r\n\r\n") == 1  # the upgrade request, and not one byte after it
    ws_events = [json.loads(line) for line in records["ws"].read_text().splitlines()]
    assert {"event": "handshake", "upstream_proof": True} in ws_events  # the real one proved
    assert not [e for e in ws_events if e["event"] == "frame"], ws_events
    assert await netns.nodes_online(18001) == set()
    assert "registered with" not in out
