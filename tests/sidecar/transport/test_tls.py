"""mTLS for the peer API: certificates from files, generated bundles, a real gRPC server."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from kvpool.sidecar import tls

_METHOD = "/kvpool.test.Echo/Echo"


def _echo_server(credentials: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "kvpool.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _call(channel: grpc.Channel) -> bytes:
    echo = channel.unary_unary(_METHOD)
    return echo(b"ping", timeout=5)


@pytest.fixture(scope="module")
def bundle() -> tls.TLSBundle:
    return tls.generate_bundle()


@pytest.fixture
def server(bundle):
    srv, port = _echo_server(tls.server_credentials(bundle))
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


def test_bundle_round_trips_through_secret_files(bundle, tmp_path):
    bundle.write(tmp_path / "secret")
    assert (tmp_path / "secret" / tls.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert tls.load_bundle(tmp_path / "secret") == bundle
    assert set(bundle.secret_data()) == {"ca.crt", "tls.crt", "tls.key"}


def test_load_bundle_names_the_missing_file(tmp_path):
    with pytest.raises(tls.TLSConfigError, match="ca.crt"):
        tls.load_bundle(tmp_path)


def test_load_bundle_refuses_a_cert_from_another_ca(bundle, tmp_path):
    other = tls.generate_bundle()
    tls.TLSBundle(ca_cert=bundle.ca_cert, cert=other.cert, key=other.key).write(tmp_path)
    with pytest.raises(tls.TLSConfigError, match="not signed"):
        tls.load_bundle(tmp_path)


def test_load_bundle_refuses_garbage(bundle, tmp_path):
    bundle.write(tmp_path)
    (tmp_path / tls.CERT_FILE).write_bytes(b"not a certificate")
    with pytest.raises(tls.TLSConfigError, match="PEM"):
        tls.load_bundle(tmp_path)


def test_peer_with_the_ca_cert_is_served(bundle, server):
    with tls.secure_channel(server, bundle) as channel:
        assert _call(channel) == b"ping"


def test_peer_from_another_ca_is_refused(server):
    stranger = tls.generate_bundle()
    with tls.secure_channel(server, stranger) as channel, pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_peer_that_trusts_the_ca_but_has_no_cert_of_it_is_refused(bundle, server):
    """The server demands a client certificate signed by the CA (mutual TLS)."""
    stranger = tls.generate_bundle()
    impostor = tls.TLSBundle(ca_cert=bundle.ca_cert, cert=stranger.cert, key=stranger.key)
    with tls.secure_channel(server, impostor) as channel, pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=bundle.ca_cert)
    with grpc.secure_channel(server, creds, options=tls.channel_options()) as channel, \
            pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_peer_is_refused(server):
    with grpc.insecure_channel(server) as channel, pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
