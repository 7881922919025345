"""[services.<name>], [server] service_port, [forward] allow_targets and
[[policy_tests]]: what a config may say, the precise error for what it may not, and
the tunnel policy it becomes (proxy/app/services_config.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.app import services_config
from proxy.app.config import config_from_mapping
from proxy.errors import ConfigError
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.tunnel import services as tunnel_services

A = str(TLSConfig.generate().node_id)
B = str(TLSConfig.generate().node_id)


def load(text: str):  # type: ignore[no-untyped-def]
    data = tomllib.loads('[auth]\ntoken = "t"\n' + text)
    return config_from_mapping(data, "node.toml", base_dir=Path("/tmp"))


GOOD = f"""
[server]
host = "127.0.0.1"
port = 50051
service_port = 22

[forward]
allow_targets = ["{B}"]

[services.agent]
target = "127.0.0.1:50052"
port = 1314
allow = "*"
kind = "grpc"

[services.client]
target = "[::1]:50053"
port = 1315
allow = ["{A}"]

[[policy_tests]]
node = "{A}"
service = "client"
expect = "allow"

[[policy_tests]]
node = "{B}"
service = "client"
expect = "deny"

[[policy_tests]]
node = "{B}"
service = "server"
expect = "allow"
"""


def test_a_full_services_config_becomes_the_tunnel_policy() -> None:
    config = load(GOOD)
    policy = config.policy
    assert [service["name"] for service in policy.describe()] == ["server", "agent", "client"]
    assert policy.describe()[2] == {
        "name": "client", "target": "[::1]:50053", "port": 1315, "kind": "tcp", "allow": 1, "default": False,
    }
    assert policy.default.port == 22 and policy.default.allow is None
    assert policy.named("agent").kind == "grpc" and policy.named("agent").allow is None
    assert policy.allow_targets == frozenset({NodeId.decode(B)})
    assert policy.select(b"22.port.keynode").name == "server"
    assert policy.select(b"1315.port.keynode").name == "client"
    assert policy.select(None).name == "server"
    assert len(config.services.policy_tests) == 3


def test_a_wave_1_config_is_one_default_service_open_to_all() -> None:
    config = load('[server]\nport = 50051\n')
    assert config.policy.describe() == [
        {"name": "server", "target": "127.0.0.1:50051", "port": None, "kind": "tcp", "allow": "*", "default": True}
    ]
    assert config.policy.select(b"65535.port.keynode").name == "server"  # every port, as in wave 1
    assert config.policy.allow_targets is None
    assert load("").policy.serves is False


def test_the_config_module_mirrors_the_tunnel_names() -> None:
    assert services_config.KINDS == tunnel_services.KINDS
    assert services_config.DEFAULT_SERVICE == tunnel_services.DEFAULT_SERVICE
    assert services_config.SERVICE_NAME.pattern == tunnel_services.SERVICE_NAME.pattern


BAD = [
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 1\nallow = "*"\nflavour = "x"\n', "services.a.flavour", "unknown key"),
    ('[services.a]\nport = 1\nallow = "*"\n', "services.a.target", "missing"),
    ('[services.a]\ntarget = "127.0.0.1:1"\nallow = "*"\n', "services.a.port", "missing"),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 1\n', "services.a.allow", 'missing ("*"'),
    ('[services.a]\ntarget = "127.0.0.1"\nport = 1\nallow = "*"\n', "services.a.target", ""),
    ('[services.a]\ntarget = "0.0.0.0:5"\nport = 1\nallow = "*"\n', "services.a.target", "wildcard"),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 0\nallow = "*"\n', "services.a.port", ""),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 70000\nallow = "*"\n', "services.a.port", ""),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = true\nallow = "*"\n', "services.a.port", ""),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 1\nallow = "all"\n', "services.a.allow", 'must be "*"'),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 1\nallow = ["vnope"]\n', "services.a.allow[0]", "not a NodeId"),
    (f'[services.a]\ntarget = "127.0.0.1:1"\nport = 1\nallow = ["{A}", "{A}"]\n', "services.a.allow[1]", "twice"),
    ('[services.a]\ntarget = "127.0.0.1:1"\nport = 1\nallow = "*"\nkind = "udp"\n', "services.a.kind", "not one of"),
    ('[services.Bad]\ntarget = "127.0.0.1:1"\nport = 1\nallow = "*"\n', "services.Bad", "service name"),
    ('[services.server]\ntarget = "127.0.0.1:1"\nport = 1\nallow = "*"\n', "services.server", "default service"),
    ("[services]\na = 3\n", "services.a", "must be a table"),
    (
        '[services.a]\ntarget = "127.0.0.1:1"\nport = 7\nallow = "*"\n'
        '[services.b]\ntarget = "127.0.0.1:2"\nport = 7\nallow = "*"\n',
        "services.b.port", "port 7 is taken by [services.a]",
    ),
    (
        '[server]\nport = 9\nservice_port = 7\n[services.a]\ntarget = "127.0.0.1:1"\nport = 7\nallow = "*"\n',
        "services.a.port", "taken by [server] service_port",
    ),
    ("[server]\nservice_port = 7\n", "server.service_port", "needs [server]"),
    ("[server]\nport = 9\nnickname = 7\n", "server.nickname", "unknown key"),
    ('[forward]\nallow_targets = "none"\n', "forward.allow_targets", 'must be "*"'),
    ('[forward]\nallow_targets = [3]\n', "forward.allow_targets[0]", "must be a NodeId string"),
    ('[policy_tests]\nnode = "x"\n', "policy_tests", "array of tables"),
    (f'[[policy_tests]]\nnode = "{A}"\nservice = "nope"\nexpect = "allow"\n', "policy_tests[0].service", "no service"),
    (f'[server]\nport = 9\n[[policy_tests]]\nnode = "{A}"\nservice = "server"\nexpect = "maybe"\n',
     "policy_tests[0].expect", "not one of"),
    ('[server]\nport = 9\n[[policy_tests]]\nservice = "server"\nexpect = "allow"\n', "policy_tests[0].node", "missing"),
    (f'[server]\nport = 9\n[[policy_tests]]\nnode = "{A}"\nservice = "server"\nexpect = "allow"\nwhy = 1\n',
     "policy_tests[0].why", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD)
def test_a_bad_services_config_names_the_key(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.key == key
    assert reason in info.value.reason


def test_a_failing_policy_test_rejects_the_config_and_names_the_test() -> None:
    broken = GOOD.replace(f'allow = ["{A}"]', f'allow = ["{B}"]')
    with pytest.raises(services_config.PolicyTestFailed) as info:
        load(broken)
    assert info.value.key == "policy_tests[0]"
    assert f"expected allow for {A} on service 'client', but the policy says deny" in str(info.value)
