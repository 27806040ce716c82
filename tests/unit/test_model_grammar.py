"""The grammar of every string in the site model (issue 16): realistic values pass, hostile ones fail.

Accepted values are real-world forms: image references as registries publish them, Hugging Face repo
ids, OpenSSH keys produced by `ssh-keygen` (OpenSSH_9.2p1 Debian-2+deb12u6, `-C ops@example`), Debian
suites from sources.list(5).
"""

from __future__ import annotations

import types
import typing
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from infra.model import site as m
from infra.model.load import SiteError, parse_site
from tests.unit.factories import make_site

HEX64 = "4f8e7a0c1d2b3e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7"

# Generated for this test with `ssh-keygen -t <type> -N "" -C ops@example` (OpenSSH_9.2p1 Debian-2+deb12u6).
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJRac3HuT5u4oWZczxst9j/BV/qiQCVsY9x0JKqVJHkB ops@example"
RSA = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDTWQ8LpITgfB2GdD5OXDnjexP+fXuYwVVSfHgBUw0bdKrkX3Nnb5hETM/7Lq54JU9Xd9PSa"
    "MQ0IdYjbE5SxOAnMesgcXqPwUHUj76wE5C/MkKGvmaZmTKgycmkQVclA+wkp9y6wQQIkZSfx0aPBNg9D77RleEnY/gaVQ8q1m0jrPdH7YZ0KMR"
    "sEaddm6ozQebHlGX6uFivaz218W0ElN4pQ120KXynAk0+ApKQA3+tOR9kSyVDCCmEqN7W+p52SAAZuoJjAJ8hBOhJ1DVlI4BJujedPa3Qc6LGm"
    "7jp/fzPHY2XjdxYRILDNlsF4d5GJFBjRIsDX8TF8Yu4ZAFx7BbR ops@example"
)
ECDSA256 = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBN+j/RWkmXFpK8fwFBuwLyhFSwXitPOooOm+"
    "78dqIq35/+uQEsYe35or1vq3QE++jng7L19ylkBdJ+n7FUjLxRk= ops@example"
)
ECDSA521 = (
    "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAHRmhgb2QVqWFs/KUslcaDNJCOWmogCL4jH"
    "EpsWes3tGyFyxGnQ+8OVvtL1qrl7QBUflVVgyuYctArzxL8C/3qW0gG3jSOcDptoOODUT/YIDc0NMlya88+aHYk0X0wbNyGAJaMvyCDyzuo8T"
    "SW9tGsb7BqCk9r27RRV/9HdkTLh3Degyg== ops@example"
)
ED25519_BLOB = ED25519.split()[1]
RSA_BLOB = RSA.split()[1]

GRAMMARS: dict[str, tuple[Any, list[str], list[str]]] = {
    # type: (accepted, rejected)
    "Name": (
        m.Name,
        ["lab", "example-prod", "hgx-570", "a", "a" * 63],
        ["", "Lab", "-lab", "lab-", "lab_1", "a" * 64, "lab\n", "ｌａｂ", "lab.x", "lab 1"],
    ),
    "Hostname": (m.Hostname, ["lab-gpu01", "hgx-01", "mirror01"], ["gpu01\n", "gpu01.", "-gpu", "GPU01", "gpu_01"]),
    "ModelName": (
        m.ModelName,
        ["llama-3.1-70b", "gpufleet-tiny-lab", "Llama-3.1-70B-Instruct", "A100-80", "L40S", "qwen2.5-7b"],
        ["", ".", "..", ".hidden", "-x", "a/b", "../../etc", "a b", "{{x}}", "a" * 129, "x\u202e"],
    ),
    "Revision": (
        m.Revision,
        ["945c8663693130f8be2ee66210e062158b2a9693", "0e9e39f", "lab-1", "v1.2.0", "refs_pr_3"],
        ["", "..", "../../../../root/.ssh", "lab-1\nx", "`id`", "$(id)", "main/x", "[a](b)"],
    ),
    "RedfishId": (
        m.RedfishId,
        ["1", "System.Embedded.1", "lab-gpu01", "437XR1138R2", "4c4c4544-0051-3110-8034-b9c04f4a4d32"],
        ["", ".", "..", "../Managers/1", "a b", "<script>", "x\r\n"],
    ),
    "HttpUrl": (
        m.HttpUrl,
        [
            "http://archive.ubuntu.com/ubuntu",
            "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64",
            "http://198.18.1.250/apt",
            "http://10.60.0.10/files/models/qwen2.5-72b/d3d951150c1e5848237cd6a7ad11df4836aee842/",
            "https://mirror.example:8443/a/b~c/d+e",
            "http://198.18.1.250",
        ],
        [
            "ftp://x/y",
            "file:///etc/shadow",
            "http://user:pw@host/x",
            "http://host/x?y=1",
            "http://host/x#f",
            "http://host/a/../b",
            "http://host/a/./b",
            "http://host//a",
            "http://host/%2e%2e/etc",
            "http://host/a b",
            "http://host/{{x}}",
            "http://999.1.1.1/x",
            "http://host:0/x",
            "http://host:70000/x",
            "http://-host/x",
            "http://[::1]/x",
            "HTTP://host/x",
            "http://host/x\n",
            "http://" + "a" * 2050,
        ],
    ),
    "ModelSource": (
        m.ModelSource,
        [
            "hf://meta-llama/Llama-3.1-70B-Instruct",
            "hf://Qwen/Qwen2.5-72B-Instruct",
            "hf://mistralai/Mixtral-8x7B-v0.1",
            "http://198.18.1.250/files/models/gpufleet-tiny-lab/lab-1/model.gguf",
            # An optional revision (branch, tag or commit), then optionally one file of the repository
            # (huggingface_hub's HfFileSystem spells paths `hf://org/name@rev/path` the same way).
            "hf://org/name@main",
            "hf://org/name@v1.0",
            "hf://org/name@0e9e39f249a16976918f6564b8830bc894c89659",
            "hf://org/name@main/model-Q4_K_M.gguf",
            "hf://org/name@main/sub/dir/model.gguf",
        ],
        [
            "hf://meta-llama",
            "hf://a/b/c",
            "hf://org/../../../etc/passwd",
            "hf://org/name@",
            "hf://org/name@/x.gguf",
            "hf://org/name@-rm",
            "hf://org/name@main/",
            "hf://org/name@main/../../etc/passwd",
            "hf://org/name@main/a//b",
            "hf://org/name@main/.hidden",
            "hf://org/name@main/-x.gguf",
            "hf://org/name@ma..in",
            "hf://org/name@refs.lock",
            "hf://org/name@main@v2",
            "hf://org/name@main/x y.gguf",
            "hf://org/name@main/x.gguf\n",
            "hf://org/name@main/$(id).gguf",
            "hf://org/name@{{x}}",
            "hf://org/na..me",
            "hf://org/na--me",
            "hf://-org/name",
            "hf://org/name.",
            "file:///etc/shadow",
            "s3://bucket/x",
            "/models/x",
            "meta-llama/Llama-3.1-8B",
        ],
    ),
    "WheelUrl": (
        m.WheelUrl,
        [
            "http://198.18.1.250/files/wheels/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl",
            "https://files.example/w/llama_cpp_python-0.3.8+cu124-cp311-cp311-manylinux_2_17_x86_64.whl",
            "http://mirror/w/pkg-1.0-1-py3-none-any.whl",
        ],
        [
            "http://198.18.1.250/files/wheels/llama_cpp_python-0.3.36.tar.gz",
            "http://h/w/x.whl",
            "http://h/w/-1.0-py3-none-any.whl",
            "http://h/w/{{x}}-1.0-py3-none-any.whl",
            "file:///w/pkg-1.0-py3-none-any.whl",
        ],
    ),
    "ImageRef": (
        m.ImageRef,
        [
            f"nvcr.io/nvidia/tritonserver:25.01-py3@sha256:{HEX64}",
            f"docker.io/vllm/vllm-openai@sha256:{HEX64}",
            f"registry.local:5000/a/b@sha256:{HEX64}",
            f"ghcr.io/huggingface/text-generation-inference:3.3.4@sha256:{HEX64}",
            f"10.60.0.10:5000/nvidia/k8s/dcgm-exporter@sha256:{HEX64}",
            f"localhost/a__b/c-d.e@sha256:{HEX64}",
        ],
        [
            f"img --privileged -v /:/host img@sha256:{HEX64}",
            "docker.io/vllm/vllm-openai:latest",
            f"vllm/vllm-openai@sha256:{HEX64}",
            f"docker.io/vllm/VLLM@sha256:{HEX64}",
            f"docker.io/vllm/vllm-openai@sha256:{HEX64[:63]}",
            f"docker.io/vllm/vllm-openai@sha256:{HEX64.upper()}",
            f"docker.io/vllm/vllm-openai@sha512:{HEX64}{HEX64}",
            f"docker.io/-vllm/x@sha256:{HEX64}",
            f"docker.io/vllm/x:{{{{x}}}}@sha256:{HEX64}",
            f"docker.io/vllm/x:.tag@sha256:{HEX64}",
            f"docker.io/vllm/x@sha256:{HEX64}\n",
            f"docker.io/{'a' * 250}/x@sha256:{HEX64}",
        ],
    ),
    "AbsPath": (
        m.AbsPath,
        ["/etc/gpufleet/keys/ubuntu.gpg", "/var/lib/gpufleet/lab/ssh/known_hosts", "/etc/gpufleet/bmc-ca.pem", "/a"],
        [
            "",
            "/",
            "etc/x",
            "/etc/../root",
            "/etc/./x",
            "/etc//x",
            "/etc/x/",
            "/etc/a b",
            "/etc/{{x}}",
            "/etc/$HOME",
            "/etc/'x'",
            "~/x",
        ],
    ),
    "PosixUser": (
        m.PosixUser,
        ["root", "ubuntu", "gpufleet", "_svc", "ops-admin", "a" * 32],
        ["", "-oProxyCommand=x", "root -o", "root;id", "Root", "1root", "a" * 33, "root$", "root\n"],
    ),
    "BmcUser": (
        m.BmcUser,
        ["admin", "ADMIN", "root", "gpufleet", "svc.gpufleet@corp.example", "_x"],
        ["", "-x", ".x", "@x", "a b", "admin\nX-Injected: 1", "{{x}}", "dom\\user", "a" * 65],
    ),
    "BmcEndpoint": (
        m.BmcEndpoint,
        ["https://10.40.250.1", "http://127.0.0.1:8000", "ipmi://10.0.0.5", "ipmi://bmc-01.example:623"],
        [
            "https://10.40.250.1/",
            "https://10.40.250.1/redfish/v1",
            "https://admin:pw@10.0.0.1",
            "https://10.0.0.1?x=1",
            "ftp://10.0.0.1",
            "10.0.0.1",
            "ipmi://-oProxyCommand=x",
            "https://10.0.0.1:99999",
        ],
    ),
    "NtpServer": (
        m.NtpServer,
        ["198.18.1.1", "10.40.0.2", "ntp.ubuntu.com", "0.debian.pool.ntp.org", "time-a"],
        ["", "198.18.1.1 iburst", "198.18.1.256", "-x", "ntp..org", "ntp.org.", "1.2.3", "host_x", "{{x}}"],
    ),
    "AptSuite": (
        m.AptSuite,
        ["bookworm", "jammy-updates", "bookworm-security", "stable", "/", "./", "stable/"],
        ["", "..", "../", "-x", "bookworm main", "/etc/", "{{x}}"],
    ),
    "AptComponent": (
        m.AptComponent,
        ["main", "universe", "non-free-firmware", "updates/main"],
        ["", "main contrib", "-x", "a/b/c", "main\ndeb x"],
    ),
    "SshPublicKey": (
        m.SshPublicKey,
        [
            ED25519,
            RSA,
            ECDSA256,
            ECDSA521,
            ED25519.removesuffix(" ops@example"),
            f"ssh-ed25519 {ED25519_BLOB} Jane Doe laptop 2026",
        ],
        [
            "",
            f'command="id" {ED25519}',
            f'from="*" {ED25519}',
            f"ssh-dss {ED25519_BLOB}",
            f"ssh-rsa {ED25519_BLOB}",  # the blob says ed25519
            f"ssh-ed25519 {RSA_BLOB}",
            f"ssh-ed25519 {ED25519_BLOB[:-4]}",  # truncated: not the 32-byte key
            f"ssh-ed25519 {ED25519_BLOB}x",  # bad base64
            f"ssh-ed25519  {ED25519_BLOB}",
            f"ssh-ed25519 {ED25519_BLOB} {{{{ lookup('pipe','id') }}}}",
            f"ssh-ed25519 {ED25519_BLOB} a\nssh-ed25519 {ED25519_BLOB}",
            f"ssh-ed25519 {ED25519_BLOB} <b>x</b>",
            # The corpus's documentation key: 63 base64 characters is not a whole key.
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGpmZWxzZWNyZXRrZXlzdGFuZGluZm9ydGVzdHM",
        ],
    ),
    "ExactVersion": (
        m.ExactVersion,
        ["570.133.20", "1.17.8-1", "1:4.2.3-1", "4.3.1+ds1-8+deb12u1+b3", "1.3.1-1ubuntu0.22.04.3", "12.8.1"],
        ["570", "latest", ">=1.2", "570.*", "570.133.20\n", "５７０.１", "1.2 ", "1.2;id"],
    ),
    "MacAddress": (m.MacAddress, ["02:47:46:01:00:11", "B8:3F:D2:10:00:01"], ["02:47:46:01:00", "02-47-46-01-00-11"]),
    "DriverBranch": (m.DriverBranch, ["570", "580"], ["57", "5700", "５７０", "570\n"]),
    "SecretConfigKey": (m.SecretConfigKey, ["bmcPassword", "bmc.password", "a_b-c"], ["", "1a", "a b", "ä"]),
    "EnvName": (m.EnvName, ["BMC_PW", "_X1"], ["", "bmc_pw", "1X", "X-Y", "X Y"]),
    "ProductName": (
        m.ProductName,
        ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA L40S"],
        ["", " NVIDIA", "NVIDIA\nH100", "NVIDIA <b>", "a" * 97],
    ),
}
CASES_OK = [(name, v) for name, (_, ok, _) in GRAMMARS.items() for v in ok]
CASES_BAD = [(name, v) for name, (_, _, bad) in GRAMMARS.items() for v in bad]


@pytest.mark.parametrize(("grammar", "value"), CASES_OK, ids=[f"{n}:{v[:50]!r}" for n, v in CASES_OK])
def test_grammar_accepts(grammar: str, value: str) -> None:
    """Realistic values of each kind pass their grammar unchanged (MACs are lower-cased)."""
    out = TypeAdapter(GRAMMARS[grammar][0]).validate_python(value)
    assert out == (value.lower() if grammar == "MacAddress" else value)


@pytest.mark.parametrize(("grammar", "value"), CASES_BAD, ids=[f"{n}:{v[:50]!r}" for n, v in CASES_BAD])
def test_grammar_rejects(grammar: str, value: str) -> None:
    """Hostile or malformed values fail, with a message and a fix, and never echo a raw control character."""
    with pytest.raises(ValidationError) as info:
        TypeAdapter(GRAMMARS[grammar][0]).validate_python(value)
    (error,) = info.value.errors()
    assert error["msg"] and error["msg"].isprintable()
    assert error["type"] == "grammar" and error["ctx"]["fix"]


@pytest.mark.parametrize(
    "char", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u202e", "\u200b", "\ufeff", "\u2028", "\u00a0"]
)
def test_base_rule_rejects_invisible_characters_everywhere(char: str) -> None:
    """C0/C1 controls, bidi/format characters, separators and odd spaces fail even in otherwise valid names."""
    with pytest.raises(ValidationError, match=f"U\\+{ord(char):04X}"):
        TypeAdapter(m.Name).validate_python(f"lab{char}x")


def test_base_rule_bounds_length() -> None:
    """No string is longer than MAX_TEXT, whatever its grammar."""
    with pytest.raises(ValidationError, match="characters long"):
        TypeAdapter(m.Text).validate_python("a" * (m.MAX_TEXT + 1))
    assert TypeAdapter(m.Text).validate_python("a" * m.MAX_TEXT)


def _string_slots(tp: Any, where: str, seen: set[type]) -> typing.Iterator[tuple[str, Any]]:
    """Every place in the model where a string can go, with its annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *_ = typing.get_args(tp)
        if base is str:
            yield where, tp
            return
        yield from _string_slots(base, where, seen)
    elif tp is str:
        yield where, tp
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in seen:
            return
        seen.add(tp)
        for name, field in tp.model_fields.items():
            annotation = field.annotation
            if field.metadata:
                annotation = typing.Annotated[(annotation, *field.metadata)]
            yield from _string_slots(annotation, f"{tp.__name__}.{name}", seen)
    elif origin in (typing.Union, types.UnionType, list, dict):
        for i, arg in enumerate(typing.get_args(tp)):
            yield from _string_slots(arg, f"{where}[{'key' if origin is dict and i == 0 else 'item'}]", seen)
    else:
        # Enums, Literals, numbers, booleans and IP types hold no free text.
        no_text = (Enum, int, float, IPv4Address, IPv4Network, type(None))
        assert origin is typing.Literal or (isinstance(tp, type) and issubclass(tp, no_text)), (
            f"{where}: unhandled annotation {tp!r}"
        )


def test_every_string_of_the_model_has_the_base_rule() -> None:
    """No field, list item or dict key of the site model is a bare `str`: all go through the base rule."""
    slots = list(_string_slots(m.Site, "Site", set()))
    assert len(slots) > 40  # the walk reaches the whole model
    bare = [where for where, tp in slots if m._BASE not in getattr(tp, "__metadata__", ())]
    assert bare == []


def test_parse_site_reports_grammar_path_message_and_fix() -> None:
    """Through parse_site, a grammar error is a Problem at the field's path, with the grammar's own fix."""
    raw = make_site()
    raw["nodes"][0]["ssh_user"] = "-oProxyCommand=id"
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    (problem,) = info.value.problems
    assert problem.path == "nodes[0].ssh_user"
    assert "'-oProxyCommand=id' is not a POSIX user name" in problem.message
    assert "lower-case letters" in problem.fix


def test_bad_dict_key_is_reported_quoted() -> None:
    """A hostile dict key is named in the path JSON-quoted, so no raw newline reaches the terminal."""
    raw = make_site()
    raw["profiles"]["evil\nkey"] = raw["profiles"]["hgx"]
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    paths = [p.path for p in info.value.problems]
    assert 'profiles["evil\\nkey"]' in paths
    assert all("\n" not in p.path + p.message + p.fix for p in info.value.problems)


def test_catalogue_keys_have_a_grammar() -> None:
    """Catalogue keys become file and model names: they follow the path-component grammar."""
    raw = make_site(catalogue={"gpus": {"../x": {"product_name": "X", "smi_memory_mib": 1, "usable_gib": 1}}})
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    assert any(p.path == 'catalogue.gpus["../x"]' and p.message.startswith("key ") for p in info.value.problems)


def test_number_where_text_belongs_suggests_quoting() -> None:
    """YAML reads `revision: 1.10` as a float; the fix says to quote it."""
    raw = make_site()
    raw["services"][0]["model"]["revision"] = 1.1
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    (problem,) = info.value.problems
    assert problem.path == "services[0].model.revision" and "quote" in problem.fix


@pytest.mark.parametrize(("field", "value"), [("cidr", True), ("cidr", 167772160), ("gateway", 10), ("dns", [1])])
def test_addresses_must_be_written_as_text(field: str, value: Any) -> None:
    """YAML `true` or `10` are not addresses (pydantic alone would turn them into 0.0.0.1 / 0.0.0.10)."""
    raw = make_site()
    raw["segments"][0][field] = value
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    assert any(p.path.startswith(f"segments[0].{field}") and "dotted form" in p.fix for p in info.value.problems)


def test_flat_apt_repository_takes_no_components() -> None:
    """sources.list(5): a suite that is an exact path ('/') takes no components."""
    raw = make_site()
    raw["segments"][0]["sources"] = [
        {"name": "cuda", "url": "https://x.example/r", "suite": "/", "components": ["main"], "keyring": "/k.gpg"}
    ]
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    (problem,) = info.value.problems
    assert problem.path == "segments[0].sources[0]" and "remove `components`" in problem.fix


def test_secret_reference_names_exactly_one_source() -> None:
    """Two sources for one secret is a problem with its own fix (not 'see the message')."""
    raw = make_site()
    raw["nodes"][0]["bmc"]["password"] = {"env": "BMC_PW", "file": "/etc/gpufleet/bmc"}
    with pytest.raises(SiteError) as info:
        parse_site(raw)
    (problem,) = info.value.problems
    assert problem.path == "nodes[0].bmc.password" and "pulumi config set --secret" in problem.fix
