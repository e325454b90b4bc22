"""A self-signed certificate and key for serving HTTPS locally (clients trust the certificate file itself).

The certificate is its own trust anchor, so it carries what strict X.509 verification asks of one: a critical
basicConstraints (CA), keyUsage with keyCertSign, subject and authority key identifiers, and the server's
names (DNS names and IP addresses) as subjectAltName with the serverAuth extended key usage.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

CERT_NAME, KEY_NAME = "cert.pem", "key.pem"


class CertificatePair(NamedTuple):
    certfile: Path
    keyfile: Path


def subject_names(hosts: Sequence[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def self_signed_pair(
    out_dir: Path | str,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 30,
) -> CertificatePair:
    """Writes ``cert.pem`` and ``key.pem`` (ECDSA P-256, mode 0600) valid for ``hosts`` and ``days`` days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 825:
        raise ValueError(f"days must be an integer in [1, 825], got {days!r}")
    if not hosts or not all(isinstance(host, str) and host for host in hosts):
        raise ValueError(f"hosts must be a non-empty list of host names or IP addresses, got {hosts!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(subject_names(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = CertificatePair(out_dir / CERT_NAME, out_dir / KEY_NAME)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(pair.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_bytes)
    os.chmod(pair.keyfile, 0o600)
    pair.certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return pair


def client_context(ca_file: Path | str | None):
    """An SSL context that verifies the server against ``ca_file`` (None: the system's trust store)."""
    import ssl

    return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
