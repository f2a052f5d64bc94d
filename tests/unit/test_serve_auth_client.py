"""API keys (hashes from the environment or a file), the Python client and `rayline predict`
against a stub HTTP server on 127.0.0.1 (no Ray)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayline.serve.auth import ApiKey, KeyConfigError, KeyRing, hash_key, load_keys, main
from rayline.serve.client import Client, ServeError
from rayline.serve.config import AuthArgs

# -- keys ----------------------------------------------------------------------------------------


def test_keyring_identifies_by_hash_only():
    ring = KeyRing([ApiKey("a", hash_key("k1"), ("m1",)), ApiKey("b", hash_key("k2"))])
    assert ring.identify("Bearer k1").id == "a"
    assert ring.identify("bearer   k2 ").id == "b"
    for header in (None, "", "Bearer", "Bearer ", "Basic k1", "k1", "Bearer k3", "Bearer \udcff"):
        assert ring.identify(header) is None
    assert ring.identify("Bearer k1").allows("m1")
    assert not ring.identify("Bearer k1").allows("m2")
    assert ring.identify("Bearer k2").allows("anything")


def test_load_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - id: file-key\n    sha256: {hash_key('f')}\n    models: [m]\n")
    env = {"K": json.dumps([{"id": "env-key", "sha256": hash_key("e").upper()}])}
    ring = load_keys(AuthArgs(enabled=True, keys_env="K", keys_file=str(f)), env)
    assert [k.id for k in ring.keys] == ["file-key", "env-key"]
    assert ring.identify("Bearer e").models == ("*",)
    assert load_keys(AuthArgs(enabled=False), env) is None


H1, H2 = hash_key("one"), hash_key("two")


@pytest.mark.parametrize(
    "text, message",
    [
        ("keys: 3", "expected a list"),
        ("[{id: a}]", "sha256 must be a string of 64 hex digits"),
        ("[{id: a, sha256: 1234}]", "quote it in YAML"),
        ("[{id: a, sha256: my-secret-key}]", "never the key itself"),
        (f"[{{sha256: {H1}}}]", "needs an id"),
        (f"[{{id: a, sha256: {H1}, model: [x]}}]", "unknown field"),
        (f"[{{id: a, sha256: {H1}}}, {{id: a, sha256: {H2}}}]", "more than once"),
        ("{[", "not YAML or JSON"),
    ],
)
def test_bad_key_entries_are_named_but_never_echoed(text, message):
    with pytest.raises(KeyConfigError, match=message) as e:
        load_keys(AuthArgs(enabled=True, keys_env="K"), {"K": text})
    assert "my-secret-key" not in str(e.value)


def test_enabled_auth_without_keys_fails(tmp_path):
    with pytest.raises(KeyConfigError, match="no API key is configured"):
        load_keys(AuthArgs(enabled=True, keys_env="K"), {})
    with pytest.raises(KeyConfigError, match="keys_file .*missing.yaml"):
        load_keys(AuthArgs(enabled=True, keys_file=str(tmp_path / "missing.yaml")), {})


def test_new_key_prints_a_key_and_its_entry(capsys):
    assert main(["new-key", "--id", "ci", "--models", "a,b", "--json"]) == 0
    out, err = capsys.readouterr()
    key = err.split(": ")[-1].strip()
    entry = json.loads(out)
    assert entry == {"id": "ci", "sha256": hash_key(key), "models": ["a", "b"]}
    assert key.startswith("rl_") and len(key) > 40 and key not in out


# -- client and CLI against a stub endpoint ------------------------------------------------------


class Stub(BaseHTTPRequestHandler):
    calls: list = []
    fail_first_with_503 = 0

    def log_message(self, *a):  # quiet
        pass

    def _send(self, status, doc, headers=None):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Stub.calls.append((self.path, self.headers.get("Authorization"), body))
        if Stub.fail_first_with_503:
            Stub.fail_first_with_503 -= 1
            return self._send(503, {"detail": "restarting"}, {"Retry-After": "0"})
        if self.headers.get("Authorization") != "Bearer k":
            return self._send(401, {"detail": "missing or unknown API key"})
        rows = json.loads(body)
        rows = rows if isinstance(rows, list) else [rows]
        if any("x" not in r for r in rows):
            detail = [
                {"row": i, "field": "x", "type": "missing", "msg": "input 'x' is missing"}
                for i, r in enumerate(rows)
                if "x" not in r
            ]
            return self._send(422, {"detail": detail})
        preds = [
            {"model": "m", "version": 7, "prediction": "yes", "probability": 0.9} for _ in rows
        ]
        return self._send(200, {"model": "m", "version": 7, "predictions": preds})

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"models": [{"name": "m"}]})
        return self._send(404, {"detail": "no"})


@pytest.fixture
def endpoint():
    Stub.calls = []
    Stub.fail_first_with_503 = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_predict_and_errors(endpoint):
    c = Client(endpoint, api_key="k", retries=1)
    assert "k" not in repr(c).replace("api_key", "")
    answer = c.predict("m", {"x": 1})
    assert answer["version"] == 7
    path, auth, body = Stub.calls[-1]
    assert path == "/v1/models/m/predict" and auth == "Bearer k" and json.loads(body) == {"x": 1}
    with pytest.raises(ServeError) as e:
        c.predict("m", [{"x": 1}, {"y": 2}])
    assert e.value.status == 422 and e.value.detail[0]["row"] == 1
    assert "row 1 x: input 'x' is missing" in str(e.value)
    with pytest.raises(ServeError, match="HTTP 401"):
        Client(endpoint).predict("m", {"x": 1})
    assert c.models() == [{"name": "m"}]


def test_client_retries_a_503(endpoint):
    Stub.fail_first_with_503 = 1
    assert Client(endpoint, api_key="k", retries=1).predict("m", {"x": 1})["version"] == 7
    assert len(Stub.calls) == 2


def test_client_unreachable():
    with pytest.raises(ServeError, match="cannot reach") as e:
        Client("http://127.0.0.1:9", retries=0, timeout=2).predict("m", {"x": 1})
    assert e.value.status == 0


def test_rayline_predict_cli(endpoint, monkeypatch, capsys, tmp_path):
    from rayline.cli import main as cli

    monkeypatch.setenv("RAYLINE_API_KEY", "k")
    assert cli(["predict", "m", '[{"x": 1}, {"x": 2}]', "--url", endpoint]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["0\tm@7\tyes  p=0.9000", "1\tm@7\tyes  p=0.9000"]
    rows = tmp_path / "rows.json"
    rows.write_text('{"x": 1}')
    assert cli(["predict", "m", "--file", str(rows), "--url", endpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 7
    assert cli(["predict", "m", '{"y": 1}', "--url", endpoint]) == 1
    assert "HTTP 422" in capsys.readouterr().err
    assert cli(["predict", "m", "{nope", "--url", endpoint]) == 2
    monkeypatch.delenv("RAYLINE_API_KEY")
    assert cli(["predict", "m", '{"x": 1}', "--url", endpoint]) == 1
    assert "HTTP 401" in capsys.readouterr().err
