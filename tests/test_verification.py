"""Verification metrics (insightface parity), restricted .bin loading, the callback and the CLI."""
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from eval import metrics
from eval.embed import gather_shards
from eval.verification import (VerificationCallback, VerificationError, format_lines, load_bin, read_bin)
from tests.spawn_helpers import run_ranks
from utils.devices.distributed import shard_bounds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- reference (per-threshold loops)

def reference_evaluate(embeddings, issame):
    """insightface's algorithm written as plain loops with sklearn's KFold and scipy's BSpline."""
    from scipy.interpolate import BSpline
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import normalize

    embeddings = normalize(np.asarray(embeddings, dtype=np.float64))
    dist_all = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)
    issame = np.asarray(issame)
    folds = list(KFold(n_splits=10, shuffle=False).split(np.arange(len(issame))))

    def accuracy(threshold, d, same):
        predict = d < threshold
        return float(np.sum(predict & same) + np.sum(~predict & ~same)) / d.size

    accs = []
    for train, test in folds:
        thresholds = np.arange(0, 4, 0.01)
        train_acc = [accuracy(t, dist_all[train], issame[train]) for t in thresholds]
        accs.append(accuracy(thresholds[int(np.argmax(train_acc))], dist_all[test], issame[test]))
    vals = []
    for train, test in folds:
        thresholds = np.arange(0, 4, 0.001)
        diff = ~issame[train]
        far_train = np.array([np.sum((dist_all[train] < t) & diff) / float(np.sum(diff)) for t in thresholds])
        if far_train.max() >= 1e-3:
            # scipy<=1.8 interp1d(kind='slinear') == degree-1 BSpline with knots [x0, x..., xlast], coefficients y
            spline = BSpline(np.r_[far_train[0], far_train, far_train[-1]], thresholds, 1)
            threshold = float(spline(1e-3))
        else:
            threshold = 0.0
        accepted = dist_all[test] < threshold
        vals.append(np.sum(accepted & issame[test]) / float(np.sum(issame[test])))
    return np.array(accs), float(np.mean(vals)), float(np.std(vals))


def unit_vectors(angles):
    return np.stack([np.cos(angles), np.sin(angles)], 1)


# ----------------------------------------------------------------------------- metrics

def test_kfold_matches_sklearn():
    from sklearn.model_selection import KFold
    for n in (10, 57, 300, 6000):
        ours = metrics.kfold_splits(n, 10)
        theirs = list(KFold(n_splits=10, shuffle=False).split(np.arange(n)))
        assert len(ours) == 10
        for (a_train, a_test), (b_train, b_test) in zip(ours, theirs):
            assert np.array_equal(a_train, b_train) and np.array_equal(a_test, b_test)


def test_l2_normalize_matches_sklearn():
    from sklearn.preprocessing import normalize
    x = np.random.default_rng(0).normal(size=(50, 16))
    x[3] = 0.0
    assert np.array_equal(metrics.l2_normalize(x), normalize(x))


def test_hand_checkable_accuracy_and_xnorm():
    """100 pairs, 10 folds of 10 (5 genuine then 5 impostors). Genuine pairs sit at squared distance 0.5,
    impostors at 3.0, except fold f holds f % 3 impostors at 0.2, which every threshold that keeps the
    genuine pairs accepts. So fold accuracies are exactly 1 - (f % 3) / 10."""
    angles, issame = [], []
    for fold in range(10):
        for pair in range(10):
            genuine = pair < 5
            if genuine:
                gap = np.arccos(0.75)           # 2 - 2cos = 0.5
            elif pair - 5 < fold % 3:
                gap = np.arccos(0.9)            # 2 - 2cos = 0.2: a false accept
            else:
                gap = np.arccos(-0.5)           # 2 - 2cos = 3.0
            base = 0.1 * (fold * 10 + pair)
            angles += [base, base + gap]
            issame.append(genuine)
    unit = unit_vectors(np.array(angles))
    result = metrics.verification_metrics(2.0 * unit, 4.0 * unit, issame)
    expected = np.array([1 - (fold % 3) / 10 for fold in range(10)])
    assert np.allclose(result.flip.fold_accuracy, expected, rtol=0, atol=1e-15)
    assert result.flip.accuracy == pytest.approx(0.91, abs=1e-12)
    assert result.flip.accuracy_std == pytest.approx(float(np.std(expected)), abs=1e-12)
    assert result.plain.accuracy == pytest.approx(0.91, abs=1e-12)
    # the first threshold of arange(0, 4, 0.01) above 0.5 wins on every train split
    assert np.allclose(result.flip.best_thresholds, 0.51)
    assert result.xnorm == pytest.approx(3.0)  # mean of norm 2 (images) and norm 4 (flips)


@pytest.mark.parametrize("seed,separation", [(0, 1.5), (1, 3.0), (2, 0.5)])
def test_matches_insightface_reference(seed, separation):
    rng = np.random.default_rng(seed)
    num_pairs = 600
    issame = rng.random(num_pairs) < 0.5
    first = rng.normal(size=(num_pairs, 32))
    second = np.where(issame[:, None], first + rng.normal(size=first.shape) / separation, rng.normal(size=first.shape))
    embeddings = np.empty((2 * num_pairs, 32))
    embeddings[0::2], embeddings[1::2] = first, second
    ours = metrics.evaluate(embeddings, issame)
    ref_acc, ref_val, ref_val_std = reference_evaluate(embeddings, issame)
    assert np.array_equal(ours.fold_accuracy, ref_acc)
    assert ours.accuracy == np.mean(ref_acc) and ours.accuracy_std == np.std(ref_acc)
    assert ours.val == ref_val and ours.val_std == ref_val_std


def test_slinear_matches_bspline_with_duplicates():
    from scipy.interpolate import BSpline
    rng = np.random.default_rng(3)
    for _ in range(50):
        x = np.sort(rng.integers(0, 8, size=30)) / 7.0  # many duplicates
        y = np.arange(30) * 0.001
        spline = BSpline(np.r_[x[0], x, x[-1]], y, 1)
        for target in list(np.unique(x)) + list(rng.uniform(x[0], x[-1], size=5)):
            assert metrics.slinear_interpolate(x, y, target) == float(spline(target))


def test_val_threshold_zero_when_far_never_reached():
    # impostors far apart: FAR on train never reaches 1e-3 below 4, so insightface uses threshold 0
    issame = np.array([True, False] * 50)
    dist_values = np.where(issame, 0.1, 4.5)
    val, val_std, far = metrics.calculate_val(dist_values, issame)
    assert (val, val_std, far) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- .bin loading

def test_load_bin_fixture_formats(insightface_fixtures):
    meta = json.load(open(os.path.join(insightface_fixtures, "pairs.json")))
    images, issame = load_bin(os.path.join(insightface_fixtures, "pairs.bin"))
    assert images.shape == (600, 3, 112, 112) and images.dtype == torch.uint8
    assert issame.tolist() == meta["issame"]
    for index in (0, 1, 317, 599):  # decoded RGB pixels equal mxnet's
        digest = hashlib.sha256(images[index].permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()
        assert digest == meta["images"][index]["mx_decoded_rgb_sha256"]
    for variant in ("pairs_py2.bin", "pairs_ndarray.bin"):
        sub_images, sub_issame = load_bin(os.path.join(insightface_fixtures, variant))
        count = meta["variants_cover_first_pairs"]
        assert torch.equal(sub_images, images[: 2 * count])
        assert sub_issame.tolist() == meta["issame"][:count]


def test_load_bin_resizes(tmp_path, insightface_fixtures):
    import cv2
    images, _ = read_bin(os.path.join(insightface_fixtures, "pairs_py2.bin"))
    big = [cv2.imencode(".png", cv2.resize(cv2.imdecode(np.frombuffer(b, np.uint8), 1), (150, 150)))[1].tobytes()
           for b in images[:4]]
    path = tmp_path / "big.bin"
    path.write_bytes(pickle.dumps((big, [True, False])))
    decoded, _ = load_bin(str(path), (112, 112))
    assert decoded.shape == (4, 3, 112, 112)


class _RunsShell:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsShell()
    payload.marker = marker
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload, b"x"], [True])))
    with pytest.raises(VerificationError, match=r"evil\.bin: not a verification \.bin: refused global '(posix|os|nt)\.system'"):
        load_bin(str(path))
    assert not marker.exists()


def test_float_array_is_refused(tmp_path):
    path = tmp_path / "floats.bin"
    path.write_bytes(pickle.dumps(([np.zeros(4, np.float32), np.zeros(4, np.float32)], [True])))
    with pytest.raises(VerificationError, match=r"floats\.bin: not a verification \.bin: numpy dtype 'f4'"):
        load_bin(str(path))
    path.write_bytes(pickle.dumps(([np.zeros(4, np.float32), np.zeros(4, np.float32)], [True]), protocol=2))
    with pytest.raises(VerificationError, match=r"floats\.bin: not a verification \.bin: numpy dtype"):
        load_bin(str(path))


@pytest.mark.parametrize("content,message", [
    (([b"a", b"b", b"c"], [True]), r"issame list has 1 pairs, which need 2 images, but the file holds 3 images"),
    (([b"a", 7], [True]), r"image 1 is a int, expected encoded image bytes"),
    (([b"a", b"b"], ["yes"]), r"issame entry 0 is 'yes', expected a bool"),
    ({"images": []}, r"expected a pickled \(images, issame_list\) pair, found dict"),
    (([], []), r"holds no pairs"),
])
def test_bad_bin_structure(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(VerificationError, match=r"bad\.bin: " + message):
        read_bin(str(path))


def test_non_image_entry_names_index(tmp_path, insightface_fixtures):
    images, issame = read_bin(os.path.join(insightface_fixtures, "pairs_py2.bin"))
    images[5] = b"this is not a jpeg"
    path = tmp_path / "broken.bin"
    path.write_bytes(pickle.dumps((images, issame.tolist())))
    with pytest.raises(VerificationError, match=r"broken\.bin: image 5 \(pair 2\) is not a decodable image"):
        load_bin(str(path))


def test_missing_and_truncated_files(tmp_path, insightface_fixtures):
    with pytest.raises(VerificationError, match=r"nope\.bin: verification file not found"):
        load_bin(str(tmp_path / "nope.bin"))
    data = open(os.path.join(insightface_fixtures, "pairs.bin"), "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[:5000])
    with pytest.raises(VerificationError, match=r"cut\.bin: not a readable pickle \(\w+Error"):
        load_bin(str(tmp_path / "cut.bin"))


# ----------------------------------------------------------------------------- callback

class TinyNet(nn.Module):
    """Small deterministic embedding network (BatchNorm makes eval() matter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.BatchNorm2d(8), nn.PReLU(8),
                                      nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(128, 16)
        self.features[1].running_mean.uniform_(-0.1, 0.1)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_callback_single_process(insightface_fixtures, caplog):
    net = TinyNet().train()
    callback = VerificationCallback(["pairs_py2", "pairs"], insightface_fixtures, batch_size=64)
    with caplog.at_level(logging.INFO, logger="eval.verification"):
        results = callback(2000, net, torch.device("cpu"))
    assert net.training  # previous mode restored
    assert set(results) == {f"{t}/{k}" for t in ("pairs_py2", "pairs") for k in ("accuracy_flip", "best", "xnorm")}
    # same numbers as evaluating by hand in eval mode
    images, issame = load_bin(os.path.join(insightface_fixtures, "pairs.bin"))
    with torch.no_grad():
        net.eval()
        x = ((images.float() / 255) - 0.5) / 0.5
        expected = metrics.verification_metrics(net(x).numpy(), net(torch.flip(x, dims=[3])).numpy(), issame)
    assert results["pairs/accuracy_flip"] == pytest.approx(expected.flip.accuracy, abs=1e-9)
    assert results["pairs/xnorm"] == pytest.approx(expected.xnorm, rel=1e-5)
    text = caplog.text
    assert "[pairs][2000]XNorm: " in text
    assert f"[pairs][2000]Accuracy-Flip: {results['pairs/accuracy_flip']:1.5f}+-" in text
    assert "[pairs][2000]Accuracy-Highest: " in text
    # "best" is the highest accuracy seen so far: a model that embeds every image alike (accuracy of
    # always answering one way) after the real one leaves it at the real one's accuracy.
    alike = TinyNet()
    with torch.no_grad():
        alike.fc.weight.zero_()
        alike.fc.bias.fill_(1.0)
    worse = callback(2001, alike, torch.device("cpu"))
    same_fraction = float(np.mean(issame))
    assert worse["pairs/accuracy_flip"] == pytest.approx(max(same_fraction, 1 - same_fraction), abs=1e-9)
    assert worse["pairs/accuracy_flip"] < results["pairs/accuracy_flip"]
    assert worse["pairs/best"] == results["pairs/accuracy_flip"]


def test_callback_missing_target(tmp_path):
    with pytest.raises(VerificationError, match=r"lfw\.bin: verification file not found"):
        VerificationCallback(["lfw"], str(tmp_path))


def _callback_worker(rank, world_size, data_dir):
    callback = VerificationCallback(["pairs_py2"], data_dir, batch_size=8)
    results = callback(7, TinyNet(), torch.device("cpu"))
    # Unequal shards through the padded all_gather: 5 rows split 3+2 (2 ranks) or 2+2+1 (3 ranks);
    # each rank holds its own rows of 10 * row, so the gathered rows must come back in global order.
    start, end = shard_bounds(GATHER_ROWS, world_size)[rank]
    local = (torch.arange(start, end, dtype=torch.float32) * 10)[:, None].repeat(1, 2)
    gathered = gather_shards(local, GATHER_ROWS, torch.device("cpu"))
    return {"results": results, "gathered": gathered.tolist()}


GATHER_ROWS = 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_callback_distributed_matches_single(insightface_fixtures, port, world_size):
    got = run_ranks(_callback_worker, world_size, port, insightface_fixtures, timeout=100)
    single = VerificationCallback(["pairs_py2"], insightface_fixtures, batch_size=8)(7, TinyNet(), torch.device("cpu"))
    for result in got:
        assert result["results"]["pairs_py2/accuracy_flip"] == single["pairs_py2/accuracy_flip"]
        assert result["results"]["pairs_py2/xnorm"] == pytest.approx(single["pairs_py2/xnorm"], rel=1e-6)
        assert result["gathered"] == [[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]]


def test_format_lines():
    unit = unit_vectors(np.linspace(0, 6, 40))
    result = metrics.verification_metrics(unit, unit, [True, False] * 10)
    lines = format_lines("lfw", result)
    assert lines[0].startswith("[lfw]XNorm: 1.000000")
    assert lines[1].startswith("[lfw]Accuracy: ") and "+-" in lines[1]
    assert lines[2].startswith("[lfw]Accuracy-Flip: ")


# ----------------------------------------------------------------------------- command line

def test_cli_help_and_missing_target(tmp_path):
    for command in ([sys.executable, "-m", "eval.verification", "--help"],
                    [sys.executable, os.path.join("eval", "verification.py"), "--help"]):
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--data-dir" in done.stdout
    done = subprocess.run([sys.executable, "-m", "eval.verification", "--model", "m.pt", "--network", "mbf",
                           "--data-dir", str(tmp_path), "--targets", "lfw", "--device", "cpu"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'lfw.bin'}: verification file not found " \
                                                   "(target stems: lfw)"


def test_cli_evaluates_a_model_file(tmp_path, insightface_fixtures, capsys):
    from backbones import get_model
    from eval.verification import main
    torch.manual_seed(0)
    model = get_model("mbf").eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    code = main(["--model", str(tmp_path / "model.pt"), "--network", "mbf", "--data-dir", insightface_fixtures,
                 "--targets", "pairs_py2", "--device", "cpu", "--no-progress", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0
    images, issame = load_bin(os.path.join(insightface_fixtures, "pairs_py2.bin"))
    with torch.no_grad():
        x = ((images.float() / 255) - 0.5) / 0.5
        expected = metrics.verification_metrics(model(x).numpy(), model(torch.flip(x, dims=[3])).numpy(), issame)
    for line in format_lines("pairs_py2", expected):
        assert line.split(":")[0] in out
    assert f"[pairs_py2]Accuracy-Flip: {expected.flip.accuracy:1.5f}+-{expected.flip.accuracy_std:1.5f}" in out
    assert f"[pairs_py2]Accuracy: {expected.plain.accuracy:1.5f}+-" in out
    assert "VAL@FAR=1e-3" in out


def test_cli_reads_the_network_from_the_file_and_table_shows_far(tmp_path, insightface_fixtures, capsys):
    from backbones import get_model
    from eval.verification import main
    from utils.weights.load import describe_backbone_file, guess_network, load_backbone_file
    from utils.run.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save
    torch.manual_seed(0)
    model = get_model("tiny", num_features=40).eval()
    checkpoint = tmp_path / "checkpoint_step000000002.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 2, "epoch": 0,
                 "backbone": model.state_dict(), "config": {"network": "tiny", "embedding_size": 40}}, str(checkpoint))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert describe_backbone_file(str(checkpoint)) == ("tiny", 40)
    assert describe_backbone_file(str(tmp_path / "model.pt")) == ("tiny", 40)  # keys and shapes alone
    assert guess_network(get_model("r18", num_features=64).state_dict()) == "r18"
    with pytest.raises(RuntimeError, match=r"for network 'mbf'.*the file looks like network 'tiny' with "
                                           r"embedding size 40$"):
        load_backbone_file(str(tmp_path / "model.pt"), "mbf")
    os.symlink(os.path.join(insightface_fixtures, "pairs_py2.bin"), tmp_path / "a_rather_long_target_name.bin")
    code = main(["--model", str(checkpoint), "--data-dir", str(tmp_path), "--targets",
                 "a_rather_long_target_name", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    images, issame = load_bin(str(tmp_path / "a_rather_long_target_name.bin"))
    with torch.no_grad():
        x = ((images.float() / 255) - 0.5) / 0.5
        expected = metrics.verification_metrics(model(x).numpy(), model(torch.flip(x, dims=[3])).numpy(), issame)
    header, row = out.splitlines()[-2:]
    assert header.split() == ["target", "pairs", "XNorm", "Accuracy", "Accuracy-Flip", "VAL@FAR=1e-3", "FAR",
                              "reached"]
    assert row.split() == ["a_rather_long_target_name", "20", f"{expected.xnorm:.4f}",
                           f"{expected.plain.accuracy:.5f}+-{expected.plain.accuracy_std:.5f}",
                           f"{expected.flip.accuracy:.5f}+-{expected.flip.accuracy_std:.5f}",
                           f"{expected.flip.val:.5f}", f"{expected.flip.far:.2e}"]
    # Columns line up: every header ends where its values end.
    assert len(header) == len(row) and header.index("pairs") + len("pairs") == row.index(" 20 ") + len(" 20")


def test_table_shows_the_far_a_collapsed_model_reached():
    from eval.verification import format_table
    collapsed = np.ones((80, 8))  # every embedding identical: every pair accepted at any threshold
    result = metrics.verification_metrics(collapsed, collapsed, [True, False] * 20)
    lines = format_table([("lfw", 20, result)])
    assert lines[1].split()[-2:] == [f"{result.flip.val:.5f}", f"{result.flip.far:.2e}"]
    assert result.flip.far > 0.5  # the "VAL@FAR=1e-3" is not at FAR 1e-3 at all, and the table says so


def _subset_bin(source: str, path, num_pairs: int) -> None:
    """``num_pairs`` pairs of ``source`` (from the first, starting over when it has fewer) as a .bin of its own."""
    images, issame = read_bin(source)
    pairs = [pair % len(issame) for pair in range(num_pairs)]
    with open(path, "wb") as handle:
        pickle.dump(([images[2 * p + i] for p in pairs for i in (0, 1)], [bool(issame[p]) for p in pairs]), handle,
                    protocol=2)


def test_a_set_of_56_pairs_is_evaluated_with_a_warning_that_it_is_too_small(tmp_path, insightface_fixtures):
    from backbones import get_model
    from eval.verification import MIN_RELIABLE_PAIRS

    _subset_bin(os.path.join(insightface_fixtures, "pairs.bin"), tmp_path / "few.bin", 56)
    torch.manual_seed(0)
    torch.save(get_model("tiny", num_features=16).state_dict(), tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "-m", "eval.verification", "--model", str(tmp_path / "model.pt"),
                             "--data-dir", str(tmp_path), "--targets", "few", "--device", "cpu", "--no-progress"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    warning = (f"{tmp_path / 'few.bin'}: only 56 pairs, about 5 per fold of 10: its accuracy is uncertain by about "
               f"+-0.13 and can come out below chance (0.5); use at least {MIN_RELIABLE_PAIRS} pairs for a number to "
               f"compare (lfw.bin has 6000)")
    assert [line for line in result.stderr.splitlines() if "few.bin" in line] == [warning], result.stderr
    assert result.stdout.splitlines()[-1].split()[:2] == ["few", "56"]  # still evaluated: the table row


def test_the_training_callback_warns_once_per_small_target(tmp_path, insightface_fixtures, caplog):
    from eval.verification import MIN_RELIABLE_PAIRS

    _subset_bin(os.path.join(insightface_fixtures, "pairs.bin"), tmp_path / "enough.bin", MIN_RELIABLE_PAIRS)
    _subset_bin(os.path.join(insightface_fixtures, "pairs.bin"), tmp_path / "short.bin", MIN_RELIABLE_PAIRS - 1)
    with caplog.at_level(logging.WARNING, logger="eval.verification"):
        VerificationCallback(["enough", "short"], str(tmp_path))
    assert [record.getMessage().split(":")[0] for record in caplog.records] == [str(tmp_path / "short.bin")]
    assert caplog.records[0].getMessage().startswith(f"{tmp_path / 'short.bin'}: only 399 pairs, about 39 per fold")


def test_plot_draws_the_roc_and_the_score_histogram_of_the_pairs(tmp_path, insightface_fixtures, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import cv2

    from backbones import get_model
    from eval import plots
    from eval.verification import main
    torch.manual_seed(0)
    model = get_model("tiny", num_features=24).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    seen = {}
    real = plots.plot_histograms

    def spy(path, scores, genuine, thresholds, title="scores"):
        seen.update(scores=np.asarray(scores), genuine=np.asarray(genuine), thresholds=thresholds)
        return real(path, scores, genuine, thresholds, title)

    monkeypatch.setattr(plots, "plot_histograms", spy)
    assert main(["--model", str(tmp_path / "model.pt"), "--data-dir", insightface_fixtures, "--targets", "pairs_py2",
                 "--device", "cpu", "--no-progress", "--plot", str(tmp_path / "pictures")]) == 0
    out = capsys.readouterr().out
    for name in ("pairs_py2_roc.png", "pairs_py2_scores.png"):
        assert f"picture: {tmp_path / 'pictures' / name}" in out
        assert cv2.imread(str(tmp_path / "pictures" / name)) is not None
    images, issame = load_bin(os.path.join(insightface_fixtures, "pairs_py2.bin"))
    with torch.no_grad():
        x = ((images.float() / 255) - 0.5) / 0.5
        features = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(seen["scores"], np.sum(features[0::2] * features[1::2], 1), atol=1e-6)
    np.testing.assert_array_equal(seen["genuine"], issame)
    assert "EER" in seen["thresholds"]
