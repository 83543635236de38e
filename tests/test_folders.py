"""eval/folders.py: evaluation on identity folders (crops and raw photos), its cache, its agreement with
eval.verification on a .bin made from the same pairs, and the figures of eval/roc.py and the 1:N protocol."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from backbones import get_model
from eval import folders
from eval.folder_protocol import make_pairs, one_to_n
from eval.roc import one_to_one
from utils.data.synthetic import identity_photos


def run_folders(argv: list[str]) -> int:
    """``python -m eval.folders`` in-process, on the CPU (on a GPU machine too: the numbers are compared with CPU
    references)."""
    return folders.main(list(argv) + ["--device", "cpu"])


def write_crops(root, identities: int, photos: int, seed: int = 0, unseen: bool = False, first: int = 0):
    for identity in range(first, first + identities):
        folder = root / f"person{identity:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index, jpeg in enumerate(identity_photos(seed, identity, photos, 112, unseen)):
            (folder / f"{index}.jpg").write_bytes(jpeg)


@pytest.fixture(scope="module")
def crops_setup(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("folders")
    root = base / "people"
    write_crops(root, 6, 5)
    (root / "loner").mkdir()
    (root / "loner" / "only.jpg").write_bytes(identity_photos(0, 40, 1)[0])
    (root / "person00" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    torch.manual_seed(0)
    model = get_model("tiny", num_features=24).eval()
    torch.save(model.state_dict(), base / "model.pt")
    return base, root, model


def test_roc_figures_worked_by_hand():
    # scores high to low: G G I G I I (3 genuine, 3 impostor); accept score >= threshold
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    genuine = np.array([1, 1, 0, 1, 0, 0], bool)
    report = one_to_one(scores, genuine, fars=(0.5, 0.1))
    at_half, at_tenth = report["tar_at_far"]
    # FAR <= 1/2: accept down to 0.6 (1 impostor of 3 = 0.333), TAR 3/3
    assert at_half == {"far": 0.5, "tar": 1.0, "far_reached": pytest.approx(1 / 3), "threshold": 0.6,
                       "false_accepts": 1, "measurable": True}
    # FAR 0.1 < 1/3 impostors: only FAR 0 is reachable (threshold 0.8, TAR 2/3), and it is flagged
    assert at_tenth["tar"] == pytest.approx(2 / 3) and at_tenth["far_reached"] == 0.0
    assert at_tenth["threshold"] == 0.8 and at_tenth["measurable"] is False
    # EER: at threshold 0.7 FAR 1/3 (one impostor) and FRR 1/3 (the genuine 0.6 rejected) cross exactly
    assert report["eer"]["eer"] == pytest.approx(1 / 3) and report["eer"]["threshold"] == 0.7
    # AUC: steps (0,0)->(0,2/3)->(1/3,2/3)->(1/3,1)->(1,1): 1/3 * 2/3 + 2/3 * 1 = 8/9
    assert report["auc"] == pytest.approx(8 / 9)
    # best accuracy 5/6 at 0.8 (2 TP + 3 TN) and at 0.6 (3 TP + 2 TN): a tie goes to the stricter threshold
    assert report["best_accuracy"] == {"accuracy": pytest.approx(5 / 6), "threshold": 0.8}


def test_pairs_are_complete_or_a_seeded_sample():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pairs, genuine = make_pairs(labels, None, seed=3)
    assert len(pairs) == 15 and genuine.sum() == 4  # C(6,2); C(3,2) + C(2,2) genuine
    assert all((labels[i] == labels[j]) == same for (i, j), same in zip(pairs, genuine))
    assert {tuple(sorted(p)) for p in pairs.tolist()} == {(i, j) for i in range(6) for j in range(i + 1, 6)}
    sampled, sampled_genuine = make_pairs(labels, 5, seed=3)
    assert len(sampled) == 9 and sampled_genuine.sum() == 4  # every genuine pair, 5 of the 11 impostor pairs
    again, _ = make_pairs(labels, 5, seed=3)
    np.testing.assert_array_equal(sampled, again)


def test_one_to_n_ranks_and_open_set_worked_by_hand():
    # gallery: one photo each of identities 0, 1, 2 (each identity has 2 photos; gallery 2 keeps both -> no probe)
    features = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.8, 0.7, 0], [0, 0, 1], [0, 0.2, 1.0]], float)
    labels = np.array([0, 0, 1, 1, 2, 2])
    report, warnings = one_to_n(features, labels, gallery_size=1, seed=0)
    assert not warnings and report["mated_probes"] == 3 and report["identities"] == 3
    # brute force with the same seeded split
    from eval.folder_protocol import gallery_split
    from eval.metrics import l2_normalize
    gallery, probes = gallery_split(labels, 1, 0)
    normalized = l2_normalize(features)
    ranks = [1 + int(np.sum(normalized[gallery] @ normalized[p] > normalized[gallery][labels[gallery] == labels[p]][0]
                            @ normalized[p])) for p in probes]
    assert report["rank1"] == pytest.approx(np.mean(np.array(ranks) == 1))
    assert report["cmc"][-1] == 1.0 and len(report["cmc"]) == 3
    unknown = np.array([[0.6, 0.6, 0.5]])
    open_set, _ = one_to_n(features, labels, 1, 0, unknown)
    assert open_set["unknown_probes"] == 1
    assert [row["measurable"] for row in open_set["dir_at_fpir"]] == [False, False, False]
    _, none = one_to_n(features, labels, gallery_size=2, seed=0)
    assert "no probe" in none[0]


def test_crops_report_matches_a_bin_from_the_same_pairs_and_the_second_run_embeds_nothing(crops_setup, capsys):
    from eval.verification import VerificationTarget
    from tools.make_bin import main as make_bin

    base, root, model = crops_setup
    out = base / "report"
    common = [str(root), "--model", str(base / "model.pt"), "--out", str(out), "--crops", "--no-plot"]
    assert run_folders(common) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    result = report["models"]["model.pt"]
    assert report["photos"] == 32 and report["identities"] == 7 and report["faceless"] == 1
    assert result["embedded_now"] == 31 and result["from_cache"] == 0 and result["face_preparation"] == "crops-112x112"
    one = result["one_to_one"]
    assert one["genuine_pairs"] == 6 * 10 and one["impostor_pairs"] == 31 * 30 // 2 - 60
    assert [row["far"] for row in one["tar_at_far"]] == [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    assert (out / "faceless.txt").read_text() == "person00/broken.jpg\tunreadable\n"
    warnings = "\n".join(report["warnings"] + result["warnings"])
    assert "only 60 genuine pairs" in warnings and "loner" in warnings and "faceless.txt" in warnings
    assert "warning: model.pt: only 60 genuine pairs" in captured.err
    assert "| 1e-01 |" in (out / "report.md").read_text()

    # The same pairs, in the same order, as a .bin: eval.verification's numbers are the report's.
    assert make_bin([str(out / "pairs.csv"), str(root), str(base / "mine.bin")]) == 0
    target = VerificationTarget("mine", str(base / "mine.bin"))
    reference = target.evaluate(model, torch.device("cpu"), batch_size=16)
    folds = one["ten_fold"]
    assert folds["accuracy"] == pytest.approx(reference.plain.accuracy, abs=1e-12)
    assert folds["accuracy_flip"] == pytest.approx(reference.flip.accuracy, abs=1e-12)
    assert folds["val_flip"] == pytest.approx(reference.flip.val, abs=1e-12)
    # and the 1:1 threshold reproduces its TAR and FAR on the pairs
    rows = [line.split(",") for line in (out / "pairs.csv").read_text().splitlines()[1:]]
    from eval.verification import decode_image
    faces = {path: decode_image((root / path).read_bytes(), (112, 112)) for path in {p for r in rows for p in r[:2]}}
    with torch.no_grad():
        def embedding(path):
            batch = torch.from_numpy(faces[path].transpose(2, 0, 1).copy())[None].float() / 127.5 - 1
            return (model(batch) + model(torch.flip(batch, dims=[3])))[0].double().numpy()
        vectors = {path: embedding(path) for path in faces}
    scores = np.array([np.dot(vectors[a], vectors[b]) / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])
                       for a, b, _ in rows])
    same = np.array([r[2] == "1" for r in rows])
    first = one["tar_at_far"][0]
    accepted = scores >= first["threshold"] - 1e-9
    assert np.mean(accepted[same]) == pytest.approx(first["tar"]) and np.mean(accepted[~same]) <= 0.1 + 1e-12

    # Second run: every embedding from the cache, same numbers.
    assert run_folders(common + ["--gallery", "2"]) == 0
    again = json.loads((out / "report.json").read_text())["models"]["model.pt"]
    assert again["embedded_now"] == 0 and again["from_cache"] == 31
    assert again["one_to_one"] == one and again["one_to_n"]["gallery_per_identity"] == 2


def test_unknown_people_give_the_open_set_figures(crops_setup, tmp_path):
    base, root, _ = crops_setup
    strangers = tmp_path / "strangers"
    write_crops(strangers, 3, 4, unseen=True)
    assert run_folders([str(root), "--model", str(base / "model.pt"), "--out", str(tmp_path / "o"), "--crops",
                         "--no-plot", "--unknown", str(strangers), "--max-impostors", "50"]) == 0
    result = json.loads((tmp_path / "o" / "report.json").read_text())["models"]["model.pt"]
    assert result["one_to_one"]["impostor_pairs"] == 50 and result["one_to_one"]["genuine_pairs"] == 60
    ident = result["one_to_n"]
    assert ident["unknown_probes"] == 12 and ident["mated_probes"] == 6 * 4
    assert [row["fpir"] for row in ident["dir_at_fpir"]] == [1e-3, 1e-2, 1e-1]
    assert ident["dir_at_fpir"][2]["measurable"] and not ident["dir_at_fpir"][0]["measurable"]


def test_raw_photos_are_detected_and_aligned_as_inference_does(tmp_path, facenet_fixtures, one_thread, monkeypatch):
    from tools.inference import embed, read_detected_face
    from utils.faces.mtcnn import MTCNN

    root = tmp_path / "raw"
    layout = {"alice/a1.jpg": "angelina_jolie", "alice/a2.png": "kate_siegel", "bob/b1.jpg": "paul_rudd",
              "bob/group.jpg": "multiface", "carol/blank.png": "blank", "carol/c1.jpg": "shea_whigham"}
    for relative, name in layout.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(os.path.join(facenet_fixtures, "images", f"{name}.png"))
        cv2.imwrite(str(root / relative), cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    (root / "carol" / "broken.jpg").write_bytes(b"\xff\xd8 no")
    torch.manual_seed(0)
    model = get_model("mbf").eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    args = [str(root), "--model", str(tmp_path / "model.pt"), "--out", str(out), "--no-plot"]
    assert run_folders(args) == 0
    result = json.loads((out / "report.json").read_text())["models"]["model.pt"]
    assert result["face_preparation"] == "arcface-112" and result["embedded_now"] == 5
    assert (out / "faceless.txt").read_text() == "carol/blank.png\tno_face\ncarol/broken.jpg\tunreadable\n"
    # the cached embedding of a photo is what tools/inference.py --detect --flip computes for it
    cache_file = next((out / "cache").iterdir())
    with np.load(cache_file) as data:
        from eval.folder_faces import file_sha256
        row = list(data["keys"]).index(file_sha256(str(root / "bob" / "b1.jpg")))
        cached = data["plain"][row].astype(np.float64) + data["flipped"][row]
    expected = embed(model, read_detected_face(str(root / "bob" / "b1.jpg"), (112, 112), MTCNN()), torch.device("cpu"),
                     flip=True)
    np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-4)
    # a second run needs neither the detector nor the model's forward pass
    monkeypatch.setattr("utils.faces.mtcnn.MTCNN.__init__", lambda *a, **k: pytest.fail("MTCNN loaded"))
    assert run_folders(args) == 0
    again = json.loads((out / "report.json").read_text())["models"]["model.pt"]
    assert again["embedded_now"] == 0 and again["from_cache"] == 5
    assert again["one_to_one"] == result["one_to_one"]


def test_facenet_models_get_box_crops_with_the_margin(facenet_fixtures, one_thread):
    from eval.folder_faces import FacePreparer
    from utils.faces.mtcnn import MTCNN

    path = os.path.join(facenet_fixtures, "images", "paul_rudd.png")
    data = open(path, "rb").read()
    preparer = FacePreparer(crops=False, margin=32)
    assert preparer.convention((160, 160)) == "facenet-160-margin32"
    assert preparer.convention((112, 112)) == "arcface-112"
    face = preparer.faces([data], ["k"], (160, 160))[0]
    rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    detector = MTCNN()
    boxes, _, _ = detector.detect(rgb)
    np.testing.assert_array_equal(face, detector.crop(rgb, boxes[0], 160, 32))
    with pytest.raises(folders.FolderError, match="only square inputs"):
        preparer.convention((112, 96))


def test_bad_folders_and_options_are_one_line_errors(crops_setup, tmp_path, capsys):
    base, root, _ = crops_setup
    model = str(base / "model.pt")
    cases = [([str(tmp_path / "nope"), "--model", model, "--out", str(tmp_path / "o")], "nope: no such folder"),
             ([str(root), "--model", model, "--out", str(tmp_path / "o"), "--gallery", "0"],
              "--gallery 0: expected at least 1"),
             ([str(root), "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--crops"],
              "missing.pt: model file not found")]
    for argv, message in cases:
        assert run_folders(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    assert run_folders([str(empty), "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "no photos found" in capsys.readouterr().err


def test_inference_takes_the_threshold_measured_on_the_folder(crops_setup, tmp_path, capsys):
    from tools import inference

    base, root, model = crops_setup
    out = tmp_path / "measured"
    assert run_folders([str(root), "--model", str(base / "model.pt"), "--out", str(out), "--crops", "--no-plot"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())["models"]["model.pt"]["one_to_one"]
    row = next(row for row in report["tar_at_far"] if row["far"] == 1e-2)
    first, second = str(root / "person00" / "0.jpg"), str(root / "person01" / "0.jpg")
    common = ["--model", str(base / "model.pt"), "--img", first, "--img2", second]
    assert inference.main(common + ["--threshold-from", str(out / "report.json"), "--far", "1e-2"]) == 0
    printed = capsys.readouterr().out
    # the report was made with flip on: the pair is scored the same way, without --flip being asked for
    features = [inference.embed(model, inference.read_face(path), torch.device("cpu"), flip=True)
                for path in (first, second)]
    similarity = inference.cosine(*features)
    assert f"cosine similarity: {similarity:.5f}" in printed
    verdict = "same person" if similarity >= row["threshold"] else "different people"
    assert f"verdict at threshold {row['threshold']:.5f} (measured on your people at FAR 0.01): {verdict}" in printed
    assert f"FAR reached {row['far_reached']:.2e}" in printed and "flip on as in the report" in printed

    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(get_model("tiny", num_features=24).state_dict(), other)
    cases = [(common + ["--threshold-from", str(out / "report.json"), "--far", "1e-6"], "--far 1e-06: not measured"),
             (common + ["--threshold-from", str(out / "report.json"), "--far", "3e-2"], "has thresholds at FAR 0.1, "),
             (common + ["--threshold-from", str(out / "report.json")], "--threshold-from needs --far"),
             (common + ["--far", "1e-2"], "--far is only for --threshold-from"),
             (common + ["--threshold", "0.5", "--threshold-from", str(out / "report.json"), "--far", "1e-2"],
              "give one of them"),
             (["--model", str(other), "--img", first, "--img2", second, "--threshold-from", str(out / "report.json"),
               "--far", "1e-2"], "measured for model.pt, not for"),
             (common + ["--threshold-from", str(out / "pairs.csv"), "--far", "1e-2"], "not a report.json")]
    for argv, message in cases:
        assert inference.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_pictures_one_roc_curve_per_model_histograms_and_cmc(crops_setup, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from eval import plots

    base, root, _ = crops_setup
    other = tmp_path / "other.pt"
    torch.manual_seed(7)
    torch.save(get_model("tiny", num_features=24).state_dict(), other)
    drawn = {}
    real_plot_roc = plots.plot_roc

    def spy(path, curves, title="ROC"):
        drawn[os.path.basename(path)] = sorted(curves)
        return real_plot_roc(path, curves, title)

    monkeypatch.setattr(plots, "plot_roc", spy)
    out = tmp_path / "two"
    assert run_folders([str(root), "--model", str(base / "model.pt"), "--model", str(other), "--out", str(out),
                         "--crops"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["models"]) == ["model.pt", "other.pt"]
    assert report["pictures"] == ["roc.png", "scores_0.png", "scores_1.png", "cmc.png"]
    assert drawn == {"roc.png": ["model.pt", "other.pt"]}
    for name in report["pictures"]:
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 300 and image.shape[1] > 400
    assert "![roc](roc.png)" in (out / "report.md").read_text()


def test_without_matplotlib_the_numbers_are_written_and_one_line_says_how_to_install_it(crops_setup, tmp_path,
                                                                                          monkeypatch, caplog):
    import builtins

    from eval import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(plots, "_HINTED", [])
    base, root, _ = crops_setup
    out = tmp_path / "plain"
    with caplog.at_level("WARNING"):
        assert run_folders([str(root), "--model", str(base / "model.pt"), "--out", str(out), "--crops"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pictures"] == [] and report["models"]["model.pt"]["one_to_one"]["genuine_pairs"] == 60
    assert not list(out.glob("*.png"))
    hints = [record.getMessage() for record in caplog.records if "matplotlib" in record.getMessage()]
    assert hints == [plots.INSTALL_HINT] and "pip install matplotlib" in hints[0]


def test_a_large_folder_samples_impostors_without_listing_every_pair(monkeypatch):
    from eval import folder_protocol

    monkeypatch.setattr(folder_protocol, "ENUMERATE_PAIRS", 10)  # take the large-folder path on a small list
    labels = np.repeat(np.arange(30), 3)  # 90 photos: 90 genuine pairs, 3915 impostor pairs
    pairs, genuine = make_pairs(labels, 500, seed=1)
    assert genuine.sum() == 90 and (~genuine).sum() == 500
    assert np.all(pairs[:, 0] < pairs[:, 1]) and len({tuple(p) for p in pairs.tolist()}) == 590
    assert np.all((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == genuine)
    np.testing.assert_array_equal(make_pairs(labels, 500, seed=1)[0], pairs)
    assert not np.array_equal(make_pairs(labels, 500, seed=2)[0], pairs)
