"""A node's serving address: what vLLM binds to, what VLLM_HOST_IP says, what the endpoints
file lists. The platform record names the form (Platform.address); forming it is pure, the two
lookups it may need (an interface's IPv4 address, a name's IP) are injected.

Forms:
    "{host}"                           the node's name as the node list gives it
    "{short}.hsn.cm.aurora.alcf.anl.gov" a pattern: {host} the full name, {short} its first label
    "interface:hsn0"                   the IPv4 address of that interface on the node itself
"""

from __future__ import annotations

import socket
import string

INTERFACE_PREFIX = "interface:"
_FIELDS = {"host", "short"}


def check_form(form: str) -> str | None:
    """Why `form` is not a valid address form, or None."""
    if form.startswith(INTERFACE_PREFIX):
        return None if form[len(INTERFACE_PREFIX):].strip() else "interface: needs a name"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(form) if name is not None}
    except ValueError as e:
        return f"{form!r}: {e}"
    unknown = fields - _FIELDS
    if unknown:
        return f"{form!r}: unknown field(s) {', '.join(sorted(unknown))}; use {{host}} or {{short}}"
    return None


def serving_address(form: str, host: str, interface_address=None) -> str:
    """The address node `host` serves on. `interface_address(name) -> str` is only called for
    the interface form, on the node itself."""
    if form.startswith(INTERFACE_PREFIX):
        if interface_address is None:
            raise ValueError("the interface form needs interface_address")
        return interface_address(form[len(INTERFACE_PREFIX):].strip())
    return form.format(host=host, short=host.split(".")[0])


def host_ip(address: str, resolve=socket.gethostbyname) -> str:
    """VLLM_HOST_IP wants an IP: the serving address resolved, or itself if it is one or
    does not resolve (vLLM then resolves it the same way)."""
    try:
        return resolve(address)
    except OSError:
        return address


def interface_ipv4(name: str) -> str:
    """IPv4 address of interface `name` on this machine (Linux). OSError when it has none."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = struct.pack("256s", name.encode()[:15])
        try:
            answer = fcntl.ioctl(s.fileno(), siocgifaddr, packed)
        except OSError as e:
            raise OSError(e.errno, f"interface {name}: {e.strerror or 'no IPv4 address'}") from None
    return socket.inet_ntoa(answer[20:24])
