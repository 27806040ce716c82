"""The roles as the Ansible collection `galaxy.yml` declares (the project root is the collection root).

Ansible finds a collection's modules (`gpufleet.fleet.gpu_validate`) only under a collections path laid out
as `ansible_collections/<namespace>/<name>/`. Runs from the checkout get a private collections directory
whose one entry links back to the project, so the roles run exactly as the built collection would.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

GALAXY_FILE = "galaxy.yml"


@cache
def collection_id(root: Path) -> tuple[str, str]:
    """(namespace, name) from the project's galaxy.yml."""
    data = yaml.safe_load((root / GALAXY_FILE).read_text(encoding="utf-8"))
    return str(data["namespace"]), str(data["name"])


def fqcn(root: Path, plugin: str) -> str:
    """`namespace.name.plugin`."""
    namespace, name = collection_id(root)
    return f"{namespace}.{name}.{plugin}"


def link_collections(root: Path, into: Path) -> Path:
    """Make `into/ansible_collections/<namespace>/<name>` point at the project.

    Returns `into`, the directory to set as ANSIBLE_COLLECTIONS_PATH.
    """
    namespace, name = collection_id(root)
    link = into / "ansible_collections" / namespace / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(root.resolve(), target_is_directory=True)
    return into


if __name__ == "__main__":  # `python -m infra.ansible.collection DIR`: link DIR for ansible-lint / ansible-playbook
    import sys

    from infra.model.load import project_dir

    print(link_collections(project_dir(), Path(sys.argv[1])))
