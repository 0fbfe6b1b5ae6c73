"""The sandbox control plane's key material: one CA, the API server's serving certificate, an
admin client certificate, one client certificate per Kubernetes component (controller manager,
scheduler, kube-proxy: `COMPONENT_USERS`) and the ServiceAccount token signing key.

`controlplane.ControlPlane` calls `write_pki()` once per work directory. Everything is generated
fresh (ECDSA P-256, fast to make) and lives only as long as the sandbox does; nothing here is fit
for a production cluster.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)
# The addresses a client uses to reach the API server: loopback, and the first address of the
# service CIDR (the `kubernetes` Service), plus the usual in-cluster names.
SERVING_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)

# The user each component authenticates as: the API server's bootstrap RBAC policy binds these
# names to their roles (system:kube-controller-manager, system:kube-scheduler, and
# system:node-proxier for system:kube-proxy).
COMPONENT_USERS = {
    "kube-controller-manager": "system:kube-controller-manager",
    "kube-scheduler": "system:kube-scheduler",
    "kube-proxy": "system:kube-proxy",
}


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PkiPaths:
    """PEM files written by `write_pki()`, one attribute per file."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_signing_key: Path
    sa_public_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> PkiPaths:
        """Where `write_pki(directory, ...)` puts each file."""
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            serving_cert=directory / "apiserver.crt",
            serving_key=directory / "apiserver.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            sa_signing_key=directory / "sa.key",
            sa_public_key=directory / "sa.pub",
        )

    def component(self, name: str) -> ClientCert:
        """Where `write_pki` puts the client certificate of component `name` (a key of
        COMPONENT_USERS)."""
        if name not in COMPONENT_USERS:
            raise ValueError(f"component {name!r} must be one of {sorted(COMPONENT_USERS)}")
        directory = self.ca_cert.parent
        return ClientCert(directory / f"{name}.crt", directory / f"{name}.key")


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _new_ca() -> _Issuer:
    key = _new_key()
    name = _name("stockade-sandbox-ca")
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _issue(
    ca: _Issuer,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> _Issuer:
    key = _new_key()
    builder = (
        _builder(subject, ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _Issuer(builder.sign(ca.key, hashes.SHA256()), key)


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (a key, a kubeconfig holding one)."""
    _create(path, data, 0o600)


def _create(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` by a new file created with `mode`, so that its content is never readable
    by anyone the mode excludes: no write-then-chmod window, and an existing file (with whatever
    mode it had) is unlinked rather than written through. The fchmod only undoes the umask."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)
        file.write(data)


def _write(path: Path, data: bytes, private: bool) -> None:
    _create(path, data, 0o600 if private else 0o644)


def write_pki(directory: Path, service_ip: str) -> PkiPaths:
    """Generate the sandbox's key material into `directory` and return where each file is.

    `service_ip` is the ClusterIP of the `kubernetes` Service, added to the serving certificate
    so that in-cluster clients can verify the API server.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = PkiPaths.in_dir(directory)
    ca = _new_ca()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVING_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1", service_ip)]
    serving = _issue(ca, _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, sans)
    # O=system:masters is bound to cluster-admin by the API server's bootstrap RBAC policy.
    admin = _issue(
        ca, _name("stockade-admin", ("system:masters",)), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    components = {
        name: _issue(ca, _name(user), ExtendedKeyUsageOID.CLIENT_AUTH)
        for name, user in COMPONENT_USERS.items()
    }
    sa_key = _new_key()

    _write(paths.ca_cert, _cert_pem(ca.cert), private=False)
    _write(paths.ca_key, _key_pem(ca.key), private=True)
    _write(paths.serving_cert, _cert_pem(serving.cert) + _cert_pem(ca.cert), private=False)
    _write(paths.serving_key, _key_pem(serving.key), private=True)
    _write(paths.admin_cert, _cert_pem(admin.cert), private=False)
    _write(paths.admin_key, _key_pem(admin.key), private=True)
    for name, issued in components.items():
        where = paths.component(name)
        _write(where.cert, _cert_pem(issued.cert), private=False)
        _write(where.key, _key_pem(issued.key), private=True)
    _write(paths.sa_signing_key, _key_pem(sa_key), private=True)
    _write(
        paths.sa_public_key,
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        private=False,
    )
    return paths
