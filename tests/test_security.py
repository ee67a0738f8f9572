"""Hostile peers: every one is refused with a clear error and nothing is written.

tests/test_hub.py and tests/conformance/ already check the handshake codes
(wrong secret, unknown agent, a replayed AUTH, a WRITE before HELLO, bad
volume names on ATTACH, NOT_OWNER on ATTACH).  This file adds what they do
not: that after each refusal the hub's data dir is exactly as before (no
volume, no journal record, no replica byte), a whole replayed session, frames
pipelined behind a failing AUTH, an agent touching another agent's volume with
every kind of frame, hostile names in every place a name goes (HELLO's agent
id, ATTACH, CHECKPOINT, the CLI), an agent without a secret, and TLS peers
with certificates nobody trusts.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

import protocol as p
import rephub
from hubtools import AgentError, MemVolume, TestAgent, make_agents_file, wait_until

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
HOSTILE_NAMES = ["a/b", "..", "../x", "x\0y", "x" * 10_000, "/etc", ""]


@pytest.fixture
def hub(hub_factory):
    """An in-process hub with agents a1 and a2 (``hub.secrets``)."""
    return hub_factory("a1", "a2", heartbeat=0.5)


def snapshot(hub: rephub.Hub) -> dict:
    """What a hostile peer must not change: every file under the data dir with
    its size, and the journal's last seq."""
    files = {}
    for path in Path(hub.store.dir).rglob("*"):
        # A ``.tmp`` file is the applier's atomic write of metadata in flight:
        # it may be gone (renamed) by the time it is looked at.
        if path.suffix == ".tmp" or path.name == rephub.CONTROL_SOCKET:
            continue
        try:
            if path.is_file():
                files[str(path.relative_to(hub.store.dir))] = path.stat().st_size
        except FileNotFoundError:
            continue
    return dict(files=files, last_seq=hub.store.journal.last_seq)


def recv_until_closed(sock: socket.socket, timeout: float = 10.0) -> list:
    """Every message until the hub closes the connection (bounded)."""
    sock.settimeout(timeout)
    out = []
    while True:
        try:
            msg = p.recv_message(sock)
        except (OSError, p.ProtocolError):
            return out
        if msg is None:
            return out
        out.append(msg)


def errors(msgs) -> list[p.Error]:
    return [m for m in msgs if isinstance(m, p.Error)]


def attach_synced(agent: TestAgent, hub, name: str, vol: MemVolume) -> int:
    vid, _ = agent.attach(name, vol)
    wait_until(lambda: hub.store.volume(name).state == rephub.VolState.CONSISTENT
               and hub.store.volume(name).sync is None, 20, f"{name} consistent")
    return vid


def test_a_whole_replayed_session_writes_nothing(hub):
    """Capture a real session's bytes (HELLO, AUTH, ATTACH, WRITE) and replay them."""
    sec = hub.secrets["a1"]
    sock = socket.create_connection(hub.address)
    nonce = os.urandom(32)
    sent = [p.encode(p.Hello(nonce=nonce, agent_id="a1"))]
    sock.sendall(sent[0])
    reply = p.recv_message(sock)
    sent.append(p.encode(p.Auth(proof=p.agent_proof(sec, nonce, reply.nonce, "a1",
                                                    reply.hub_id))))
    sock.sendall(sent[1])
    assert isinstance(p.recv_message(sock), p.AuthOk)
    sock.close()
    before = snapshot(hub)
    tail = [p.encode(p.Attach(request_id=1, size=MiB, chunk_size=65536,
                              state=p.VolumeState.CLEAN, generation=bytes(16), name="stolen")),
            p.encode(p.Write(request_id=2, volume=1, offset=0, data=b"R" * 4096))]
    replay = socket.create_connection(hub.address)
    replay.sendall(b"".join(sent + tail))
    got = recv_until_closed(replay)
    replay.close()
    errs = errors(got)
    assert errs and errs[0].code == p.ErrorCode.AUTH_FAILED, got
    assert not any(isinstance(m, (p.AuthOk, p.Attached, p.Ack)) for m in got)
    assert snapshot(hub) == before
    assert hub.store.volume("stolen") is None


@pytest.mark.parametrize("proof", [bytes(32), None], ids=["wrong-proof", "no-proof"])
def test_frames_pipelined_behind_a_failing_auth_are_never_acted_on(hub, proof):
    """An agent without the secret sends AUTH and, without waiting, ATTACH+WRITE."""
    before = snapshot(hub)
    sock = socket.create_connection(hub.address)
    p.send_message(sock, p.Hello(nonce=os.urandom(32), agent_id="a1"))
    assert isinstance(p.recv_message(sock), p.HelloReply)
    auth = p.encode(p.Auth(proof=proof)) if proof is not None else b""
    sock.sendall(auth + p.encode(p.Attach(request_id=1, size=MiB, chunk_size=65536,
                                          state=p.VolumeState.CLEAN, generation=bytes(16),
                                          name="sneaky"))
                 + p.encode(p.Write(request_id=2, volume=1, offset=0, data=b"S" * 4096)))
    got = recv_until_closed(sock)
    sock.close()
    codes = [e.code for e in errors(got)]
    assert codes and codes[0] in (p.ErrorCode.AUTH_FAILED, p.ErrorCode.BAD_PHASE), got
    assert errors(got)[0].message, "the refusal says why"
    assert snapshot(hub) == before


@pytest.mark.parametrize("agent_id", HOSTILE_NAMES[:-1], ids=repr)
def test_hostile_agent_ids_in_hello_are_refused(hub, agent_id):
    before = snapshot(hub)
    sock = socket.create_connection(hub.address)
    try:
        # The codec refuses to encode some of these: craft HELLO by hand then.
        try:
            frame = p.encode(p.Hello(nonce=os.urandom(32), agent_id=agent_id))
        except p.ReplicationError:
            raw = agent_id.encode()
            payload = p._HELLO.pack(1, 1, 0, 0, os.urandom(32)) + len(raw).to_bytes(2, "big") + raw
            frame = bytes(p.encode_header(p.MsgType.HELLO, 0, 0, 0, len(payload), 0, 0,
                                          p.zlib.crc32(payload))) + payload
        sock.sendall(frame)
        sock.settimeout(10)
        first = p.recv_message(sock)
        if isinstance(first, p.HelloReply):
            # The hub may answer any id (it never says which ids exist); the
            # AUTH that follows cannot succeed without a secret for that id.
            assert len(agent_id.encode()) <= p.MAX_NAME, "an over-long id got HELLO_REPLY"
            p.send_message(sock, p.Auth(proof=bytes(32)))
            got = recv_until_closed(sock)
            assert errors(got) and errors(got)[0].code == p.ErrorCode.AUTH_FAILED, got
        else:
            assert isinstance(first, p.Error) and first.message, f"refused without a reason: {first}"
            assert recv_until_closed(sock) == [], "closed after the refusal"
    finally:
        sock.close()
    assert snapshot(hub) == before


def test_hostile_volume_and_checkpoint_names_write_nothing(hub):
    agent = TestAgent(hub.address, "a1", hub.secrets["a1"]).connect()
    try:
        before = snapshot(hub)
        for name in HOSTILE_NAMES:
            raw = name.encode()
            payload = p._ATTACH.pack(MiB, 65536, 0, 0, bytes(16)) + len(raw).to_bytes(2, "big") + raw
            if len(raw) > 0xFFFF:
                continue
            req = agent.request_id()
            agent.send_raw(bytes(p.encode_header(p.MsgType.ATTACH, 0, req, 0, len(payload), 0,
                                                 0, p.zlib.crc32(payload))) + payload)
            reply = agent.wait_reply(req)
            assert isinstance(reply, p.Error), (name[:20], reply)
            assert reply.code in (p.ErrorCode.BAD_NAME, p.ErrorCode.INVALID), reply
            assert reply.message
        for name in HOSTILE_NAMES:
            raw = name.encode()
            req = agent.request_id()
            agent.send_raw(bytes(p.encode_header(p.MsgType.CHECKPOINT, 0, req, 0,
                                                 len(raw) + 2, 0, 0,
                                                 p.zlib.crc32(len(raw).to_bytes(2, "big") + raw)))
                           + len(raw).to_bytes(2, "big") + raw)
            reply = agent.wait_reply(req)
            assert isinstance(reply, p.Error) and reply.message, (name[:20], reply)
        assert snapshot(hub) == before
        assert not os.listdir(os.path.join(hub.store.dir, "volumes"))
        # The connection survived all of that.
        req = agent.request_id()
        agent.send(p.Ping(request_id=req, sent_ns=1))
        assert isinstance(agent.wait_reply(req), p.Pong)
    finally:
        agent.close()


def test_agent_b_cannot_touch_agent_as_volume_with_any_frame(hub):
    a = TestAgent(hub.address, "a1", hub.secrets["a1"]).connect()
    b = TestAgent(hub.address, "a2", hub.secrets["a2"]).connect()
    try:
        mine = MemVolume(MiB, os.urandom(MiB))
        vid = attach_synced(a, hub, "mine", mine)
        a.flush()
        hub.store.applier.wait_applied(hub.store.journal.durable_seq)
        before = snapshot(hub)
        replica = Path(hub.store.dir, "volumes", "mine", "replica").read_bytes()
        attempts = [p.Write(request_id=0, volume=vid, offset=0, data=b"B" * 4096),
                    p.Zero(request_id=0, volume=vid, offset=0, length=65536),
                    p.Detach(request_id=0, volume=vid),
                    p.ReadReply(request_id=0, volume=vid, offset=0, data=b"B" * 4096),
                    p.Checksums(request_id=0, volume=vid, offset=0, length=65536,
                                chunk_size=65536, digests=[bytes(32)]),
                    p.DirtyMap(request_id=0, volume=vid, extents=[(0, 65536)])]
        for msg in attempts:
            msg.request_id = b.request_id()
            b.send(msg)
            reply = b.wait_reply(msg.request_id)
            assert isinstance(reply, p.Error) and reply.message, (msg, reply)
        with pytest.raises(AgentError) as info:
            b.attach("mine", MemVolume(MiB))
        assert info.value.error.code == p.ErrorCode.NOT_OWNER
        assert "another agent" in info.value.error.message
        b.flush()
        hub.store.applier.wait_applied(hub.store.journal.durable_seq)
        # Nothing of B's reached the journal (the applier's own bookkeeping
        # files may appear meanwhile), no volume was added, A's replica is intact.
        after = snapshot(hub)
        assert after["last_seq"] == before["last_seq"]
        assert os.listdir(os.path.join(hub.store.dir, "volumes")) == ["mine"]
        assert Path(hub.store.dir, "volumes", "mine", "replica").read_bytes() == replica
        # A still owns and writes its volume.
        a.expect_ack(a.write(vid, 0, b"A" * 4096))
    finally:
        a.close()
        b.close()


def run_cli(*argv, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_refuses_hostile_names_with_clear_errors(hub, tmp_path):
    agents = tmp_path / "agents2"
    before = snapshot(hub)
    for name in ["a/b", "..", "x" * 10_000]:
        out = run_cli("rephub.py", "add-agent", "--agents", str(agents), name)
        assert out.returncode != 0 and "agent id" in out.stderr, out
        out = run_cli("rephub.py", "checkpoint", "--data", hub.store.dir, "nothing", name)
        assert out.returncode != 0 and out.stderr.strip(), out
        out = run_cli("rephub.py", "verify", "--data", hub.store.dir, name)
        assert out.returncode != 0 and "no volume named" in out.stderr, out
    assert not agents.exists() or agents.read_text().strip() == ""
    assert snapshot(hub) == before


def test_agent_without_a_secret_refuses_to_start(tmp_path):
    empty = tmp_path / "secret"
    empty.write_text("")
    for secret_file in (empty, tmp_path / "missing"):
        out = run_cli("repagent.py", "protect", "--hub", "127.0.0.1:9", "--agent-id", "a1",
                      "--secret-file", str(secret_file), "--qmp", str(tmp_path / "qmp.sock"),
                      "--node", "disk0=vol0", "--state-dir", str(tmp_path / "state"))
        assert out.returncode != 0, out
        assert "secret" in out.stderr.lower(), out.stderr


def make_ca(tmp_path: Path, name: str) -> tuple[str, str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    cert, key = str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_peers_with_untrusted_certificates(tmp_path):
    cert, key = make_ca(tmp_path, "hub")
    other_cert, other_key = make_ca(tmp_path, "mallory")
    agents = str(tmp_path / "agents")
    sec = make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, tls_cert=cert, tls_key=key)
    hub.start()
    try:
        before = snapshot(hub)
        # An agent that trusts another CA refuses the hub's certificate.
        wrong_ca = ssl.create_default_context(cafile=other_cert)
        with pytest.raises(ssl.SSLCertVerificationError):
            TestAgent(hub.address, "a1", sec["a1"], tls=wrong_ca,
                      server_hostname="localhost").connect(timeout=5)
        # The openssl CLI, presenting an untrusted client certificate and
        # verifying the hub against the wrong CA: the verification fails.
        out = subprocess.run(["openssl", "s_client", "-connect", "%s:%d" % hub.address,
                              "-CAfile", other_cert, "-cert", other_cert, "-key", other_key,
                              "-verify_return_error", "-servername", "localhost"],
                             input="", capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "verify" in (out.stdout + out.stderr).lower()
        # A TLS client with an untrusted certificate that ignores the hub's:
        # TLS alone authenticates nobody, the HMAC handshake still decides.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(other_cert, other_key)
        with pytest.raises(AgentError, match="hub proof does not match"):
            TestAgent(hub.address, "a1", bytes(32), tls=ctx).connect(timeout=5)
        raw = ctx.wrap_socket(socket.create_connection(hub.address, timeout=5))
        # (512 bytes: a larger payload before AUTH_OK is refused unread [SE-3].)
        raw.sendall(p.encode(p.Write(request_id=9, volume=1, offset=0, data=b"T" * 512)))
        got = recv_until_closed(raw)
        raw.close()
        assert errors(got) and errors(got)[0].code == p.ErrorCode.BAD_PHASE
        assert snapshot(hub) == before
        # The hub itself is unharmed: the real agent gets in.
        with TestAgent(hub.address, "a1", sec["a1"], tls=ssl.create_default_context(
                cafile=cert), server_hostname="localhost").connect() as agent:
            req = agent.request_id()
            agent.send(p.Ping(request_id=req, sent_ns=1))
            assert isinstance(agent.wait_reply(req), p.Pong)
    finally:
        hub.shutdown(grace=5)
