"""Mutual TLS for the sidecars' peer API.

Sidecars authenticate each other with certificates signed by one CA. In a cluster the
certificates come from a Secret mounted as a directory holding the usual three files of a
``kubernetes.io/tls`` Secret plus the CA (``ca.crt``, ``tls.crt``, ``tls.key``); when the pool
names no Secret, the operator generates a self-signed CA and one certificate for the pool's
sidecars with :func:`generate_bundle` and stores it as that Secret.

Both ends require the peer's certificate to chain to the CA: the server refuses a client
that presents no certificate or one from another CA (``require_client_auth=True``), and the
client refuses a server whose certificate is not from the CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"

#: The name every sidecar certificate carries; channels ask for it, so sidecars can be
#: reached by pod IP without one certificate per pod.
PEER_NAME = "kvpool-sidecar"


class TLSConfigError(ValueError):
    """The certificate files are missing, unreadable or do not belong together."""


@dataclass(frozen=True)
class TLSBundle:
    """PEM bytes of the CA certificate and of this sidecar's certificate and private key."""

    ca_cert: bytes
    cert: bytes
    key: bytes

    def write(self, directory: str | Path) -> Path:
        """Write the three files as a mounted Secret lays them out; the key is mode 0600."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_FILE).write_bytes(self.ca_cert)
        (directory / CERT_FILE).write_bytes(self.cert)
        key_path = directory / KEY_FILE
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key)
        return directory

    def secret_data(self) -> dict[str, bytes]:
        """The bundle as the ``data`` of a Kubernetes Secret (before base64)."""
        return {CA_FILE: self.ca_cert, CERT_FILE: self.cert, KEY_FILE: self.key}


def load_bundle(directory: str | Path) -> TLSBundle:
    """Read ``ca.crt``, ``tls.crt`` and ``tls.key`` from a mounted Secret's directory.

    Raises TLSConfigError naming the file when one is missing or not PEM, or when the
    certificate is not signed by the CA.
    """
    directory = Path(directory)
    parts: dict[str, bytes] = {}
    for name in (CA_FILE, CERT_FILE, KEY_FILE):
        path = directory / name
        try:
            parts[name] = path.read_bytes()
        except OSError as exc:
            raise TLSConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        ca = x509.load_pem_x509_certificate(parts[CA_FILE])
        cert = x509.load_pem_x509_certificate(parts[CERT_FILE])
    except ValueError as exc:
        raise TLSConfigError(f"{directory}: not a PEM certificate: {exc}") from exc
    try:
        serialization.load_pem_private_key(parts[KEY_FILE], password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"{directory / KEY_FILE}: not an unencrypted PEM key: {exc}") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TLSConfigError(f"{directory / CERT_FILE} is not signed by {CA_FILE}") from exc
    return TLSBundle(ca_cert=parts[CA_FILE], cert=parts[CERT_FILE], key=parts[KEY_FILE])


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvpool"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_ca(common_name: str = "kvpool CA", *, days: int = 365) -> tuple[bytes, bytes]:
    """A fresh self-signed CA: (certificate PEM, private key PEM). ECDSA P-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_cert(
    ca_cert: bytes,
    ca_key: bytes,
    names: tuple[str, ...] = (PEER_NAME, "localhost", "127.0.0.1"),
    *,
    days: int = 365,
) -> tuple[bytes, bytes]:
    """A certificate signed by the CA, valid as TLS server and client: (cert PEM, key PEM).

    ``names`` become subject alternative names (IP addresses where they parse as one).
    """
    if not names:
        raise TLSConfigError("a certificate needs at least one name")
    ca = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise TLSConfigError("the CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def generate_bundle(
    names: tuple[str, ...] = (PEER_NAME, "localhost", "127.0.0.1"), *, days: int = 365
) -> TLSBundle:
    """A new CA and one certificate for all sidecars of a pool (what the operator stores)."""
    ca_cert, ca_key = generate_ca(days=days)
    cert, key = issue_cert(ca_cert, ca_key, names, days=days)
    return TLSBundle(ca_cert=ca_cert, cert=cert, key=key)


def server_credentials(bundle: TLSBundle) -> grpc.ServerCredentials:
    """Server side of the peer API: presents the sidecar certificate, demands the client's."""
    return grpc.ssl_server_credentials(
        [(bundle.key, bundle.cert)],
        root_certificates=bundle.ca_cert,
        require_client_auth=True,
    )


def channel_credentials(bundle: TLSBundle) -> grpc.ChannelCredentials:
    """Client side: trusts only the CA and presents the sidecar certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=bundle.ca_cert,
        private_key=bundle.key,
        certificate_chain=bundle.cert,
    )


def channel_options(server_name: str = PEER_NAME) -> list[tuple[str, str]]:
    """gRPC channel options that check the server's certificate for ``server_name``
    (sidecars dial pod IPs, the certificate names the role)."""
    return [("grpc.ssl_target_name_override", server_name)]


def secure_channel(target: str, bundle: TLSBundle, options: list | None = None) -> grpc.Channel:
    """A synchronous mTLS channel to a peer sidecar."""
    return grpc.secure_channel(
        target, channel_credentials(bundle), options=channel_options() + list(options or [])
    )
