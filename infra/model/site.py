"""The typed site model: what a stack file's `gpufleet:site` object may say.

Field-level rules live on the fields; rules that need more than one field live in
`infra.model.rules` so that every problem is reported at once with its config path.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

# ---------------------------------------------------------------------------------------------------------
# Grammars. Every string of a stack file is hostile (issue 16): it may end up in an Ansible inventory, a
# systemd unit, an argv, a file path or a review comment. So every string field has the strictest grammar
# its meaning allows, checked here once; the renderers encode on top of that (defence in depth).
#
# All patterns are ASCII-only and used with `fullmatch` (Python's `$` also matches before a trailing "\n",
# and `\d`/`\w` match any Unicode digit/letter, so neither is used). Each grammar is a named constant with
# the reason for it; the Annotated types below combine them with the base rule.
# ---------------------------------------------------------------------------------------------------------

MAX_TEXT = 4096
"""Longest string anywhere in the model (PATH_MAX); each grammar has its own, tighter bound."""

NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
"""RFC 1123 label: site, segment, service, profile, mirror and apt source names, hostnames. These become
hostnames, systemd unit names and file names, so nothing but lower-case letters, digits and inner '-'."""

PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""One file name: model names, revisions, catalogue keys, Redfish system ids. Starts alphanumeric, so it is
never '.', '..', a hidden file or an option ('-…'); no '/' so it cannot leave the directory it is joined to."""

REDFISH_ID = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}")
"""Redfish system Id/Name/UUID: a URI segment (`/redfish/v1/Systems/<id>`), so never '.' or '..' or a '/'."""

HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
"""DNS name (RFC 1123 labels) or dotted IPv4 address; an all-numeric name must be a valid IPv4 address.
IPv6 literals are not accepted: the site model is IPv4-only (every address field is IPv4)."""

URL_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~+-]+")
"""One segment of a URL path: RFC 3986 unreserved characters and '+' (wheel local versions). No '%': percent
encoding only hides from a reviewer what the server will see ('%2e%2e' is '..', '%0a' a newline)."""

HTTP_URL = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]{1,253})(?::(?P<port>[0-9]{1,5}))?(?P<path>(?:/[A-Za-z0-9._~+-]+)*/?)"
)
"""`http(s)://host[:port][/path]`: no user info (credentials belong in a SecretRef, and `a@b` hides the real
host from a reader), no query or fragment (artifacts are addressed by path alone), no '.'/'..' segments and
no empty segments (checked after matching)."""

HF_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
"""One half of a Hugging Face repo id (`org/name`): the rules of `huggingface_hub.utils.validate_repo_id`
(alphanumerics, '-', '_', '.'; not starting or ending with '-'/'.'; at most 96; no '--' or '..')."""

HF_REVISION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")
"""A hub revision after `@`: a commit sha, branch or tag with letters, digits, '.', '_' and '-' (git's
check-ref-format allows more; '/' is left out so `@rev/file` stays unambiguous: pin `refs/pr/N` by its sha)."""

HF_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
"""One component of a file path inside a hub repository: no hidden files, no '.', '..', spaces or options."""


@dataclass(frozen=True)
class HfSource:
    """A parsed `hf://org/name[@revision][/path/to/file]` model source."""

    repo: str
    """`org/name`, the hub's repo id."""
    revision: str | None
    """What `@` names (commit sha, branch or tag); None when the source names none."""
    path: str | None
    """One file of the repository (a GGUF for llama.cpp); None for the whole repository."""


def parse_hf_source(value: str) -> HfSource | None:
    """The parts of an `hf://` source that passed `_model_source`; None for any other source."""
    if not value.startswith("hf://"):
        return None
    head, _, path = value.removeprefix("hf://").partition("@")
    if not _:
        return HfSource(head, None, None)
    revision, _, path = path.partition("/")
    return HfSource(head, revision, path or None)


BMC_ENDPOINT = re.compile(r"(?P<scheme>https?|ipmi)://(?P<host>[A-Za-z0-9.-]{1,253})(?::(?P<port>[0-9]{1,5}))?")
"""`https://host[:port]` (Redfish) or `ipmi://host[:port]`: scheme, host and port only."""

# OCI image reference, after github.com/distribution/reference `reference.go` (v0.6.0) grammar:
#   reference      := name [ ":" tag ] [ "@" digest ]
#   name           := [domain '/'] path-component ['/' path-component]*
#   domain         := domain-component ['.' domain-component]* [':' port-number]
#   domain-component := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
#   path-component := alpha-numeric [separator alpha-numeric]*
#   alpha-numeric  := /[a-z0-9]+/
#   separator      := /[_.]|__|[-]+/
#   tag            := /[\w][\w.-]{0,127}/        (Go's \w is ASCII [A-Za-z0-9_])
# Stricter than upstream, on purpose: the domain is required (a short name like `vllm/x` resolves per
# runtime: podman searches registries.conf, docker assumes docker.io), the digest is required and is
# sha256 (tags move, digests do not), IPv6 domains are not accepted (IPv4-only model).
_OCI_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_OCI_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*"
OCI_REFERENCE = re.compile(
    rf"(?P<domain>{_OCI_DOMAIN_COMPONENT}(?:\.{_OCI_DOMAIN_COMPONENT})*(?::[0-9]{{1,5}})?)"
    rf"/(?P<path>{_OCI_PATH_COMPONENT}(?:/{_OCI_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"@sha256:(?P<digest>[0-9a-f]{64})"
)
OCI_NAME_MAX = 255
"""distribution/reference `NameTotalLengthMax`: the name (domain and path) is at most 255 characters."""

WHEEL_FILE = re.compile(
    r"(?P<dist>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[A-Za-z0-9_.+]+)"
    r"(?:-(?P<build>[0-9][A-Za-z0-9_.]*))?-(?P<python>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)"
    r"-(?P<platform>[A-Za-z0-9_.]+)\.whl"
)
"""PEP 427 wheel file name: `{distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl` (each part
with '-' escaped to '_', so '-' only separates parts)."""

ABS_PATH = re.compile(r"(?:/[A-Za-z0-9._+@-]{1,255})+")
"""An absolute, normalised path on the controller or a node: POSIX portable file name characters plus
'+'/'@'; no whitespace, quotes, '$', '{' or '//'; '.'/'..' components are refused after matching."""

POSIX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
"""POSIX portable user name as `useradd` accepts it by default (NAME_REGEX): never starts with '-', so it
cannot become an ssh option."""

BMC_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")
"""BMC account name: letters, digits, '.', '_', '@', '-' (IPMI allows 16 bytes, Redfish more); not an option."""

NTP_SERVER = HOST
"""An NTP server is a DNS name or an IPv4 address (it becomes a `server` line of chrony.conf)."""

APT_SUITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}|/|\./|(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63}/)+")
"""Debian suite or codename (`bookworm`, `jammy-updates`), or an exact path ending in '/' for a flat
repository (`/`, `./`, `stable/`), as sources.list(5) describes."""

APT_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?")
"""An apt component (`main`, `non-free-firmware`, `updates/main`)."""

PRODUCT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()/+-]{0,95}")
"""A GPU product name as nvidia-smi reports it (`NVIDIA H100 80GB HBM3`)."""

SECRET_CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")
"""A Pulumi config key in this project's namespace."""

ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
"""An environment variable name (POSIX: upper-case letters, digits, '_', not starting with a digit)."""

# Upstream version with optional epoch, Debian/RPM suffixes (`1:4.2.3-1`, `4.3.1+ds1-8+deb12u1+b3`).
EXACT_VERSION = re.compile(r"(?:[0-9]+:)?[0-9]+(?:\.[0-9]+)+(?:[~+][0-9A-Za-z.+~]*)?(?:-[0-9A-Za-z.+~]+)?")
DEBIAN_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][0-9A-Za-z.+~]*(?:-[0-9A-Za-z.+~]+)*")
"""A Debian package version as `apt-cache policy` prints it (Debian Policy 5.6.12: `[epoch:]upstream[-revision]`,
upstream may itself hold `-` when a revision follows, as in ipxe's `1.0.0+git-20190125.36a4c85-5.1`); exact,
starting with a digit, so never a range, a wildcard or `latest`."""
DRIVER_BRANCH = re.compile(r"[0-9]{3}")
MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")

SSH_KEY = re.compile(r"(?P<type>[a-z0-9@.-]{1,64}) (?P<blob>[A-Za-z0-9+/]{16,16384}={0,2})(?: (?P<comment>.*))?")
"""OpenSSH public key line `<type> <base64> [comment]` (sshd(8) AUTHORIZED_KEYS FILE FORMAT) without the
options prefix: a `command="…"` or `from=` option would change what the key may do."""

SSH_KEY_COMMENT = re.compile(r"[A-Za-z0-9._@+:=-]{1,64}(?: [A-Za-z0-9._@+:=-]{1,64}){0,7}")
"""Key comment: words of letters, digits and `._@+:=-` separated by single spaces (`ops@example`)."""

SSH_KEY_FIELDS = {
    # key type → number of SSH wire strings in its public blob (RFC 4253 §6.6, RFC 5656 §3.1, RFC 8709 §4,
    # OpenSSH PROTOCOL.u2f), the first being the type itself.
    "ssh-ed25519": 2,
    "ssh-rsa": 3,
    "ecdsa-sha2-nistp256": 3,
    "ecdsa-sha2-nistp384": 3,
    "ecdsa-sha2-nistp521": 3,
    "sk-ssh-ed25519@openssh.com": 3,
    "sk-ecdsa-sha2-nistp256@openssh.com": 4,
}


def _show(value: str, limit: int = 80) -> str:
    """A value for a message: quoted and escaped (no raw control characters reach a terminal), shortened."""
    text = value if len(value) <= limit else value[:limit] + "…"
    return repr(text)


def _invalid(message: str, fix: str) -> PydanticCustomError:
    """A grammar violation: `message` says what is wrong, `fix` how to write it (parse_site shows both)."""
    return PydanticCustomError("grammar", "{message}", {"message": message, "fix": fix})


def _printable(value: str) -> str:
    """The base rule of every string: bounded, and only printable characters.

    `str.isprintable` is false for C0/C1 controls (newline, tab, NUL, ESC …), Unicode format characters
    (bidi overrides like U+202E, zero-width spaces, BOM), line/paragraph separators, unassigned and
    private-use code points and every space but ' '.
    """
    if len(value) > MAX_TEXT:
        raise _invalid(f"is {len(value)} characters long", f"shorten it to at most {MAX_TEXT} characters")
    for i, ch in enumerate(value):
        if not ch.isprintable():
            raise _invalid(
                f"{_show(value)} contains the control or invisible character U+{ord(ch):04X} at position {i}",
                "remove it: only printable characters are allowed (no newlines, tabs, NULs or bidi controls)",
            )
    return value


@dataclass(frozen=True)
class _Check:
    """One validation step of a string type, plus what it tells editors through the JSON Schema."""

    func: Callable[[str], str]
    pattern: re.Pattern[str] | None = None
    max_length: int | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.func, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        js = handler(schema)
        if self.pattern is not None:
            # Named groups are written differently in ECMA-262 and Python (editors, jsonschema): drop the names.
            js["pattern"] = "^(?:" + re.sub(r"\(\?P<\w+>", "(?:", self.pattern.pattern) + ")$"
        if self.max_length is not None:
            js["maxLength"] = self.max_length
        return js


def _grammar(pattern: re.Pattern[str], what: str, fix: str) -> _Check:
    """A check requiring the whole string to match `pattern`; the message says what and how to fix it."""

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise _invalid(f"{_show(value)} is not {what}", fix)
        return value

    return _Check(check, pattern)


def _host_problem(host: str) -> str | None:
    """Why `host` is not a DNS name or an IPv4 address (None when it is one)."""
    if len(host) > 253 or not HOST.fullmatch(host):
        return f"host {_show(host)} is not a DNS name or an IPv4 address"
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            IPv4Address(host)
        except ValueError:
            return f"host {_show(host)} is not a valid IPv4 address"
    elif labels[-1].isdigit():
        return f"host {_show(host)} ends in a numeric label: neither a DNS name nor an IPv4 address"
    return None


def _port_problem(port: str | None) -> str | None:
    if port is not None and not 1 <= int(port) <= 65535:
        return f"port {port} is outside 1-65535"
    return None


_URL_FIX = (
    "write http(s)://host[:port]/path: a DNS name or IPv4 address, path segments of letters, digits and "
    "'._~+-' only (no user name, query, '%', spaces, quotes, '{' or '$')"
)


def _http_url(value: str) -> str:
    """A strict `http(s)://host[:port][/path]` URL; the message names the part that is wrong."""
    if len(value) > 2048:
        raise _invalid(f"is {len(value)} characters long", "URLs are at most 2048 characters")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise _invalid(f"{_show(value)} is not an http:// or https:// URL", _URL_FIX)
    if "@" in rest.split("/", 1)[0]:
        raise _invalid(
            f"{_show(value)} has a user name or password before the host",
            "remove it: credentials belong in a secret, never in a URL",
        )
    if "?" in value or "#" in value:
        raise _invalid(f"{_show(value)} has a query or fragment", "give the plain path of the file or repository")
    m = HTTP_URL.fullmatch(value)
    if not m:
        raise _invalid(f"{_show(value)} is not a plain URL", _URL_FIX)
    if problem := _host_problem(m["host"]) or _port_problem(m["port"]):
        raise _invalid(f"{_show(value)}: {problem}", _URL_FIX)
    segments = m["path"].split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise _invalid(f"{_show(value)} has a '.' or '..' path segment", "write the normalised path")
    if "" in segments[:-1]:
        raise _invalid(f"{_show(value)} has an empty path segment ('//')", "write the normalised path")
    return value


_HF_FIX = (
    "write hf://<org>/<name>[@<revision>[/<file>]]: letters, digits, '-', '_' and '.' in org and name, a commit "
    "sha, branch or tag after '@', and optionally one file of the repository after it (e.g. a .gguf)"
)


def _model_source(value: str) -> str:
    if value.startswith("hf://"):
        head, at, tail = value.removeprefix("hf://").partition("@")
        parts = head.split("/")
        revision, _, path = tail.partition("/")
        if (
            len(parts) != 2
            or not all(HF_REPO_PART.fullmatch(p) for p in parts)
            or any(".." in p or "--" in p for p in parts)
        ):
            raise _invalid(f"{_show(value)} is not a Hugging Face repository", _HF_FIX)
        if at and (not HF_REVISION.fullmatch(revision) or ".." in revision or revision.endswith(".lock")):
            raise _invalid(f"{_show(value)} has no valid revision after '@'", _HF_FIX)
        if at and _ and not all(HF_FILE_PART.fullmatch(c) and ".." not in c for c in path.split("/")):
            raise _invalid(f"{_show(value)} names a file path that cannot be placed in the model store", _HF_FIX)
        return value
    if value.startswith(("http://", "https://")):
        return _http_url(value)
    raise _invalid(
        f"{_show(value)} is not a model source",
        "use http(s)://host[:port]/path (file store or mirror) or hf://<org>/<name>; "
        "other schemes such as file:// are not allowed",
    )


def _wheel(value: str) -> str:
    _http_url(value)
    if not WHEEL_FILE.fullmatch(value.rsplit("/", 1)[-1]):
        raise _invalid(
            f"{_show(value)} does not end in a wheel file name",
            "point at a '<name>-<version>-<python>-<abi>-<platform>.whl' file (PEP 427)",
        )
    return value


def _image(value: str) -> str:
    m = OCI_REFERENCE.fullmatch(value)
    if not m:
        if not re.search(r"@sha256:[0-9a-f]{64}\Z", value):
            raise _invalid(
                f"image {_show(value)} has no digest",
                "pin it as 'registry/repo[:tag]@sha256:<64 hex>' (tags move, digests do not)",
            )
        raise _invalid(
            f"image {_show(value)} is not an OCI image reference",
            "write registry[:port]/path[:tag]@sha256:<64 hex> with an explicit registry "
            "(e.g. docker.io/vllm/vllm-openai@sha256:…), lower-case path components, no spaces or options",
        )
    if len(m["domain"]) + 1 + len(m["path"]) > OCI_NAME_MAX:
        raise _invalid(f"image {_show(value)} has a name longer than {OCI_NAME_MAX} characters", "shorten it")
    domain = m["domain"]
    if "." not in domain and ":" not in domain and domain != "localhost":
        raise _invalid(
            f"image {_show(value)} does not name its registry",
            f"write it in full, e.g. docker.io/{value} (short names resolve differently per container runtime)",
        )
    return value


def _abs_path(value: str) -> str:
    if not ABS_PATH.fullmatch(value) or any(c in (".", "..") for c in value.split("/")[1:]):
        raise _invalid(
            f"{_show(value)} is not an absolute, normalised path",
            "write it as /dir/file with letters, digits and '._+@-' in each component "
            "(no '.', '..', '//', trailing '/', spaces or quotes)",
        )
    return value


def _ntp_server(value: str) -> str:
    if problem := _host_problem(value):
        raise _invalid(problem, "give the NTP server as a DNS name or an IPv4 address")
    return value


_BMC_FIX = "write https://host[:port] (Redfish) or ipmi://host[:port] and nothing else: no user, password, path"


def _bmc_endpoint(value: str) -> str:
    m = BMC_ENDPOINT.fullmatch(value)
    if not m:
        raise _invalid(f"{_show(value)} is not a BMC endpoint", _BMC_FIX)
    if problem := _host_problem(m["host"]) or _port_problem(m["port"]):
        raise _invalid(f"{_show(value)}: {problem}", _BMC_FIX)
    return value


def _ssh_fields(blob: bytes) -> list[bytes] | None:
    """The SSH wire strings (uint32 length + bytes, RFC 4251 §5) of a key blob; None if it is not exactly that."""
    fields: list[bytes] = []
    while blob:
        if len(blob) < 4 or len(fields) >= 8:
            return None
        (size,) = struct.unpack(">I", blob[:4])
        if size > len(blob) - 4:
            return None
        fields.append(blob[4 : 4 + size])
        blob = blob[4 + size :]
    return fields


def _ssh_public_key(value: str) -> str:
    m = SSH_KEY.fullmatch(value)
    if not m or m["type"] not in SSH_KEY_FIELDS:
        raise _invalid(
            f"{_show(value)} is not an OpenSSH public key line",
            f"write '<type> <base64> [comment]' as in a .pub file, with type one of {', '.join(SSH_KEY_FIELDS)} "
            "and no options (command=, from=) before it",
        )
    if m["comment"] is not None and not SSH_KEY_COMMENT.fullmatch(m["comment"]):
        raise _invalid(
            f"the comment of key {_show(value, 40)} has characters other than letters, digits, '._@+:=-' "
            "and single spaces",
            "shorten the comment (e.g. 'ops@example')",
        )
    try:
        fields = _ssh_fields(base64.b64decode(m["blob"], validate=True))
    except binascii.Error:
        raise _invalid(f"the key data of {_show(value, 40)} is not valid base64", "copy the key line again") from None
    if not fields or fields[0] != m["type"].encode() or len(fields) != SSH_KEY_FIELDS[m["type"]]:
        raise _invalid(
            f"the key data of {_show(value, 40)} does not decode to a {m['type']} public key",
            "copy the key line again from the .pub file",
        )
    if m["type"] == "ssh-ed25519" and len(fields[1]) != 32:
        raise _invalid(f"the ed25519 key of {_show(value, 40)} is not 32 bytes long", "copy the key line again")
    return value


def _exact_version(value: str) -> str:
    if len(value) > 128 or not EXACT_VERSION.fullmatch(value):
        raise _invalid(
            f"{_show(value)} is not an exact version",
            "pin it (for example '570.133.20' or '1.17.8-1'): ranges, branches and 'latest' make rebuilds "
            "non-reproducible",
        )
    return value


def _mac(value: str) -> str:
    lowered = value.lower()
    if not MAC.fullmatch(lowered):
        raise _invalid(f"{_show(value)} is not a MAC address", "write it as 'aa:bb:cc:dd:ee:ff'")
    return lowered


_KIND = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "a mapping"}


def _address_text(value: object) -> object:
    """Require addresses and networks as text.

    pydantic would also take an integer, so YAML's `true` or `10` would silently become 0.0.0.1 or 0.0.0.10.
    """
    if not isinstance(value, str | IPv4Address | IPv4Network):
        raise _invalid(
            f"{value!r} is {_KIND.get(type(value), 'not text')}, not an address",
            "write it in dotted form, e.g. '10.0.0.11' or '10.0.0.0/24'",
        )
    return value


_BASE = _Check(_printable, max_length=MAX_TEXT)

Text = Annotated[str, _BASE]
"""Any string: only the base rule. Every string type of the model starts with it."""
Name = Annotated[
    str, _BASE, _grammar(NAME, "a valid name", "use lower-case letters, digits and inner '-', at most 63 characters")
]
Hostname = Annotated[
    str,
    _BASE,
    _grammar(NAME, "a valid hostname", "use lower-case letters, digits and inner '-', at most 63 characters"),
]
_COMPONENT_FIX = (
    "start with a letter or digit, then letters, digits, '.', '_' or '-' only (no '/', spaces or '..'), "
    "at most 128 characters"
)
ModelName = Annotated[str, _BASE, _grammar(PATH_COMPONENT, "a valid model name", _COMPONENT_FIX)]
GpuModelName = Annotated[str, _BASE, _grammar(PATH_COMPONENT, "a valid GPU model name", _COMPONENT_FIX)]
CatalogueKey = Annotated[str, _BASE, _grammar(PATH_COMPONENT, "a valid catalogue name", _COMPONENT_FIX)]
BF16_PART = re.compile(r"embeddings|lm_head|attention|mlp\.[0-9]{1,4}")
"""A part of a checkpoint a quantised model keeps in 16 bits (see `ModelArch.bf16_parts`)."""
Bf16Part = Annotated[
    str, _BASE, _grammar(BF16_PART, "a checkpoint part", "use embeddings, lm_head, attention or mlp.<layer number>")
]
Revision = Annotated[
    str,
    _BASE,
    _grammar(
        PATH_COMPONENT,
        "a revision",
        "give a commit hash or an immutable tag: letters, digits, '.', '_' and '-', starting with a letter or digit",
    ),
]
RedfishId = Annotated[
    str,
    _BASE,
    _grammar(REDFISH_ID, "a Redfish system id", "use the system's Id, Name or UUID: letters, digits, '.', '_', '-'"),
]
HttpUrl = Annotated[str, _BASE, _Check(_http_url, HTTP_URL)]
ModelSource = Annotated[str, _BASE, _Check(_model_source)]
WheelUrl = Annotated[str, _BASE, _Check(_wheel, HTTP_URL)]
ImageRef = Annotated[str, _BASE, _Check(_image, OCI_REFERENCE)]
AbsPath = Annotated[str, _BASE, _Check(_abs_path, ABS_PATH)]
PosixUser = Annotated[
    str,
    _BASE,
    _grammar(
        POSIX_USER,
        "a POSIX user name",
        "use lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters",
    ),
]
BmcUser = Annotated[
    str,
    _BASE,
    _grammar(
        BMC_USER, "a BMC user name", "use letters, digits, '.', '_', '@' and '-', not starting with '.', '@' or '-'"
    ),
]
BmcEndpoint = Annotated[str, _BASE, _Check(_bmc_endpoint, BMC_ENDPOINT)]
NtpServer = Annotated[str, _BASE, _Check(_ntp_server, HOST)]
AptSuite = Annotated[
    str,
    _BASE,
    _grammar(
        APT_SUITE,
        "an apt suite",
        "give a suite or codename such as 'bookworm' or 'jammy-updates', or a path ending in '/' "
        "(e.g. '/') for a flat repository",
    ),
]
AptComponent = Annotated[
    str,
    _BASE,
    _grammar(APT_COMPONENT, "an apt component", "give a component such as 'main' or 'non-free-firmware'"),
]
ProductName = Annotated[
    str,
    _BASE,
    _grammar(
        PRODUCT_NAME,
        "a GPU product name",
        "write it as nvidia-smi reports it, e.g. 'NVIDIA H100 80GB HBM3' (letters, digits, spaces, '._()/+-')",
    ),
]
SecretConfigKey = Annotated[
    str,
    _BASE,
    _grammar(SECRET_CONFIG_KEY, "a Pulumi config key", "use letters, digits, '_', '.' and '-', starting with a letter"),
]
EnvName = Annotated[
    str,
    _BASE,
    _grammar(
        ENV_NAME, "an environment variable name", "use upper-case letters, digits and '_', not starting with a digit"
    ),
]
DriverBranch = Annotated[
    str, _BASE, _grammar(DRIVER_BRANCH, "a driver branch", "give the three-digit branch, e.g. '570'")
]
SshPublicKey = Annotated[str, _BASE, _Check(_ssh_public_key, SSH_KEY)]
ExactVersion = Annotated[str, _BASE, _Check(_exact_version, EXACT_VERSION)]
DebianVersion = Annotated[
    str, _BASE, _grammar(DEBIAN_VERSION, "an exact Debian package version",
                         "write it as `apt-cache policy <package>` prints it, e.g. '2.90-4~deb12u2'")
]
MacAddress = Annotated[str, _BASE, _Check(_mac)]
Ipv4Addr = Annotated[IPv4Address, BeforeValidator(_address_text)]
Ipv4Net = Annotated[IPv4Network, BeforeValidator(_address_text)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RebootPolicy(StrEnum):
    """When a converge may reboot a node."""

    IF_REQUIRED = "if-required"
    NEVER = "never"


class DecommissionPolicy(StrEnum):
    """What removing a node from the stack (or `pulumi destroy`) does to the machine."""

    POWER_OFF = "power-off"
    KEEP = "keep"


class Engine(StrEnum):
    """Inference engines gpufleet can deploy.

    Triton is not offered: a directory of Hugging Face weights is not a Triton model repository and
    Triton does not serve the OpenAI API the health check and bench speak (issue 18).
    """

    VLLM = "vllm"
    TGI = "tgi"
    LLAMACPP = "llamacpp"


def _offered_engine(value: object) -> object:
    if value == "triton":
        raise ValueError(
            "triton is not offered: gpufleet does not build a Triton model repository and Triton does not "
            "serve the OpenAI API; serve the model with engine: vllm (or tgi)"
        )
    return value


class ContainerEngine(StrEnum):
    """Container runtimes the `container_runtime` role installs."""

    CONTAINERD = "containerd"
    DOCKER = "docker"
    PODMAN = "podman"


class DType(StrEnum):
    """Weight precision or quantisation of a served model."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    AWQ = "awq"
    GPTQ = "gptq"


class KvCacheDType(StrEnum):
    """Precision of the KV cache; `auto` follows the model (fp16 for quantised weights)."""

    AUTO = "auto"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"


class OperatingSystem(StrEnum):
    """Operating systems supported on GPU nodes."""

    UBUNTU_2204 = "ubuntu-22.04"
    UBUNTU_2404 = "ubuntu-24.04"
    DEBIAN_12 = "debian-12"
    RHEL_9 = "rhel-9"


class NodeRole(StrEnum):
    """What a node is for; decides which Ansible roles run on it."""

    INFERENCE = "inference"
    MONITORING = "monitoring"


class SecretRef(_Model):
    """Where a secret comes from. The model never holds the secret itself.

    Exactly one of `config`, `env`, `file` is set. Under `pulumi up` the `config` key is read as a
    Pulumi secret; the `gpufleet` CLI (break-glass, tests) reads `GPUFLEET_SECRET_<KEY>` or the file.
    """

    config: SecretConfigKey | None = None
    """Pulumi config key (in this project's namespace) holding the value as a `secure:` secret."""
    env: EnvName | None = None
    """Environment variable holding the value."""
    file: AbsPath | None = None
    """Absolute path of a file holding the value (mode 0600 recommended)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if sum(x is not None for x in (self.config, self.env, self.file)) != 1:
            raise _invalid(
                "a secret reference names exactly one of `config`, `env` or `file`",
                "put the secret itself in Pulumi config (`pulumi config set --secret KEY`) and refer to it",
            )
        return self

    def describe(self) -> str:
        """Where the secret comes from, for messages (never the value)."""
        if self.config:
            return f"config:{self.config}"
        return f"env:{self.env}" if self.env else f"file:{self.file}"


class RolloutPolicy(_Model):
    """How nodes of one segment are converged: in batches, stopping on failures."""

    batch_size: int = Field(default=1, ge=1)
    """Nodes converged at once within a segment (also the most that may be unavailable)."""
    max_failures: int = Field(default=0, ge=0)
    """Failed nodes tolerated before the rollout stops; 0 stops at the first failure."""
    max_parallel_reimage: int = Field(default=4, ge=1, le=1000)
    """Most nodes between power-on/reimage and SSH answering at once (`pulumi up` on a new site)."""
    max_parallel_batches: int = Field(default=4, ge=1, le=256)
    """Most converge batches running at once across the segments under `pulumi up` (a controller slot each)."""
    decommission: DecommissionPolicy = DecommissionPolicy.POWER_OFF
    """A node removed from the stack: `power-off` via its BMC, or `keep` it running; both write a record."""


class RebootSettings(_Model):
    """Site-wide reboot policy."""

    policy: RebootPolicy = RebootPolicy.IF_REQUIRED
    """`if-required`: reboot when a driver change needs it; `never`: only report `reboot_required`."""
    timeout_s: int = Field(default=900, ge=60, le=7200)
    """How long to wait for a node to come back after a reboot."""


class DriverSpec(_Model):
    """NVIDIA data-centre driver pin."""

    branch: DriverBranch
    """Driver branch, e.g. `570`; must be the branch of `version`."""
    version: ExactVersion
    """Exact driver version, e.g. `570.133.20`."""
    open_modules: bool = True
    """Use the open GPU kernel modules (required on Hopper and newer); false for proprietary."""


class CudaSpec(_Model):
    """CUDA toolkit pin."""

    version: ExactVersion
    """Exact toolkit version, e.g. `12.8.1`."""


class ContainerRuntimeSpec(_Model):
    """Container runtime pin."""

    engine: ContainerEngine = ContainerEngine.PODMAN
    """Which runtime: podman, docker or containerd (containerd cannot run inference containers with GPUs)."""
    version: ExactVersion
    """Exact package version of the runtime."""


class ContainerToolkitSpec(_Model):
    """nvidia-container-toolkit pin."""

    version: ExactVersion
    """Exact package version, e.g. `1.17.8-1`."""


class FabricManagerSpec(_Model):
    """NVIDIA fabric manager (required on NVSwitch systems)."""

    enabled: bool = False
    """Install and run fabric manager; required for nodes with NVSwitch."""
    version: ExactVersion | None = None
    """Exact version; must equal the driver version."""


class DcgmSpec(_Model):
    """NVIDIA Data Center GPU Manager pin."""

    enabled: bool = True
    """Install DCGM (health checks and the DCGM exporter's data source)."""
    version: ExactVersion | None = None
    """Exact DCGM package version, e.g. `1:4.2.3-1`."""


class RdmaSpec(_Model):
    """The RDMA stack of nodes with fabric ports: the distribution's rdma-core, pinned like every package."""

    version: ExactVersion
    """rdma-core version: the verbs providers, `ibverbs-utils`, `rdmacm-utils` and `infiniband-diags` come
    from the same source package and carry the same version (e.g. Debian 12's `44.0-2`)."""
    perftest_version: ExactVersion
    """perftest (`ib_write_bw`, `ib_write_lat`): the pairwise fabric test."""
    opensm_version: ExactVersion | None = None
    """opensm, installed only on a fabric's `subnet_manager` node (required when one is named)."""


class MonitoringSpec(_Model):
    """Node and GPU metrics exporters."""

    node_exporter_version: ExactVersion | None = None
    """Exact prometheus-node-exporter package version; unset to skip it."""
    dcgm_exporter_image: ImageRef | None = None
    """DCGM exporter container image by digest; unset to skip it."""


class SoftwareProfile(_Model):
    """One pinned GPU software stack; nodes refer to it by name."""

    driver: DriverSpec
    """NVIDIA driver branch and version."""
    cuda: CudaSpec
    """CUDA toolkit version."""
    container_runtime: ContainerRuntimeSpec
    """Container runtime and version."""
    container_toolkit: ContainerToolkitSpec
    """nvidia-container-toolkit version."""
    fabric_manager: FabricManagerSpec = FabricManagerSpec()
    """Fabric manager settings."""
    dcgm: DcgmSpec = DcgmSpec(enabled=False)
    """DCGM settings."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """Metrics exporters (installed on nodes with the monitoring role)."""
    rdma: RdmaSpec | None = None
    """RDMA stack for nodes with fabric ports; unset on profiles of nodes without a fabric."""


class Mirror(_Model):
    """A mirror host: signed apt repository, container registry and file/model store."""

    name: Hostname
    """Mirror name (also its hostname)."""
    segment: Name
    """Segment the mirror sits on."""
    address: Ipv4Addr
    """Mirror address inside its segment."""
    http_port: int = Field(default=80, ge=1, le=65535)
    """Port of the apt repository and the file/model store."""
    registry_port: int = Field(default=5000, ge=1, le=65535)
    """Port of the container registry."""
    keyring: AbsPath
    """Controller path of the keyring that signs the mirror's apt repository (`signed-by` on nodes)."""


class AptSource(_Model):
    """An upstream apt source used by connected segments."""

    name: Name
    """Short name, used for the sources and keyring file names."""
    url: HttpUrl
    """Repository URL."""
    suite: AptSuite
    """Suite (e.g. `bookworm`, or `/` for a flat repository)."""
    components: list[AptComponent] = []
    """Components (e.g. `main`); empty for a flat repository."""
    keyring: AbsPath
    """Controller path of the repository's signing keyring; installed as the source's `signed-by`."""

    @model_validator(mode="after")
    def _flat_has_no_components(self) -> AptSource:
        # sources.list(5): "If suite is an exact path, components must be omitted".
        if self.suite.endswith("/") and self.components:
            raise _invalid(
                f"suite {self.suite!r} is an exact path (a flat repository), which takes no components",
                "remove `components`, or give a suite name such as 'bookworm'",
            )
        return self


class ProvisioningMode(StrEnum):
    """How a segment's provisioning service answers DHCP."""

    DHCP = "dhcp"
    """The only DHCP server of the segment: static reservations from the stack's MACs, no dynamic pool."""
    PROXY = "proxy"
    """Proxy-DHCP beside the site's own DHCP server: boot information only, the site's server gives addresses."""


class Provisioning(_Model):
    """A segment's network-install service: DHCP (or proxy-DHCP), TFTP of iPXE, HTTP of per-node iPXE scripts.

    Only MACs declared under `nodes` get an answer; unknown machines get nothing (docs/bare-metal.md).
    """

    host: Hostname
    """Host that runs the service: a node or mirror of this segment (air-gapped: usually its mirror), or a
    dedicated host named here with `address`."""
    address: Ipv4Addr | None = None
    """Address of a dedicated provisioning host on this segment; unset when `host` is a node or mirror."""
    mode: ProvisioningMode = ProvisioningMode.DHCP
    """`dhcp`: static reservations only; `proxy`: proxy-DHCP next to the site's DHCP server."""
    http_port: int = Field(default=8081, ge=1, le=65535)
    """Port of the HTTP server that serves iPXE scripts, kernel, initrd and images on `host`."""
    dnsmasq_version: DebianVersion | None = None
    """Exact `dnsmasq-base` package version the host installs (from its segment's mirror or sources, like every
    package; locked and bundled). `gpufleet provision converge` needs it."""
    ipxe_version: DebianVersion | None = None
    """Exact `ipxe` package version (its iPXE builds are what firmware chain-loads). `provision converge` needs it."""
    files_url: HttpUrl | None = None
    """Base URL of a file store in the mirror layout (what a mirror serves under `/files/`) the host fetches the
    locked OS images and deploy files from: `<files_url>/provision/images/<name>.img`. Default: the segment's
    mirror (`http://<mirror>:<http_port>/files/`); a segment without a mirror whose nodes name an `image` must
    set it (air-gapped segments always use their mirror)."""


LOCAL_EXECUTION = "local"
"""`segments[].execution.host` value meaning: Ansible runs on the controller itself (the default)."""


class SegmentExecution(_Model):
    """Where Ansible runs for a segment's nodes (docs/scale.md).

    On the controller, or on an execution host inside the segment that receives each job with
    ansible-runner's transmit → worker → process protocol over one SSH connection from the controller.
    """

    host: Hostname = LOCAL_EXECUTION
    """`local` (the controller; the default), or a node or mirror of this segment (air-gapped: usually its
    mirror), or a dedicated host named here with `address`."""
    address: Ipv4Addr | None = None
    """Address of a dedicated execution host on this segment; unset when `host` is `local`, a node or a mirror."""
    user: PosixUser = "root"
    """User the controller logs in as on the execution host (the job runs as this user)."""
    runtime_dir: AbsPath = "/opt/gpufleet-exec"
    """Where `gpufleet exec-host install` puts the execution runtime (ansible-core, ansible-runner, Mitogen)
    on the execution host; jobs run under `<runtime_dir>/jobs/`."""

    @property
    def local(self) -> bool:
        """True when the controller itself runs Ansible for the segment."""
        return self.host == LOCAL_EXECUTION


class Segment(_Model):
    """An L2/L3 network segment of the site."""

    name: Name
    """Segment name."""
    cidr: Ipv4Net
    """Segment network, e.g. `10.20.0.0/24`."""
    vlan: int | None = Field(default=None, ge=1, le=4094)
    """802.1Q VLAN id; unset for an untagged segment."""
    gateway: Ipv4Addr | None = None
    """Default gateway; air-gapped segments usually have none."""
    mtu: int = Field(default=1500, ge=1280, le=9216)
    """Interface MTU on this segment."""
    dns: list[Ipv4Addr] = []
    """DNS resolvers."""
    ntp: list[NtpServer] = []
    """NTP servers (addresses or names reachable from the segment)."""
    airgapped: bool = False
    """No route to the outside: every package, image and model comes from `mirror`."""
    mirror: Hostname | None = None
    """Name of the mirror this segment installs from (required when air-gapped)."""
    sources: list[AptSource] = []
    """Upstream apt sources for connected segments without a mirror."""
    egress_allow: list[Ipv4Net] = []
    """Destinations nodes may reach outside their segment; air-gapped: only the mirror."""
    egress_probe: Ipv4Addr | None = None
    """An address outside the segment that the air-gap firewall check must find unreachable."""
    provisioning: Provisioning | None = None
    """Network-install service of this segment; unset when nodes are installed some other way."""
    execution: SegmentExecution = SegmentExecution()
    """Where Ansible runs for this segment's nodes: `local` (the controller) or an execution host on the segment."""


class BootMode(StrEnum):
    """Firmware boot mode a node is set to (and its bootloader is installed for)."""

    UEFI = "uefi"
    BIOS = "bios"


# Disk serial numbers as udev reports them (ID_SERIAL_SHORT): letters, digits, '.', '_', '-'.
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A kernel device path or a stable udev link: /dev/nvme0n1, /dev/sda, /dev/disk/by-id/…, /dev/disk/by-path/….
_DISK_PATH = re.compile(r"/dev/(?:[a-z][a-z0-9]{1,31}|disk/by-(?:id|path|uuid)/[A-Za-z0-9][A-Za-z0-9:._+-]{0,127})")
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
"""An OS image name (a file name on the provisioning host and a kernel argument)."""
DiskSerial = Annotated[str, _BASE, _grammar(_SERIAL, "a disk serial number", "write it as `lsblk -o SERIAL` shows it")]
DiskPath = Annotated[
    str, _BASE, _grammar(_DISK_PATH, "a disk device path", "use /dev/<name> or /dev/disk/by-{id,path,uuid}/<name>")
]
ImageName = Annotated[
    str, _BASE, _grammar(IMAGE_NAME, "an OS image name", "use lower-case letters, digits, '.', '_' and '-'")
]


class RootDiskHint(_Model):
    """Which disk of a node is its root disk; exactly one of `size_gb`, `serial`, `path`."""

    size_gb: int | None = Field(default=None, ge=1, le=1_000_000)
    """Size in GB (10^9 bytes) as the disk reports it, rounded down: the one disk of this size."""
    serial: DiskSerial | None = None
    """Disk serial number (udev `ID_SERIAL_SHORT`, `lsblk -o SERIAL`)."""
    path: DiskPath | None = None
    """Device path; prefer a stable `/dev/disk/by-path/…` or `/dev/disk/by-id/…` link over `/dev/sdX`."""

    @model_validator(mode="after")
    def _exactly_one(self) -> RootDiskHint:
        if sum(x is not None for x in (self.size_gb, self.serial, self.path)) != 1:
            raise _invalid(
                "a root disk hint names exactly one of `size_gb`, `serial` or `path`",
                "pick the one that identifies the disk uniquely (serial is the most stable)",
            )
        return self


# --- The GPU fabric (issue 23): RDMA ports of each node and the fabrics they form ---------------------------

NETDEV = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
"""A Linux network interface name (IFNAMSIZ: at most 15 bytes; no '/', ':', whitespace; not '.'/'..')."""
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
"""A PCI function address as sysfs and `lspci -D` write it: `domain:bus:device.function` (`0000:17:00.0`)."""
PKEY = re.compile(r"0x[0-9a-f]{4}")
"""An InfiniBand partition key in hex (`0x7fff` is the default partition), without the membership bit."""
FABRIC_SPEEDS_GBPS = (10, 25, 40, 50, 56, 100, 200, 400, 800)
"""Per-port data rates ports are sold at (Ethernet and InfiniBand SDR…XDR rounded as `ibstat` shows them)."""
IB_MTUS = (256, 512, 1024, 2048, 4096)
"""InfiniBand MTUs (IBTA spec vol. 1, 7.7.1: 256–4096 bytes)."""


def _pkey(value: str) -> str:
    if not PKEY.fullmatch(value) or not 0x0001 <= int(value, 16) <= 0x7FFF:
        raise _invalid(
            f"{_show(value)} is not a partition key",
            "write four lower-case hex digits from 0x0001 to 0x7fff (0x7fff is the default partition)",
        )
    return value


NetdevName = Annotated[
    str,
    _BASE,
    _grammar(NETDEV, "a network interface name", "use letters, digits, '_', '.' and '-', at most 15 characters"),
]
PciAddress = Annotated[
    str,
    _BASE,
    _grammar(PCI_ADDRESS, "a PCI address", "write it as `lspci -D` shows it, e.g. 0000:17:00.0 (lower-case hex)"),
]
PartitionKey = Annotated[str, _BASE, _Check(_pkey, PKEY)]


class FabricType(StrEnum):
    """The link layer of a GPU fabric."""

    INFINIBAND = "infiniband"
    ROCE = "roce"


class RoceQos(_Model):
    """Lossless RoCE: RDMA traffic marked with a DSCP value and carried on a PFC-enabled priority.

    The defaults are NVIDIA's recommended RoCE configuration (DSCP 26 → priority 3, PFC on priority 3);
    the switches must be configured to match, which gpufleet does not do.
    """

    dscp: int = Field(default=26, ge=0, le=63)
    """DSCP value of RDMA traffic (the RDMA-CM default ToS becomes `dscp << 2`)."""
    pfc_priority: int = Field(default=3, ge=0, le=7)
    """802.1p priority with PFC on: the only lossless priority of the port."""


class Fabric(_Model):
    """An RDMA fabric the GPU nodes talk over (InfiniBand or RoCE), separate from the management segments."""

    name: Name
    """Fabric name."""
    type: FabricType
    """`infiniband` or `roce`."""
    cidr: Ipv4Net
    """Addresses of the fabric ports (IPoIB or the RoCE interfaces): RDMA-CM connects by IP address."""
    mtu: int = Field(default=4096, ge=256, le=9216)
    """InfiniBand: the IB MTU (256–4096). RoCE: the Ethernet MTU of the ports (RoCE uses up to 4096 of it)."""
    partition_key: PartitionKey | None = None
    """InfiniBand only: the partition the nodes' IPoIB interfaces join; unset: the default partition."""
    subnet_manager: Hostname | None = None
    """InfiniBand only: the node that runs opensm; unset when the switches run the subnet manager."""
    vlan: int | None = Field(default=None, ge=1, le=4094)
    """RoCE only: 802.1Q VLAN of the RDMA interfaces (PFC needs a VLAN tag or DSCP trust on the switch)."""
    qos: RoceQos | None = None
    """RoCE only: DSCP marking and the PFC priority (defaults to NVIDIA's recommended values)."""
    min_bandwidth_gbps: float | None = Field(default=None, gt=0)
    """Pairwise `ib_write_bw` must reach this; unset: 80 % of the ports' declared speed."""
    max_latency_us: float = Field(default=10.0, gt=0, le=1_000_000)
    """Pairwise `ib_write_lat` typical latency must stay below this (microseconds)."""


class FabricPort(_Model):
    """One RDMA port of a node, identified by exactly one of `pci`, `mac` or `netdev`."""

    fabric: Name
    """The fabric this port is cabled to."""
    pci: PciAddress | None = None
    """PCI address of the adapter function (`lspci -D`): stable across OS reinstalls."""
    mac: MacAddress | None = None
    """MAC address of the port's network interface (RoCE) or its IPoIB interface's hardware address suffix."""
    netdev: NetdevName | None = None
    """Interface name: for Soft-RoCE ports and where names are stable (predictable names from the BIOS)."""
    speed_gbps: int
    """Declared data rate of the port in Gb/s; `validate-node` fails a port that links up slower."""
    address: Ipv4Addr
    """The port's address on the fabric (inside the fabric's `cidr`)."""
    soft_roce: bool = False
    """RoCE only: the port is Soft-RoCE (`rdma_rxe`) over `netdev` — for labs and tests, never for GPU traffic."""
    gpu: int | None = Field(default=None, ge=0, le=63)
    """The GPU (index) this port serves: its rail. Where the catalogue knows the node's `server`, the port must
    be that GPU's NIC (the one under the same PCIe switch, for GPUDirect RDMA without crossing the CPU)."""

    @model_validator(mode="after")
    def _identified(self) -> FabricPort:
        if sum(x is not None for x in (self.pci, self.mac, self.netdev)) != 1:
            raise _invalid(
                "a fabric port names exactly one of `pci`, `mac` or `netdev`",
                "prefer `pci` (stable across reinstalls); `netdev` is for Soft-RoCE ports",
            )
        if self.speed_gbps not in FABRIC_SPEEDS_GBPS:
            raise _invalid(
                f"speed {self.speed_gbps} Gb/s is not a port speed",
                "give one of " + ", ".join(str(s) for s in FABRIC_SPEEDS_GBPS) + " (Gb/s, as `ibstat` reports it)",
            )
        if self.soft_roce and self.netdev is None:
            raise _invalid("a Soft-RoCE port is created on a network interface", "name the interface with `netdev`")
        return self


class BmcProtocol(StrEnum):
    """How gpufleet talks to a BMC."""

    REDFISH = "redfish"
    IPMI = "ipmi"


class Bmc(_Model):
    """Baseboard management controller of a node."""

    protocol: BmcProtocol = BmcProtocol.REDFISH
    """Redfish (preferred) or IPMI."""
    endpoint: BmcEndpoint
    """`https://bmc-host` for Redfish, `ipmi://bmc-host` for IPMI."""
    system_id: RedfishId | None = None
    """Redfish system id or name; unset when the BMC manages exactly one system."""
    username: BmcUser
    """BMC user name (not secret)."""
    password: SecretRef
    """Where the BMC password comes from; never the password itself."""
    verify_tls: bool = True
    """Verify the BMC's TLS certificate."""
    ca_bundle: AbsPath | None = None
    """CA bundle path to verify the BMC certificate with."""


class GpuSpec(_Model):
    """The GPUs a node has."""

    model: GpuModelName
    """GPU model from the catalogue (A100-40, A100-80, H100, H200, B200, L40S, L4, A10 …)."""
    count: int = Field(ge=0, le=16)
    """Number of GPUs."""
    nvswitch: bool = False
    """The node has an NVSwitch fabric (HGX/DGX): fabric manager is then required."""


class Node(_Model):
    """A bare-metal GPU node."""

    hostname: Hostname
    """Node hostname (unique in the site)."""
    segment: Name
    """Segment the node's management address is on."""
    address: Ipv4Addr
    """Management address (inside the segment's CIDR)."""
    macs: list[MacAddress] = Field(min_length=1)
    """MAC addresses of the node's interfaces; the first is the management/PXE interface."""
    bmc: Bmc | None = None
    """BMC for power and boot control; required to rebuild the node."""
    gpu: GpuSpec
    """GPU model, count and NVSwitch."""
    os: OperatingSystem = OperatingSystem.UBUNTU_2204
    """Operating system."""
    profile: Name | None = None
    """Software profile name; the site's `default_profile` when unset."""
    roles: list[NodeRole] = [NodeRole.INFERENCE, NodeRole.MONITORING]
    """What the node is for."""
    extra_sources: list[HttpUrl] = []
    """Additional URLs the node fetches from (apt, files); checked against air-gap rules."""
    ssh_user: PosixUser = "root"
    """User Ansible connects as (with sudo when not root)."""
    boot_mode: BootMode = BootMode.UEFI
    """Firmware boot mode the node is set to: `uefi` (default) or legacy `bios`."""
    root_disk: RootDiskHint | None = None
    """Disk the OS image is written to; set it for every node with more than one disk (the stack cannot tell)."""
    image: ImageName | None = None
    """Name of the OS image the provisioning service installs; unset: the node is never network-installed
    (its iPXE script hands back to the firmware's next boot device)."""
    fabric_ports: list[FabricPort] = []
    """RDMA ports (InfiniBand or RoCE) for GPU-to-GPU traffic between nodes; see `fabrics`."""
    server: CatalogueKey | None = None
    """The server model (catalogue `servers`, e.g. `dgx-h100`): its GPUs and which compute NIC sits under which
    GPU's PCIe switch; validation then checks `fabric_ports` against it. Unset: no topology is checked."""


class ModelSpec(_Model):
    """A served model. Architecture fields default from the catalogue entry of `name`."""

    name: ModelName
    """Model name; a catalogue name fills in the architecture."""
    revision: Revision
    """Exact revision (commit hash or immutable tag) of the weights."""
    source: ModelSource
    """Where the weights come from: `http(s)://` file store URL or `hf://org/name[@revision[/file]]`.
    For `hf://` the hub revision is the one after `@`, else `revision`; `gpufleet lock` pins its commit."""
    dtype: DType = DType.BF16
    """Weight precision or quantisation."""
    context_length: int = Field(ge=128)
    """Maximum context length served (engine's max model length)."""
    parameters: float | None = Field(default=None, gt=0)
    """Parameter count."""
    layers: int | None = Field(default=None, ge=1)
    """Transformer layers."""
    heads: int | None = Field(default=None, ge=1)
    """Attention heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (GQA)."""
    head_dim: int | None = Field(default=None, ge=1)
    """Dimension per attention head."""
    vocab: int | None = Field(default=None, ge=1)
    """Vocabulary size."""
    max_context: int | None = Field(default=None, ge=1)
    """Longest context the engine accepts for these weights (config.json `max_position_embeddings`)."""


class ServiceSlo(_Model):
    """Service-level objectives of an inference service: the alerts and `gpufleet status` compare against them."""

    ttft_p99_ms: float = Field(default=2000, gt=0, le=600_000)
    """Time to first token, 99th percentile over 5 minutes, in milliseconds."""
    itl_p99_ms: float = Field(default=200, gt=0, le=60_000)
    """Inter-token latency (time between streamed tokens), 99th percentile over 5 minutes, in milliseconds."""
    min_tokens_per_s: float = Field(default=0, ge=0)
    """Generated tokens per second the service must sustain while it has requests; 0 sets no floor."""
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    """Largest fraction of failed requests over 5 minutes."""


class InferenceService(_Model):
    """An inference server deployment on one or more nodes."""

    name: Name
    """Service name (systemd unit and endpoint name)."""
    engine: Annotated[Engine, BeforeValidator(_offered_engine)]
    """vllm, tgi or llamacpp (triton is not offered)."""
    model: ModelSpec
    """The model served."""
    image: ImageRef | None = None
    """Container image by digest; only `llamacpp` may run natively without one."""
    wheel: WheelUrl | None = None
    """Native install (`llamacpp`): URL of the llama-cpp-python wheel on the mirror or index."""
    tensor_parallel: int = Field(default=1, ge=1)
    """Tensor parallel size (GPUs per replica)."""
    pipeline_parallel: int = Field(default=1, ge=1)
    """Pipeline parallel size."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of GPU memory the engine may use (vLLM's --gpu-memory-utilization)."""
    kv_cache_dtype: KvCacheDType = KvCacheDType.AUTO
    """KV cache precision."""
    max_concurrency: int = Field(default=1, ge=1)
    """Concurrent sequences at full context the deployment must hold in KV cache."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port the OpenAI-compatible endpoint listens on."""
    nodes: list[Hostname] = Field(min_length=1)
    """Hostnames of the nodes serving it: one replica on each, or one instance across all with `span_nodes`."""
    span_nodes: bool = False
    """Run ONE instance across all `nodes` (tensor parallel inside each node, pipeline parallel across them,
    `pipeline_parallel` = number of nodes) over the fabric they share; the first node is the head and its
    endpoint is the service endpoint. Unset: each node runs its own replica."""
    rpc_port: int = Field(default=50052, ge=1, le=65535)
    """A service spanning nodes: llamacpp, the port of the llama.cpp RPC backend on the other nodes (bound to
    their fabric address only; it has no authentication, so it must never face an untrusted network); vllm,
    the head's torch.distributed store (`--master-port`) at its fabric address."""
    slo: ServiceSlo | None = None
    """This service's objectives; the site's `observability.slo` when unset."""


class Catalogue(_Model):
    """Stack-local additions to the GPU and model catalogue."""

    gpus: dict[CatalogueKey, GpuCatalogueEntry] = {}
    """Extra GPU models by name."""
    models: dict[CatalogueKey, ModelArch] = {}
    """Extra model architectures by name."""
    servers: dict[CatalogueKey, ServerTopology] = {}
    """Extra server models (GPU-to-NIC topology) by name."""


class ComputeNic(_Model):
    """One compute-fabric NIC of a server model and the GPU behind the same PCIe switch."""

    pci: PciAddress
    """PCI address of the NIC function as the vendor documents it."""
    netdev: NetdevName
    """Its default interface name (e.g. `ibp24s0`)."""
    gpu: int = Field(ge=0, le=63)
    """Index of the GPU under the same PCIe switch (its rail)."""


class ServerTopology(_Model):
    """A server model whose GPU-to-NIC topology its vendor documents."""

    gpu: CatalogueKey
    """GPU model (a catalogue `gpus` key)."""
    gpu_count: int = Field(ge=1, le=64)
    """GPUs in the server."""
    compute_nics: list[ComputeNic] = Field(min_length=1)
    """The compute-fabric NICs, one per rail."""


class GpuCatalogueEntry(_Model):
    """A GPU model's memory figures."""

    product_name: ProductName
    """Name nvidia-smi reports."""
    smi_memory_mib: int = Field(gt=0)
    """memory.total as nvidia-smi reports it, MiB."""
    usable_gib: float = Field(gt=0)
    """Device memory CUDA reports, GiB (what engines budget against)."""
    nvswitch_capable: bool = False
    """Sold in NVSwitch (HGX/DGX) systems."""
    open_modules_required: bool = False
    """The proprietary kernel modules do not support it: profiles of its nodes need `driver.open_modules`."""
    non_torch_gib: float | None = Field(default=None, ge=0, le=64)
    """Memory outside PyTorch per GPU at TP 1 (CUDA context, cuBLAS, allocator), GiB; unset: the planner's default."""
    non_torch_tp_gib: float | None = Field(default=None, ge=0, le=64)
    """Extra memory outside PyTorch per GPU when tensor parallel (NCCL, custom all-reduce buffers), GiB."""


class ModelArch(_Model):
    """A model architecture's size figures."""

    parameters: float = Field(gt=0)
    """Parameter count."""
    layers: int = Field(ge=1)
    """Transformer layers."""
    heads: int = Field(ge=1)
    """Attention heads."""
    kv_heads: int = Field(ge=1)
    """Key/value heads."""
    head_dim: int = Field(ge=1)
    """Dimension per head."""
    vocab: int = Field(ge=1)
    """Vocabulary size."""
    max_context: int = Field(ge=1)
    """Longest context engines accept (config.json `max_position_embeddings`; vLLM refuses a longer max-model-len)."""
    hidden_size: int | None = Field(default=None, ge=1)
    """config.json `hidden_size` (unset: heads × head_dim, which is wrong for some models)."""
    intermediate_size: int | None = Field(default=None, ge=1)
    """config.json `intermediate_size` of dense MLP layers (unset: derived from the parameter count)."""
    experts: int = Field(default=0, ge=0)
    """Routed experts per MoE layer (config.json `num_experts` / `num_local_experts`); 0 for dense models."""
    experts_per_token: int = Field(default=0, ge=0)
    """Experts each token is routed to (config.json `num_experts_per_tok`)."""
    moe_intermediate_size: int | None = Field(default=None, ge=1)
    """Intermediate size of one expert (config.json `moe_intermediate_size`; Mixtral: `intermediate_size`)."""
    shared_expert_intermediate_size: int = Field(default=0, ge=0)
    """Intermediate size of the always-active shared expert(s), 0 if none."""
    tie_word_embeddings: bool = False
    """config.json `tie_word_embeddings`: the LM head reuses the embedding matrix."""
    bf16_parts: list[Bf16Part] | None = Field(default=None, max_length=64)
    """Parts a quantised checkpoint keeps in 16 bits (`embeddings`, `lm_head`, `attention`, `mlp.<layer>`);
    unset: embeddings and LM head."""


class GpuHealth(_Model):
    """Per-node GPU health limits; any new XID error or uncorrectable ECC error alerts regardless."""

    max_temperature_c: int = Field(default=85, ge=40, le=110)
    """GPU temperature (°C) above which a GPU alerts (sustained for 5 minutes)."""
    max_memory_used_fraction: float = Field(default=0.98, gt=0, le=1)
    """Framebuffer memory in use, as a fraction of the total, above which a GPU alerts (sustained 15 minutes)."""


class PrometheusHost(_Model):
    """Where one segment's Prometheus runs; it scrapes only that segment's nodes."""

    segment: Name
    """Segment whose nodes this Prometheus scrapes."""
    host: Hostname
    """Hostname of a node or mirror on that segment (air-gapped segments: usually their mirror)."""
    port: int = Field(default=9090, ge=1, le=65535)
    """Port of Prometheus' HTTP API (and of `/federate` for the site view)."""


class Observability(_Model):
    """Metrics collection, SLO alerts and the site view (see docs/observability.md)."""

    prometheus: list[PrometheusHost] = []
    """One Prometheus per monitored segment; empty disables metrics collection."""
    site_view: Name | None = None
    """Segment whose Prometheus federates the others (the place `gpufleet status` asks); a connected segment."""
    scrape_interval_s: int = Field(default=15, ge=1, le=300)
    """How often every target is scraped."""
    alertmanager_port: int = Field(default=9093, ge=1, le=65535)
    """Port of Alertmanager on each Prometheus host."""
    slo: ServiceSlo = ServiceSlo()
    """Objectives of every service that sets none."""
    gpu: GpuHealth = GpuHealth()
    """GPU health limits of every node."""
    prometheus_version: ExactVersion | None = None
    """Exact Debian/Ubuntu `prometheus` package version each Prometheus host installs (from its segment's mirror
    or sources, like every package); unset: gpufleet renders the monitoring files but installs no server."""
    alertmanager_version: ExactVersion | None = None
    """Exact `prometheus-alertmanager` package version installed beside each Prometheus; unset: none."""
    service_down_for_s: int = Field(default=60, ge=0, le=3600)
    """Seconds the SLO probe must go unanswered before `GpufleetServiceDown` fires (its `for:`)."""


class Controller(_Model):
    """How the controller (where `gpufleet`/`pulumi` runs) reaches nodes."""

    ssh_config: AbsPath | None = None
    """OpenSSH client config used for nodes (IdentityFile, UserKnownHostsFile with pinned host keys)."""
    known_hosts: AbsPath | None = None
    """known_hosts file with the nodes' pinned host keys (StrictHostKeyChecking=yes)."""


class Site(_Model):
    """A whole GPU site: the `gpufleet:site` object of a stack file."""

    name: Name
    """Site name."""
    reboot: RebootSettings = RebootSettings()
    """Reboot policy."""
    rollout: RolloutPolicy = RolloutPolicy()
    """Rolling converge policy, applied per segment."""
    default_profile: Name
    """Software profile of nodes that name none."""
    profiles: dict[Name, SoftwareProfile] = Field(min_length=1)
    """Software profiles by name."""
    segments: list[Segment] = Field(min_length=1)
    """Network segments."""
    mirrors: list[Mirror] = []
    """Mirror hosts."""
    nodes: list[Node] = []
    """GPU nodes."""
    fabrics: list[Fabric] = []
    """RDMA fabrics between the GPU nodes (InfiniBand or RoCE); nodes join them through `fabric_ports`."""
    services: list[InferenceService] = []
    """Inference services."""
    catalogue: Catalogue = Catalogue()
    """Additions to the built-in GPU/model catalogue."""
    admin_keys: list[SshPublicKey] = []
    """SSH public keys of administrators, installed for the admin user."""
    controller: Controller = Controller()
    """Controller-side SSH settings."""
    observability: Observability = Observability()
    """Metrics, SLO alerts and the site view."""
    lab_mode: Literal[False, True] = False
    """True only in the lab stack: nodes are containers with simulated GPUs (roles skip hardware steps)."""

    # Keyed lookups: the one place that indexes the site's lists by name (first entry wins on a duplicate,
    # which validation reports). Built on each call, not cached: `model_copy(update=...)` would carry a
    # cached index of the old lists into the copy.
    @property
    def segments_by_name(self) -> dict[str, Segment]:
        """Segments by name."""
        return {s.name: s for s in reversed(self.segments)}

    @property
    def mirrors_by_name(self) -> dict[str, Mirror]:
        """Mirrors by name."""
        return {m.name: m for m in reversed(self.mirrors)}

    @property
    def nodes_by_name(self) -> dict[str, Node]:
        """Nodes by hostname."""
        return {n.hostname: n for n in reversed(self.nodes)}

    @property
    def fabrics_by_name(self) -> dict[str, Fabric]:
        """Fabrics by name."""
        return {f.name: f for f in reversed(self.fabrics)}

    def segment(self, name: str) -> Segment | None:
        """The segment of that name, if any."""
        return self.segments_by_name.get(name)

    def mirror(self, name: str | None) -> Mirror | None:
        """The mirror of that name, if any."""
        return self.mirrors_by_name.get(name) if name else None

    def node(self, hostname: str) -> Node | None:
        """The node of that hostname, if any."""
        return self.nodes_by_name.get(hostname)


Catalogue.model_rebuild()
