"""The local clusters' certificates carry the identities RBAC will see."""

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgellm.dev.pki import CertificateAuthority


def test_a_client_certificate_names_the_user_and_groups_and_is_signed_by_the_ca() -> None:
    ca = CertificateAuthority("test-ca")
    pair = ca.issue("alice", ("devs", "ops"))
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.pair.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    groups = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert groups == ["devs", "ops"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_serving_certificate_lists_its_addresses() -> None:
    ca = CertificateAuthority("test-ca")
    cert = x509.load_pem_x509_certificate(
        ca.issue("server", server_names=("127.0.0.1", "localhost")).cert_pem
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
