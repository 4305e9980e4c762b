"""`corral export ansible --inventory FILE MANIFEST...`: a playbook and a role `corral` that put
corral and every manifest of the fleet on each host of the inventory, `install` and `up` them,
and apply the host's own filter (server) or a router's, derived from all the fleet's manifests.

Everything is decided by corral on each host, so the role stays thin and idempotent: `install`
and `up` say in their --json whether they changed anything (`changed_when` reads it), and the
host file is rendered from the inventory's variables by a template; `corral host apply` runs
only when that file, an install or the table itself (gone after a reboot) calls for it, and is
confirmed by the next task, whose running at all proves the controller still reaches the host
(corral's dead man's switch rolls it back otherwise).

The export is pure text: the manifests (and the vendor files their `image.add` names relative
to them) are copied into the role's files/, nothing on this host changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from corral.core.errors import UsageError
from corral.manifest.model import Manifest, load_manifest

LOST = (
    "the inventory is copied, not interpreted: each host's role, management, allow_out and "
    "LANs come from its variables (corral_role, corral_management, corral_allow_out, "
    "corral_anti_spoofing, corral_lans), checked on the host by `corral host apply`",
    "a router's LAN lists every manifest of the fleet unless the LAN names its services: the "
    "export does not know which host runs what",
    "image.add sources given as absolute paths (or outside the manifest's directory) are not "
    "copied: they must exist on every host",
    "corral itself is installed from a wheel (corral_wheel) you build; without one the role "
    "expects corral_bin on the host",
    "--check cannot say what `corral install`, `up` or `host apply` would change: those tasks "
    "are skipped in check mode (only the copied files and the host file are diffed)",
)

DEBIAN = ("nftables", "libseccomp2", "python3", "python3-venv", "iproute2", "util-linux",
          "passwd", "ca-certificates")


def _yaml(value: object) -> str:
    """JSON is YAML: strings quoted, so no manifest text is read as YAML syntax."""
    return json.dumps(value)


def _sources(m: Manifest) -> list[str]:
    """The image.add sources relative to the manifest that stay inside its directory."""
    out = []
    for source in m.image.add.values():
        if os.path.isabs(source) or ".." in Path(source).parts:
            continue
        out.append(source)
    return sorted(set(out))


def load(files: list[str]) -> list[tuple[Manifest, str]]:
    fleet: dict[str, tuple[Manifest, str]] = {}
    for file in files:
        m = load_manifest(file)
        if m.name in fleet:
            raise UsageError(f"{file}: service {m.name} is already given by {fleet[m.name][1]}")
        fleet[m.name] = (m, file)
    return [fleet[name] for name in sorted(fleet)]


def check_inventory(path: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--inventory {path}: cannot read it ({exc})") from None
    if not any(line.strip() and not line.lstrip().startswith(("#", ";"))
               for line in text.splitlines()):
        raise UsageError(f"--inventory {path}: no host in it")
    return text


PLAYBOOK = """\
# Exported by `corral export ansible`: corral and the fleet's manifests on every host of the
# inventory, installed, running, and behind the host's own filter. Run as root:
#   ansible-playbook -i {inventory} playbook.yml
# Each host's filter comes from its variables (roles/corral/defaults/main.yml lists them).
- name: Services contained by corral
  hosts: all
  become: "{{{{ corral_become | default(true) }}}}"
  environment:
    CORRAL_ROOT: "{{{{ corral_root | default('') }}}}"
  roles:
    - corral
"""

TASKS = """\
# The role `corral` (exported by `corral export ansible`). Idempotent: a second run changes
# nothing, because corral says in --json whether it changed anything.
- name: The host filter must keep the administrators' access
  ansible.builtin.assert:
    that:
      - corral_role in ["server", "router"]
      - not corral_host_filter or corral_management | length > 0
    fail_msg: >-
      set corral_role (server or router) and corral_management (the flows that reach this host
      to manage it, e.g. ["tcp/22@192.0.2.0/24"]): without them the filter would cut this very
      connection

- name: Find the Debian packages corral needs that are missing
  ansible.builtin.shell: |
    for p in {{ corral_apt_packages | join(' ') }}; do
      dpkg-query -W -f='${Status}\\n' "$p" 2>/dev/null | grep -q '^install ok installed' ||
        echo "$p"
    done
  register: corral_missing
  changed_when: false
  check_mode: false

- name: Install them
  ansible.builtin.command: >-
    apt-get install -y --no-install-recommends {{ corral_missing.stdout_lines | join(' ') }}
  environment:
    DEBIAN_FRONTEND: noninteractive
  when: corral_missing.stdout_lines | length > 0

- name: corral's virtual environment
  ansible.builtin.command: python3 -m venv {{ corral_venv }}
  args:
    creates: "{{ corral_venv }}/bin/python"
  when: corral_wheel | length > 0

- name: The corral wheel
  ansible.builtin.copy:
    src: "{{ corral_wheel }}"
    dest: "{{ corral_venv }}/{{ corral_wheel | basename }}"
    mode: "0644"
  register: corral_wheel_copied
  when: corral_wheel | length > 0

- name: Install corral from it (only when the wheel changed)
  ansible.builtin.shell: >-
    {{ corral_venv }}/bin/pip install --quiet {{ corral_venv }}/{{ corral_wheel | basename }} &&
    {{ corral_venv }}/bin/pip install --quiet --no-deps --force-reinstall
    {{ corral_venv }}/{{ corral_wheel | basename }}
  when: corral_wheel_copied is changed

- name: Every manifest of the fleet, with the files its image.add names
  ansible.builtin.copy:
    src: "{{ item.key }}/"
    dest: "{{ corral_etc }}/{{ item.key }}/"
    mode: "0644"
    directory_mode: "0755"
  loop: "{{ corral_fleet | dict2items }}"
  loop_control:
    label: "{{ item.key }}"

- name: corral install (users, base image, volumes, the service's table)
  ansible.builtin.command: >-
    {{ corral_bin }} install {{ corral_etc }}/{{ item }}/{{ corral_fleet[item] }} --json
  loop: "{{ corral_services }}"
  register: corral_installed
  changed_when: (corral_installed.stdout | from_json).changed

- name: corral up (returns when the service listens)
  ansible.builtin.command: "{{ corral_bin }} up {{ item }} --json"
  loop: "{{ corral_services }}"
  register: corral_up
  changed_when: (corral_up.stdout | from_json).changed

- name: The host file, from this host's variables and the fleet's manifests
  ansible.builtin.template:
    src: host.toml.j2
    dest: "{{ corral_etc }}/host.toml"
    mode: "0644"
  register: corral_host_file
  when: corral_host_filter

- name: Is the host's table loaded (a reboot empties the kernel's tables)
  ansible.builtin.command: nft list table inet corral-host
  register: corral_host_table
  changed_when: false
  failed_when: false
  check_mode: false
  when: corral_host_filter

- name: corral host apply (rolled back unless confirmed in time)
  ansible.builtin.command: >-
    {{ corral_bin }} host apply {{ corral_etc }}/host.toml
    --confirm-timeout {{ corral_confirm_timeout }} --json
  register: corral_applied
  when: >-
    corral_host_filter and (corral_host_file is changed or corral_installed is changed
    or corral_host_table.rc != 0)

- name: corral host confirm (this task running proves the controller still gets through)
  ansible.builtin.command: "{{ corral_bin }} host confirm {{ corral_etc }}/host.toml --json"
  when: corral_applied is changed
"""

TEMPLATE = """\
# {{ ansible_managed }}: the host file of {{ inventory_hostname }} (docs/host-firewall.md).
# corral adds the listens and connects of the services installed here; a router's LANs list
# the manifests whose flows it forwards.
role = {{ corral_role | to_json }}
management = {{ corral_management | to_json }}
allow_out = {{ corral_allow_out | to_json }}
anti_spoofing = {{ corral_anti_spoofing | bool | string | lower }}
{% for lan in corral_lans %}

[[lan]]
interface = {{ lan.interface | to_json }}
prefixes = {{ lan.prefixes | to_json }}
services = [{% for s in lan.services | default(corral_fleet | list) %}\
{{ (s ~ '/' ~ corral_fleet[s]) | to_json }}{{ ', ' if not loop.last else '' }}{% endfor %}]
{% endfor %}
"""


def _defaults(fleet: list[tuple[Manifest, str]]) -> str:
    lines = ["# The role's variables; set them per host or group in the inventory.",
             "# Every manifest of the fleet: service name -> its file under files/NAME/.",
             "corral_fleet:"]
    lines += [f"  {m.name}: {_yaml(os.path.basename(file))}" for m, file in fleet]
    lines += [
        "# The services this host runs (install + up); a router may run none: [].",
        "corral_services: \"{{ corral_fleet | list }}\"",
        "# Where the manifests go on the host, and corral's state (CORRAL_ROOT; empty: /).",
        "corral_etc: /etc/corral",
        "corral_root: \"\"",
        "# corral: a wheel on the controller to install into corral_venv, or empty when corral",
        "# is already there (corral_bin).",
        "corral_wheel: \"\"",
        "corral_venv: /opt/corral",
        "corral_bin: \"{{ corral_venv }}/bin/corral\"",
        "corral_apt_packages: " + _yaml(list(DEBIAN)),
        "# The host's own filter (table inet corral-host): server or router.",
        "corral_host_filter: true",
        "corral_role: server",
        "# Flows that reach the host to manage it, e.g. [\"tcp/22@192.0.2.0/24\"]: required.",
        "corral_management: []",
        "corral_allow_out: []",
        "corral_anti_spoofing: true",
        "# A router's LANs: [{interface: lan0, prefixes: [10.0.0.0/24], services: [NAME...]}];",
        "# services defaults to every manifest of the fleet.",
        "corral_lans: []",
        "corral_confirm_timeout: 120",
        ""]
    return "\n".join(lines)


def export(fleet: list[tuple[Manifest, str]], inventory: str) -> dict[str, str]:
    """{relative path: text} of the generated files (the copied vendor files: `copies`)."""
    role = "roles/corral/"
    files = {"playbook.yml": PLAYBOOK.format(inventory=os.path.basename(inventory)),
             role + "tasks/main.yml": TASKS,
             role + "defaults/main.yml": _defaults(fleet),
             role + "templates/host.toml.j2": TEMPLATE}
    for m, file in fleet:
        files[f"{role}files/{m.name}/{os.path.basename(file)}"] = Path(file).read_text()
    return files


def copies(fleet: list[tuple[Manifest, str]], inventory: str) -> dict[str, Path]:
    """{relative path: source} of the files copied as they are: the inventory, and the vendor
    files (or directories) each manifest's image.add names relative to it."""
    out = {os.path.basename(inventory): Path(inventory)}
    for m, file in fleet:
        base = Path(file).parent
        for source in _sources(m):
            out[f"roles/corral/files/{m.name}/{source}"] = base / source
    return out


def lost(fleet: list[tuple[Manifest, str]]) -> list[str]:
    out = list(LOST)
    for m, file in fleet:
        kept = set(_sources(m))
        absolute = sorted(s for s in m.image.add.values() if s not in kept)
        if absolute:
            out.append(f"{file}: image.add sources not copied (must exist on every host): "
                       + ", ".join(absolute))
    return out
