"""Which addresses mailgate refuses to connect to on a customer's behalf (SSRF guard).

Used by the ledger when a webhook URL is registered and by ams-reporter on every connection
(so a name that later resolves to a private address is still refused).
"""

from __future__ import annotations

import ipaddress


def is_forbidden_ip(address: str) -> bool:
    """True for every address that is not a public unicast one (loopback, private,
    link-local, multicast, reserved, unspecified; IPv4-mapped IPv6 judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )
