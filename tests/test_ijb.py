"""IJB 1:1 / 1:N evaluation on a miniature IJB-C layout generated from the fixture faces."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from eval import ijb
from eval.verification import read_bin
from utils.devices import compat
from utils.faces.align import ARCFACE_TEMPLATE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 8, stride=4, padding=2)  # 28x28, divisible by the pool (ONNX)
        self.fc = nn.Linear(8 * 16, 16)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


def make_layout(root, fixtures, num_identities=4, target="IJBC"):
    """IJBC/meta + loose_crop: per identity 2 templates x 2 media; faces are fixture images pasted into a
    150x140 canvas at an offset, landmarks = template + offset."""
    encoded, _ = read_bin(os.path.join(fixtures, "pairs.bin"))
    meta = json.load(open(os.path.join(fixtures, "pairs.json")))
    by_identity = {}
    for index, info in enumerate(meta["images"]):
        by_identity.setdefault(info["gid"], []).append(index)
    identities = [gid for gid, items in sorted(by_identity.items()) if len(items) >= 6][:num_identities]
    image_path = os.path.join(root, target)
    os.makedirs(os.path.join(image_path, "meta"))
    os.makedirs(os.path.join(image_path, "loose_crop"))
    tid_lines, landmark_lines, templates_of = [], [], {}
    rng = np.random.default_rng(0)
    face_id, media_id = 1, 100
    for subject, gid in enumerate(identities):
        images = iter(by_identity[gid])
        for template_no in range(2):
            template = 1000 + 10 * subject + template_no
            templates_of.setdefault(subject, []).append(template)
            for media_no in range(2):
                media_id += 1
                for _ in range(1 + media_no):  # media with 1 and 2 faces
                    face = cv2.imdecode(np.frombuffer(encoded[next(images)], np.uint8), cv2.IMREAD_COLOR)
                    dx, dy = rng.integers(0, 30, size=2)
                    canvas = np.full((150, 140, 3), 127, np.uint8)
                    canvas[dy:dy + 112, dx:dx + 112] = face
                    name = f"{face_id}.jpg"
                    cv2.imwrite(os.path.join(image_path, "loose_crop", name), canvas)
                    points = ARCFACE_TEMPLATE + [dx, dy]
                    score = rng.uniform(0.5, 1.0)
                    tid_lines.append(f"{name} {template} {media_id}")
                    landmark_lines.append(name + " " + " ".join(f"{v:.4f}" for v in points.ravel()) + f" {score:.4f}")
                    face_id += 1
    all_templates = [(s, t) for s, ts in templates_of.items() for t in ts]
    pair_lines = [f"{t1} {t2} {int(s1 == s2)}" for i, (s1, t1) in enumerate(all_templates)
                  for (s2, t2) in all_templates[i + 1:]]
    prefix = os.path.join(image_path, "meta", target.lower())
    open(prefix + "_face_tid_mid.txt", "w").write("\n".join(tid_lines) + "\n")
    open(prefix + "_name_5pts_score.txt", "w").write("\n".join(landmark_lines) + "\n")
    open(prefix + "_template_pair_label.txt", "w").write("\n".join(pair_lines) + "\n")
    # 1:N: G1 = even subjects (first template), G2 = odd subjects; probes = every second template
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for name, subjects in (("G1", range(0, num_identities, 2)), ("G2", range(1, num_identities, 2))):
        rows = [f"{templates_of[s][0]},{s},img/x.jpg" for s in subjects if s in templates_of]
        open(prefix + f"_1N_gallery_{name}.csv", "w").write(header + "\n".join(rows) + "\n")
    rows = [f"{templates_of[s][1]},{s},frames/y.png" for s in templates_of]
    open(prefix + "_1N_probe_mixed.csv", "w").write(header + "\n".join(rows) + "\n")
    return image_path


# ----------------------------------------------------------------------------- reference, insightface's loops

def reference_templates(features, templates, medias):
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), features.shape[1]))
    for row, template in enumerate(unique_templates):
        faces = np.where(templates == template)[0]
        media_feats = []
        for media in np.unique(medias[faces]):
            members = faces[medias[faces] == media]
            media_feats.append(features[members].mean(0) if len(members) > 1 else features[members][0])
        out[row] = np.sum(media_feats, 0)
    return out / np.linalg.norm(out, axis=1, keepdims=True), unique_templates


def reference_tar(labels, scores, fars):
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [tpr[min(zip(abs(fpr - far), range(len(fpr))))[1]] for far in fars]


def test_template_aggregation_by_hand():
    features = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    templates = np.array([7, 7, 7, 3])
    medias = np.array([1, 1, 2, 9])
    feats, unique = ijb.template_features(features, templates, medias)
    assert unique.tolist() == [3, 7]
    # template 7: mean([1,0],[3,0]) = [2,0] plus [0,2] -> [2,2] -> normalised
    assert np.allclose(feats, [[np.sqrt(0.5), np.sqrt(0.5)], [np.sqrt(0.5), np.sqrt(0.5)]])
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 8))
    templates = rng.integers(0, 6, 40) * 1000
    medias = rng.integers(0, 4, 40)
    ours, ours_t = ijb.template_features(features, templates, medias)
    ref, ref_t = reference_templates(features, templates, medias)
    assert np.array_equal(ours_t, ref_t) and np.allclose(ours, ref, atol=1e-12)


def test_pair_scores_chunked_and_tar():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    templates = np.arange(30) * 7 + 5
    t1, t2 = rng.choice(templates, 1000), rng.choice(templates, 1000)
    scores = ijb.pair_scores(feats, templates, t1, t2, chunk_size=33)
    expected = np.sum(feats[(t1 - 5) // 7] * feats[(t2 - 5) // 7], 1)
    assert np.allclose(scores, expected, atol=1e-12)
    labels = (rng.random(1000) < 0.2).astype(int)
    noisy = scores + labels * 0.5
    tar = ijb.tar_at_far(labels, noisy)
    assert list(tar.values()) == reference_tar(labels, noisy, ijb.FAR_LABELS)


def test_identification_by_hand():
    # three gallery subjects on the axes; probes: two mated (one correct at rank 1, one at rank 2) and
    # two non-mated with top scores 0.6 and 0.2
    feats = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                      [0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0], [0.6, 0, 0, 0.8], [0, 0, 0.2, 0.98]], dtype=float)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    templates = np.arange(7)
    result = ijb.identification(feats, templates, np.array([0, 1, 2]), np.array([10, 11, 12]),
                                np.array([3, 4, 5, 6]), np.array([10, 10, 99, 98]), fpir_labels=(0.5, 0.0))
    assert (result.rank1, result.rank5) == (0.5, 1.0)
    assert (result.num_mated, result.num_nonmated) == (2, 2)
    # FPIR 0.5: one non-mated may pass -> threshold = second-highest non-mated top score (~0.2);
    # probe 3 is rank 1 with score ~0.99 > 0.2 -> TPIR 0.5. FPIR 0: threshold ~0.6, probe 3 still passes.
    assert result.tpir == {0.5: 0.5, 0.0: 0.5}


def test_end_to_end_matches_reference(tmp_path, insightface_fixtures):
    image_path = make_layout(str(tmp_path), insightface_fixtures)
    model = TinyNet().eval()
    protocol = ijb.Protocol()
    report = ijb.evaluate_ijb(model, image_path, "IJBC", torch.device("cpu"), protocol, batch_size=5,
                              result_dir=str(tmp_path / "out"), identify=True)
    faces = ijb.read_faces(image_path, "IJBC")
    # reference: align with the known offsets (a pure shift), embed with and without flip, aggregate by loops
    crops = ijb.align_faces(image_path, faces, range(len(faces.names)))
    with torch.no_grad():
        x = ((crops.float() / 255) - 0.5) / 0.5
        feats = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()
    feats = feats * faces.scores[:, None]
    tfeats, tids = reference_templates(feats, faces.templates, faces.medias)
    t1, t2, labels = ijb.read_pairs(image_path, "IJBC")
    ref_scores = np.array([tfeats[list(tids).index(a)] @ tfeats[list(tids).index(b)] for a, b in zip(t1, t2)])
    saved = np.load(tmp_path / "out" / "ijbc_scores.npy")
    assert np.allclose(saved, ref_scores, atol=1e-10)
    assert list(report["tar_at_far"].values()) == reference_tar(labels, saved, ijb.FAR_LABELS)
    assert report["pairs"] == len(labels) == 28 and report["templates"] == 8
    assert set(report["identification"]) == {"G1", "G2"}
    g1 = report["identification"]["G1"]
    assert (g1.num_mated, g1.num_nonmated) == (2, 2)
    saved_json = json.load(open(tmp_path / "out" / "ijbc_result.json"))
    assert saved_json["protocol"] == "flip=on, norm-as-quality=on, detector-score=on"
    # the faces were pasted at integer offsets, so the aligned crop is exactly the pasted region
    assert crops.shape == (24, 3, 112, 112)
    dx, dy = np.rint(faces.landmarks[0][0] - ARCFACE_TEMPLATE[0]).astype(int)
    canvas = cv2.cvtColor(cv2.imread(os.path.join(image_path, "loose_crop", faces.names[0])), cv2.COLOR_BGR2RGB)
    assert np.abs(crops[0].permute(1, 2, 0).numpy().astype(int) - canvas[dy:dy + 112, dx:dx + 112]).max() <= 1


def test_protocol_switches_change_features():
    emb, flip = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
    scores = np.array([0.5], dtype=np.float32)
    assert np.allclose(ijb.face_features(emb, flip, scores, ijb.Protocol()), [[2.0, 2.0]])
    assert np.allclose(ijb.face_features(emb, flip, scores, ijb.Protocol(flip=False, detector_score=False)), emb)
    normed = ijb.face_features(emb, flip, scores, ijb.Protocol(flip=False, norm_score=False, detector_score=False))
    assert np.allclose(normed, [[0.6, 0.8]])


# ----------------------------------------------------------------------------- bad input

def _meta(image_path, suffix):
    return os.path.join(image_path, "meta", "ijbc_" + suffix)


def _edit(path, line_index, new_line):
    lines = open(path).read().splitlines()
    lines[line_index] = new_line
    open(path, "w").write("\n".join(lines) + "\n")


def test_bad_inputs(tmp_path, insightface_fixtures):
    image_path = make_layout(str(tmp_path), insightface_fixtures, num_identities=2)
    landmarks = _meta(image_path, "name_5pts_score.txt")
    tid = _meta(image_path, "face_tid_mid.txt")
    pairs = _meta(image_path, "template_pair_label.txt")
    original = {p: open(p).read() for p in (landmarks, tid, pairs)}

    def restore():
        for p, text in original.items():
            open(p, "w").write(text)

    _edit(landmarks, 2, "3.jpg 1 2 3 4 5 6 7 8 0.9")
    with pytest.raises(ijb.IJBError, match=r"ijbc_name_5pts_score\.txt line 3: expected an image name, 10 landmark "
                                           r"values and a score, got 9 values"):
        ijb.read_faces(image_path, "IJBC")
    restore()
    open(landmarks, "w").write("\n".join(original[landmarks].splitlines()[:-1]) + "\n")
    with pytest.raises(ijb.IJBError, match=r"ijbc_name_5pts_score\.txt: 11 faces but .*ijbc_face_tid_mid\.txt lists 12"):
        ijb.read_faces(image_path, "IJBC")
    restore()
    _edit(tid, 0, "999.jpg 1000 101")
    with pytest.raises(ijb.IJBError, match=r"line 1: image 1\.jpg but .*ijbc_face_tid_mid\.txt line 1 has 999\.jpg"):
        ijb.read_faces(image_path, "IJBC")
    restore()
    _edit(tid, 1, "2.jpg 1000")
    with pytest.raises(ijb.IJBError, match=r"ijbc_face_tid_mid\.txt line 2: expected 3 fields"):
        ijb.read_faces(image_path, "IJBC")
    restore()
    _edit(pairs, 0, "1000 5555 1")
    with pytest.raises(ijb.IJBError, match=r"ijbc_template_pair_label\.txt: template 5555 \(entry 1\) has no faces"):
        ijb.evaluate_ijb(TinyNet(), image_path, "IJBC", torch.device("cpu"), ijb.Protocol())
    _edit(pairs, 0, "1000 1001 2")
    with pytest.raises(ijb.IJBError, match=r"ijbc_template_pair_label\.txt line 1: label must be 0 or 1, got 2"):
        ijb.read_pairs(image_path, "IJBC")
    restore()
    os.remove(os.path.join(image_path, "loose_crop", "4.jpg"))
    with pytest.raises(ijb.IJBError, match=r"loose_crop/4\.jpg: image not found \(face 4 of the landmark list\)"):
        ijb.evaluate_ijb(TinyNet(), image_path, "IJBC", torch.device("cpu"), ijb.Protocol())
    os.remove(pairs)
    with pytest.raises(ijb.IJBError, match=r"ijbc_template_pair_label\.txt: template1 template2 label file not found"):
        ijb.read_pairs(image_path, "IJBC")
    open(_meta(image_path, "1N_probe_mixed.csv"), "w").write("TEMPLATE,SUBJECT\n1,2\n")
    with pytest.raises(ijb.IJBError, match=r"ijbc_1N_probe_mixed\.csv: header lacks column\(s\) SUBJECT_ID, TEMPLATE_ID"):
        ijb.read_identification_csv(_meta(image_path, "1N_probe_mixed.csv"))


def test_cli_with_onnx_model(tmp_path, insightface_fixtures):
    image_path = make_layout(str(tmp_path), insightface_fixtures, num_identities=2)
    onnx_path = str(tmp_path / "tiny.onnx")
    torch.onnx.export(TinyNet().eval(), torch.zeros(1, 3, 112, 112), onnx_path, input_names=["data"],
                      output_names=["embedding"], dynamic_axes={"data": {0: "batch"}}, **compat.onnx_export_kwargs())
    done = subprocess.run([sys.executable, "-m", "eval.ijb", "--model", onnx_path, "--image-path", image_path,
                           "--target", "IJBC", "--result-dir", str(tmp_path / "res"), "--device", "cpu",
                           "--identification", "--no-progress", "--no-flip"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "protocol: flip=off, norm-as-quality=on, detector-score=on" in done.stdout
    assert "| Methods | 1e-06 | 1e-05 | 1e-04 | 1e-03 | 1e-02 | 1e-01 |" in done.stdout
    assert "1:N G1: rank-1" in done.stdout
    assert np.load(tmp_path / "res" / "ijbc_scores.npy").shape == (6,)
    done = subprocess.run([sys.executable, "eval/ijb.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--image-path" in done.stdout
    done = subprocess.run([sys.executable, "-m", "eval.ijb", "--model", onnx_path, "--image-path", str(tmp_path / "no"),
                           "--device", "cpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("ijbc_face_tid_mid.txt: image template_id media_id file not found")


def test_cli_reads_network_from_a_training_checkpoint(tmp_path, insightface_fixtures):
    from backbones import get_model
    from utils.run.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save
    image_path = make_layout(str(tmp_path), insightface_fixtures, num_identities=2)
    torch.manual_seed(3)
    tiny = get_model("tiny", num_features=24).eval()
    checkpoint = str(tmp_path / "checkpoint_step000000004.pt")
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 4, "epoch": 0,
                 "backbone": tiny.state_dict(), "config": {"network": "tiny", "embedding_size": 24}}, checkpoint)
    torch.save(tiny.state_dict(), tmp_path / "model.pt")
    common = ["--image-path", image_path, "--target", "IJBC", "--device", "cpu", "--no-progress"]
    assert ijb.main(["--model", checkpoint, "--result-dir", str(tmp_path / "a"), *common]) == 0  # no --network
    assert ijb.main(["--model", str(tmp_path / "model.pt"), "--network", "tiny", "--embedding-size", "24",
                     "--result-dir", str(tmp_path / "b"), "--plot", *common]) == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the numbers are written all the same; the pictures need the optional matplotlib
        assert not list((tmp_path / "b").glob("*.png"))
    else:  # --plot: the same ROC and score histogram pictures as eval.verification and eval.folders
        assert sorted(path.name for path in (tmp_path / "b").glob("*.png")) == ["ijbc_roc.png", "ijbc_scores.png"]
    from_config = np.load(tmp_path / "a" / "ijbc_scores.npy")
    assert from_config.shape == (6,) and np.array_equal(from_config, np.load(tmp_path / "b" / "ijbc_scores.npy"))
