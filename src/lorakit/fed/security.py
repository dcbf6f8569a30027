"""Credentials for a deployed federation: a private CA with a TLS certificate for the SuperLink, and an EC key
pair per SuperNode for Flower's SuperNode authentication (``cryptography``, a dependency of Flower).

What each protects (`lorakit.fed.runner.federation` turns them on):

* TLS (``--ssl-*`` on the SuperLink, ``--root-certificates`` on SuperNodes and in ``flwr``'s connection):
  encrypts and authenticates the server side of the Fleet API (SuperNode <-> SuperLink: adapters, updates,
  counts) and the Control API (``flwr run``): nobody on the path can read or alter the traffic, or pose as
  the SuperLink.  It does not say who the client is.
* SuperNode authentication (``--enable-supernode-auth``; each SuperNode's public key registered with
  ``flwr supernode register`` before it starts, ``--auth-supernode-private-key`` on the SuperNode): only
  registered SuperNodes may join and pull or push messages; each request is signed, so a node cannot be
  impersonated or its requests replayed.  Flower needs TLS for it.
* Neither restricts the Control API (starting or stopping runs): open-source Flower has no account
  authentication for it, so whoever reaches the SuperLink's port can use it.  Keep ``host`` on loopback,
  or behind a firewall, unless the machine's other users and network are trusted.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..core.files import write_bytes

VALID_DAYS = 7


def _write_private(path: Path, data: bytes) -> Path:
    """Owner-only, and never through a symlink planted at ``path`` (which would hand the key to its target)."""
    return write_bytes(path, data, mode=0o600)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def tls_certificates(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A fresh CA and a SuperLink certificate signed by it, valid for ``hosts`` (plus localhost and 127.0.0.1).

    Returns ``(ca.crt, server.pem, server.key)``; the CA's key is not kept, so it can sign nothing else.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorakit federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys(["127.0.0.1", "localhost", *hosts]))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    ca_path, cert_path = directory / "ca.crt", directory / "server.pem"
    write_bytes(ca_path, ca.public_bytes(serialization.Encoding.PEM))
    write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    key_path = _write_private(directory / "server.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, as Flower's SuperNode authentication reads them:
    ``(private key, public key)``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write_private(directory / name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = directory / f"{name}.pub"
    write_bytes(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH))
    return private, public
