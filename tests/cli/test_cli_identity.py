"""keygen / id / rotate / argument and error handling, through real subprocesses."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from proxy.app.cli import ExitCode
from proxy.identity.certificates import certificate_issuer_node_id, certificate_node_id, chain_from_pem
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_server_certificate_chain
from tests.cli.helpers import run_keynode


def test_keygen_id_rotate(tmp_path: Path) -> None:
    node_dir = tmp_path / "node"
    created = run_keynode("keygen", "--dir", str(node_dir))
    assert created.returncode == ExitCode.OK, created.stderr
    node_id = NodeId.decode(created.stdout.strip())
    assert stat.S_IMODE(os.stat(node_dir / "key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(node_dir / "auth_token").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(node_dir).st_mode) == 0o700
    token = (node_dir / "auth_token").read_text()

    again = run_keynode("keygen", "--dir", str(node_dir))
    assert again.returncode == ExitCode.IDENTITY
    assert again.stdout == "" and "--force" in again.stderr and len(again.stderr.splitlines()) == 1
    assert "Traceback" not in again.stderr

    shown = run_keynode("id", "--dir", str(node_dir))
    assert shown.returncode == 0 and shown.stdout.strip() == str(node_id)

    rotated = run_keynode("rotate", "--dir", str(node_dir), "--json")
    assert rotated.returncode == 0, rotated.stderr
    document = json.loads(rotated.stdout)
    new_id = NodeId.decode(document["node_id"])
    assert new_id != node_id and document["previous_node_id"] == str(node_id)
    chain = chain_from_pem((node_dir / "chain.pem").read_bytes())
    assert [certificate_node_id(c) for c in chain] == [new_id, node_id]
    assert certificate_issuer_node_id(chain[0]) == node_id
    # A peer that only knows the old NodeId still accepts the rotated node.
    assert verify_server_certificate_chain([node_id], chain) == node_id
    assert run_keynode("id", "--dir", str(node_dir)).stdout.strip() == str(new_id)

    forced = run_keynode("keygen", "--dir", str(node_dir), "--force")
    assert forced.returncode == 0
    assert NodeId.decode(forced.stdout.strip()) not in (node_id, new_id)
    assert (node_dir / "auth_token").read_text() == token  # the token is not identity: kept


def test_default_dir_is_xdg_data_home(tmp_path: Path) -> None:
    created = run_keynode("keygen", env={"XDG_DATA_HOME": str(tmp_path)})
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "keynode" / "key.pem").exists()
    shown = run_keynode("id", env={"XDG_DATA_HOME": str(tmp_path)})
    assert shown.stdout == created.stdout


def test_errors_are_one_line_with_distinct_codes(tmp_path: Path) -> None:
    missing = run_keynode("id", "--dir", str(tmp_path / "none"))
    assert missing.returncode == ExitCode.IDENTITY and "keynode keygen" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1
    not_created = run_keynode("run", "--dir", str(tmp_path / "none"))
    assert not_created.returncode == ExitCode.IDENTITY and "keynode keygen" in not_created.stderr

    unreachable = run_keynode("status", "--control", str(tmp_path / "no.sock"))
    assert unreachable.returncode == ExitCode.CONTROL_UNREACHABLE
    assert "keynode run" in unreachable.stderr and len(unreachable.stderr.splitlines()) == 1

    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[forward]\nport = 99999\n[auth]\ntoken = 't'\n")
    rejected = run_keynode("run", "--config", str(bad_config))
    assert rejected.returncode == ExitCode.CONFIG
    assert rejected.stderr.strip() == (
        f"keynode run: {bad_config}: forward.port: 99999 is out of range 0..65535"
    )

    usage = run_keynode("open-forward", "vnot", "1.2.3.4:5")
    assert usage.returncode == ExitCode.USAGE and "is not a NodeId" in usage.stderr

    debug = run_keynode("--debug", "id", "--dir", str(tmp_path / "none"))
    assert debug.returncode == ExitCode.IDENTITY and "Traceback" in debug.stderr


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    """Like the auth token (and ssh's keys): a 0644 key.pem stops the node with the fix."""
    node_dir = tmp_path / "node"
    assert run_keynode("keygen", "--dir", str(node_dir)).returncode == 0
    (node_dir / "config.toml").write_text('[proxy]\nhost = "127.0.0.1"\n')
    key_path = node_dir / "key.pem"
    for mode in (0o644, 0o640, 0o604):
        key_path.chmod(mode)
        for command in ("run", "id"):
            refused = run_keynode(command, "--dir", str(node_dir), timeout=30)
            assert refused.returncode == ExitCode.IDENTITY, (command, oct(mode), refused.stderr)
            assert refused.stderr.strip().splitlines() == [
                f"keynode {command}: {key_path} is open to group or others (mode {mode:04o});"
                f" run: chmod 600 {key_path}"
            ]
    key_path.chmod(0o400)  # owner-only, read-only: fine
    assert run_keynode("id", "--dir", str(node_dir)).returncode == 0


def test_every_command_has_help_with_examples() -> None:
    commands = ["keygen", "id", "rotate", "run", "status", "open-forward", "open-reverse",
                "close", "lookup", "forward", "demo"]
    top = run_keynode("--help")
    assert top.returncode == 0 and all(command in top.stdout for command in commands)
    for command in commands:
        shown = run_keynode(command, "--help")
        assert shown.returncode == 0, command
        assert "examples:" in shown.stdout and f"keynode {command}" in shown.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "keynode"
    assert script.exists(), "pip install -e . declares the keynode console script"
