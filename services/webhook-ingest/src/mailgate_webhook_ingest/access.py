"""``POSTAL_WEBHOOK_ALLOWED_IPS``: which client addresses may post webhooks (pure)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    """CIDRs or single addresses; raise ValueError naming the first bad one."""
    networks: list[Network] = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or CIDR") from None
    return networks


def is_allowed(remote: str | None, networks: list[Network]) -> bool:
    """True when no allowlist is set, or ``remote`` is inside one of ``networks``."""
    if not networks:
        return True
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
