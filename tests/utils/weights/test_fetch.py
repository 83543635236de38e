"""utils/weights/fetch.py + resolve.py + registry.py: released weights by name, served from a local
http.server on 127.0.0.1 (the registry's URL monkeypatched; nothing comes from the internet)."""
import dataclasses
import functools
import hashlib
import http.server
import io
import os
import socket
import threading

import pytest
import torch

from backbones import get_model
from utils.weights import registry
from utils.weights.fetch import WeightsUnavailable, cached_path, fetch
from utils.weights.resolve import resolve_init_backbone, resolve_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test output stays readable
        pass


class ShortHandler(QuietHandler):
    """Announces more bytes than it sends, then closes: a transfer cut off."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"x" * 1000)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A tiny's state_dict served over HTTP, registered as 'facenet:test', the cache in tmp_path."""
    folder = tmp_path / "www"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(get_model("tiny", num_features=16).state_dict(), folder / "test.pt")
    servers = []

    def serve(handler=QuietHandler) -> int:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    port = serve()
    entry = dataclasses.replace(registry.REGISTRY["facenet:vggface2"], name="facenet:test", network="tiny",
                                embedding_size=16, file_name="test.pt", url=f"http://127.0.0.1:{port}/test.pt")
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    monkeypatch.setenv("ARCSCALE_CACHE", str(tmp_path / "cache"))
    data = (folder / "test.pt").read_bytes()
    yield {"entry": entry, "bytes": data, "sha256": hashlib.sha256(data).hexdigest(), "serve": serve,
           "cache": tmp_path / "cache"}
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def test_a_download_lands_whole_with_its_sha256_recorded_then_comes_from_the_cache(served):
    log = io.StringIO()
    path = resolve_weights("facenet:test", log=log)
    assert path == str(served["cache"] / "facenet" / "test" / "test.pt") == cached_path(served["entry"])
    with open(path, "rb") as handle:
        assert handle.read() == served["bytes"]
    assert open(path + ".sha256").read().split()[0] == served["sha256"]
    assert "downloading facenet:test: " in log.getvalue() and "(100%)" in log.getvalue()
    assert f"facenet:test: sha256 {served['sha256']} (not published: recorded in {path}.sha256)" in log.getvalue()
    assert sorted(os.listdir(os.path.dirname(path))) == ["test.pt", "test.pt.sha256"]  # no temporary left
    # The cache answers now, with the server gone (an unreachable URL would fail).
    registry.REGISTRY["facenet:test"] = dataclasses.replace(served["entry"], url=f"http://127.0.0.1:{closed_port()}/x")
    assert resolve_weights("facenet:test", log=io.StringIO()) == path
    assert torch.load(path, weights_only=True).keys() == get_model("tiny", num_features=16).state_dict().keys()


def test_a_published_sha256_is_verified_and_a_mismatch_keeps_nothing(served):
    registry.REGISTRY["facenet:test"] = dataclasses.replace(served["entry"], sha256=served["sha256"])
    log = io.StringIO()
    path = fetch(registry.REGISTRY["facenet:test"], log)
    assert f"facenet:test: sha256 verified ({served['sha256']})" in log.getvalue()
    os.remove(path)
    registry.REGISTRY["facenet:test"] = dataclasses.replace(served["entry"], sha256="0" * 64)
    with pytest.raises(WeightsUnavailable) as caught:
        fetch(registry.REGISTRY["facenet:test"], io.StringIO())
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"facenet:test: cannot download {served['entry'].url} (sha256 {served['sha256'][:16]}"
                              f"... differs from the registry's 0000000000000000...; the file was not kept)")
    assert message.endswith(f"download it by hand and place it at {path}")
    assert os.listdir(os.path.dirname(path)) == []


def test_offline_is_one_line_naming_the_url_and_the_exact_path(served):
    url = f"http://127.0.0.1:{closed_port()}/test.pt"
    registry.REGISTRY["facenet:test"] = dataclasses.replace(served["entry"], url=url)
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_weights("facenet:test", log=io.StringIO())
    target = served["cache"] / "facenet" / "test" / "test.pt"
    assert str(caught.value) == (f"facenet:test: cannot download {url} ([Errno 111] Connection refused); download it "
                                 f"by hand and place it at {target}")
    assert not target.exists() and os.listdir(target.parent) == []


def test_a_transfer_cut_off_is_refused(served):
    port = served["serve"](ShortHandler)
    registry.REGISTRY["facenet:test"] = dataclasses.replace(served["entry"], url=f"http://127.0.0.1:{port}/test.pt")
    with pytest.raises(WeightsUnavailable, match=r"^facenet:test: cannot download http://127\.0\.0\.1:\d+/test\.pt "
                                                 r"\(.*\); download it by hand and place it at .*test\.pt$"):
        fetch(registry.REGISTRY["facenet:test"], io.StringIO())
    assert os.listdir(served["cache"] / "facenet" / "test") == []


def test_a_truncated_cached_file_is_refused_and_never_loaded(served, tmp_path, capsys):
    path = resolve_weights("facenet:test", log=io.StringIO())
    with open(path, "r+b") as handle:
        handle.truncate(len(served["bytes"]) // 2)
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_weights("facenet:test", log=io.StringIO())
    assert str(caught.value).startswith(f"{path}: cached facenet:test has sha256 ")
    assert str(caught.value).endswith("(truncated or corrupt); not loaded: delete it and fetch again "
                                      "(python tools/weights.py fetch facenet:test)")
    import train
    from tests.test_train import write_config

    config = write_config(tmp_path, network="tiny", embedding_size=16, init_backbone="facenet:test")
    assert train.main([config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: cached facenet:test has sha256 ")


def test_a_zoo_file_is_placed_by_hand_at_the_path_the_error_names(served, tmp_path):
    entry = registry.REGISTRY["insightface:ms1mv3_r50"]
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_weights(entry.name, log=io.StringIO())
    target = cached_path(entry)
    assert target == str(served["cache"] / "insightface" / "ms1mv3_r50" / "backbone.pth")
    assert str(caught.value).startswith("insightface:ms1mv3_r50: not in the cache and not downloadable by a script: "
                                        "get backbone.pth from https://github.com/deepinsight/insightface")
    assert str(caught.value).endswith(f", and place it at {target}")
    os.makedirs(os.path.dirname(target))
    with open(target, "wb") as handle:
        handle.write(served["bytes"])
    log = io.StringIO()
    assert resolve_weights(entry.name, log=log) == target
    assert f"sha256 {served['sha256']} recorded in {target}.sha256" in log.getvalue()
    with open(target, "ab") as handle:
        handle.write(b"garbage")
    with pytest.raises(WeightsUnavailable, match="truncated or corrupt"):
        resolve_weights(entry.name, log=io.StringIO())


def test_names_and_networks_are_checked_before_anything_is_fetched(served):
    with pytest.raises(Exception, match=r"^config key 'init_backbone': 'facenet:vggface3' is not a registered name; "
                                        r"facenet has facenet:vggface2, facenet:casia-webface, facenet:test$"):
        resolve_weights("facenet:vggface3")
    with pytest.raises(Exception, match=r"^config key 'init_backbone': facenet:vggface2 is network "
                                        r"'inception_resnet_v1' \(embedding size 512\), the config's network is 'r50': "
                                        r"set network='inception_resnet_v1'$"):
        resolve_init_backbone("facenet:vggface2", "r50")
    assert not (served["cache"] / "facenet" / "vggface2").exists()


def test_every_registered_network_exists_and_takes_the_registered_input():
    from backbones import MODEL_NAMES, input_spec

    assert {"facenet:vggface2", "facenet:casia-webface", "insightface:ms1mv3_r50", "insightface:glint360k_r100",
            "insightface:wf42m_pfc02_r100"} <= set(registry.REGISTRY)
    for entry in registry.REGISTRY.values():
        assert entry.network in MODEL_NAMES, entry.name
        with torch.device("meta"):
            size = input_spec(get_model(entry.network)).image_size
        assert entry.input.startswith(f"{size[0]}x{size[1]} RGB"), entry.name
        assert entry.downloadable == entry.name.startswith("facenet:")


class CountingSlowHandler(QuietHandler):
    """Counts GETs in a file beside the served folder and sends slowly: two fetchers overlap for sure."""

    def do_GET(self) -> None:
        count = os.path.join(os.path.dirname(self.directory), "gets")
        with open(count, "a") as handle:
            handle.write("GET\n")
        import time

        time.sleep(1.0)
        super().do_GET()


def _resolve_on_rank(rank, world_size, entry, cache):
    import torch.distributed as dist

    from utils.weights import registry as ranks_registry
    from utils.weights.resolve import resolve_init_backbone as resolve

    os.environ["ARCSCALE_CACHE"] = cache
    ranks_registry.REGISTRY[entry.name] = entry
    dist.barrier()  # both ranks resolve at the same moment, as torchrun's ranks do at start
    path = resolve(entry.name, "tiny", log=io.StringIO())
    with open(path, "rb") as handle:
        return path, hashlib.sha256(handle.read()).hexdigest()


def test_two_ranks_resolving_at_once_download_the_file_once(served, port):
    from tests.spawn_helpers import run_ranks

    slow = served["serve"](CountingSlowHandler)
    entry = dataclasses.replace(served["entry"], url=f"http://127.0.0.1:{slow}/test.pt")
    results = run_ranks(_resolve_on_rank, 2, port, entry, str(served["cache"]), timeout=120)
    assert results[0] == results[1] == (cached_path(entry), served["sha256"])
    gets = served["cache"].parent / "gets"
    assert gets.read_text().count("GET") == 1
