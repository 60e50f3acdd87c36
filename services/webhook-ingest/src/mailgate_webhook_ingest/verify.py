"""Postal webhook signatures (specs/postal.md §7): pure functions over the raw body bytes.

Postal signs the exact body with its installation key (RSA PKCS#1 v1.5): SHA-256 in
``X-Postal-Signature-256`` (v3.2+), SHA-1 in ``X-Postal-Signature``. ``X-Postal-Signature-KID``
is the SHA-256 hex of the key's DER ``SEQUENCE{n, e}`` and picks the key during a rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIGNATURE_256 = "X-Postal-Signature-256"
SIGNATURE_SHA1 = "X-Postal-Signature"
SIGNATURE_KID = "X-Postal-Signature-KID"

_PEM = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.DOTALL)
_DKIM_P = re.compile(r"(?:^|;)\s*p\s*=\s*([A-Za-z0-9+/=\s]+)")


class InvalidKeyError(ValueError):
    """POSTAL_WEBHOOK_PUBLIC_KEY holds something that is not an RSA public key."""


def key_id(key: rsa.RSAPublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha256(der).hexdigest()


def _load_one(text: str) -> rsa.RSAPublicKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            match = _DKIM_P.search(text) if "=" in text and ";" in text else None
            b64 = match.group(1) if match else text
            der = base64.b64decode("".join(b64.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError(f"not a public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidKeyError("not an RSA public key")
    return key


def load_public_keys(value: str) -> list[rsa.RSAPublicKey]:
    """Keys from a PEM, a base64 SPKI DER (the DKIM ``p=`` value) or a whole DKIM record.

    Several keys (for rotation) are separated by commas; PEM blocks may also follow each
    other. A literal ``\\n`` (as env files often carry PEMs) counts as a newline.
    """
    text = value.replace("\\n", "\n")
    keys: list[rsa.RSAPublicKey] = []
    for pem in _PEM.findall(text):
        keys.append(_load_one(pem))
    rest = _PEM.sub(",", text)
    for part in rest.split(","):
        if part.strip():
            keys.append(_load_one(part))
    if not keys:
        raise InvalidKeyError("no key given")
    return keys


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    """``missing_signature`` or ``bad_signature`` when not ok; metric label."""
    algorithm: str = ""


class KeyRing:
    """The keys we trust, indexed by Postal's KID."""

    def __init__(self, keys: list[rsa.RSAPublicKey]):
        if not keys:
            raise InvalidKeyError("no key given")
        self.keys = list(keys)
        self.by_kid = {key_id(k): k for k in self.keys}

    @classmethod
    def from_setting(cls, value: str) -> KeyRing:
        return cls(load_public_keys(value))

    def _candidates(self, kid: str | None) -> list[rsa.RSAPublicKey]:
        if kid:
            key = self.by_kid.get(kid.strip().lower())
            if key is not None:
                return [key]
        return self.keys

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Verdict:
        """Check the SHA-256 signature, or the SHA-1 one when only that is present."""
        sig256 = headers.get(SIGNATURE_256)
        algorithm: hashes.HashAlgorithm
        if sig256:
            signature, algorithm = sig256, hashes.SHA256()
        elif headers.get(SIGNATURE_SHA1):
            signature, algorithm = headers[SIGNATURE_SHA1], hashes.SHA1()  # noqa: S303
        else:
            return Verdict(False, "missing_signature")
        try:
            raw = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            return Verdict(False, "bad_signature")
        for key in self._candidates(headers.get(SIGNATURE_KID)):
            try:
                key.verify(raw, body, padding.PKCS1v15(), algorithm)
            except InvalidSignature:
                continue
            return Verdict(True, algorithm=algorithm.name)
        return Verdict(False, "bad_signature")
