"""Smoke tests for tools/benchmark.py and its subcommands (tools/benchmarks/*.py) at the tiniest sizes.

Each subcommand runs once through the dispatcher (``tools.benchmark.main``) in this process, so the
torch import is paid once; the benchmarks that time subprocesses (head: one per configuration,
train: train.py) still run real ones. The assertions parse the printed tables: every rate, time and
memory figure must be a finite positive number and the derived figures must agree with the raw ones.
Nothing here checks speed. Scratch folders the tools create go under tmp_path.
"""
import math
import os
import re
import socket
import subprocess
import sys
import tempfile

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tools import benchmark
from tools.benchmarks import backbone as backbone_bench
from tools.benchmarks import eval as eval_bench
from tools.benchmarks import train as train_bench
from utils.data.synthetic import make_identity_set

NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


@pytest.fixture(autouse=True)
def scratch_and_threads(tmp_path, monkeypatch):
    """Tools' TemporaryDirectory scratch goes under tmp_path; one torch thread (see conftest.one_thread), and
    the thread counts the tools set are restored afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


def positive(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


def lines_matching(out: str, pattern: str) -> list[re.Match]:
    return [match for match in (re.search(pattern, line) for line in out.splitlines()) if match]


def one_line_error(argv: list[str]) -> str:
    """The message of the SystemExit that ``argv`` raises; asserts it is one line (no traceback, no usage)."""
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv)
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- dispatcher


def test_dispatcher_help_lists_every_subcommand_as_a_script():
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in benchmark.SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.MULTILINE), f"{name} missing:\n{result.stdout}"


@pytest.mark.parametrize("argv, message", [([], "required: what"), (["bogus"], "invalid choice: 'bogus'")])
def test_dispatcher_rejects_missing_or_unknown_subcommand(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- data


@pytest.mark.timeout(120)
def test_data_on_generated_set(capsys):
    benchmark.main(["data", "--num-images", "16", "--batch-size", "4", "--workers", "0", "1", "--repeat", "1"])
    out = capsys.readouterr().out
    header = re.search(r"^data: (\S+) layout=header images=(\d+) timing (\d+) records", out, re.MULTILINE)
    assert header, out
    assert header.group(1).startswith(tempfile.gettempdir())  # generated in the (tmp_path) scratch folder
    assert int(header.group(2)) == int(header.group(3)) == 16
    positive(re.search(rf"raw record reads \(read_idx\)\s+{NUMBER} images/s", out).group(1))
    bare = positive(re.search(rf"bare cv2.imdecode loop \(reference\)\s+{NUMBER} images/s", out).group(1))
    pipeline = re.search(rf"read\+decode\+flip per worker\s+{NUMBER} images/s\s+\({NUMBER}x the bare", out)
    positive(pipeline.group(1))
    positive(pipeline.group(2))
    loaders = lines_matching(out, rf"DataLoader batch 4, (\d+) worker\(s\)\s+{NUMBER} images/s\s+\(x{NUMBER} of")
    assert [int(match.group(1)) for match in loaders] == [0, 1], out
    for match in loaders:
        positive(match.group(2))
        positive(match.group(3))


@pytest.mark.timeout(120)
def test_data_shards_row_reads_the_same_records_as_a_list_of_shards(capsys):
    import numpy as np

    from tools.benchmarks.data import write_shards
    from utils.data.datasets import RecordDataset
    from utils.data.sources import build_sources

    benchmark.main(["data", "--num-images", "24", "--batch-size", "4", "--workers", "0", "1", "--repeat", "1",
                    "--shards", "3"])
    out = capsys.readouterr().out
    for workers in (0, 1):
        row = re.search(rf"DataLoader batch 4, {workers} worker\(s\), 3 shards\s+{NUMBER} images/s\s+\(x{NUMBER} of "
                        rf"one pack, best of 1 alternating passes; open per reading process: at most (\d+) \.rec of 3, "
                        rf"(\d+) \.idx\)", out)
        assert row, out
        positive(row.group(1))
        positive(row.group(2))
        # a process that read the 24 images in shuffled order holds one descriptor per shard, no index file
        assert (int(row.group(3)), int(row.group(4))) == (3, 0), row.group(0)
    # the shards hold exactly the pack's records: the same images and, read as a list, the same classes
    folder = tempfile.mkdtemp()
    pack = RecordDataset(make_identity_set(f"{folder}/set", 4, 6, 0, 0, seed=0), flip=False)
    write_shards(pack, len(pack), f"{folder}/shards", 3)
    union = build_sources([f"{folder}/shards"], (112, 112), False)
    assert len(union.parts) == 3 and np.array_equal(union.labels(), pack.labels())
    assert [union.parts[p].read_record(i)[1] for p, i in map(union.locate, range(24))] == \
        [pack.read_record(i)[1] for i in range(24)]


@pytest.fixture(scope="module")
def twelve_image_rec(tmp_path_factory) -> str:
    return make_identity_set(str(tmp_path_factory.mktemp("rec") / "set"), num_identities=3, images_per_identity=4,
                             num_val_identities=0, num_val_pairs=0, seed=1)


@pytest.mark.timeout(120)
def test_data_on_existing_rec_folder(twelve_image_rec, capsys):
    root = twelve_image_rec
    # batch 6 of 12 images: exactly the two batches (one untimed, one timed) the DataLoader stage needs.
    benchmark.main(["data", "--rec", root, "--num-images", "8", "--batch-size", "6", "--workers", "0",
                    "--repeat", "1"])
    out = capsys.readouterr().out
    assert f"data: {root} layout=header images=12 timing 8 records" in out
    loader = re.search(rf"DataLoader batch 6, 0 worker\(s\)\s+{NUMBER} images/s\s+\(x1.00 of", out)
    positive(loader.group(1))


@pytest.mark.parametrize("batch", ["16", "8"])  # 16: no batch at all (was StopIteration); 8: one (was 0 images/s)
def test_data_rec_with_fewer_than_two_batches_is_a_one_line_error(twelve_image_rec, batch):
    message = one_line_error(["data", "--rec", twelve_image_rec, "--batch-size", batch, "--workers", "0"])
    assert message == (f"--rec {twelve_image_rec} has 12 images, too few for --batch-size {batch}: the DataLoader "
                       f"stage needs at least 2 batches ({2 * int(batch)} images)")


def test_data_missing_or_empty_rec_folder_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert one_line_error(["data", "--rec", missing]) == (
        f"--rec {missing}: no such folder (expected a folder with train.rec and train.idx)")
    empty = str(tmp_path)  # a folder, but no train.rec: RecordIOError from the reader
    assert one_line_error(["data", "--rec", empty]) == f"--rec {empty}: {empty}/train.rec: record file not found"


@pytest.mark.parametrize("argv, message", [
    (["--num-images", "7", "--batch-size", "4"], "--num-images 7 is too few for --batch-size 4: the DataLoader stage "
                                                 "needs at least 2 batches (8 images), one untimed and one timed"),
    (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    (["--workers", "1", "-1"], "--workers 1 -1: expected worker counts of 0 or more"),
])
def test_data_bad_sizes_are_rejected_before_generating_a_set(monkeypatch, argv, message):
    monkeypatch.setattr("utils.data.synthetic.make_identity_set", lambda *args, **kwargs: pytest.fail("generated a set"))
    assert one_line_error(["data"] + argv) == message


# ---------------------------------------------------------------------------- backbone


@pytest.mark.timeout(120)
def test_backbone_tiny_fp32_and_channels_last(capsys):
    benchmark.main(["backbone", "--network", "tiny", "--batch", "2", "--device", "cpu", "--iters", "1",
                    "--warmup", "1", "--threads", "1", "--modes", "fp32,fp32-cl"])
    out = capsys.readouterr().out
    assert "network=tiny batch=2 device=cpu threads=1 iters=1 warmup=1 gradient_checkpointing=False" in out
    model = re.search(rf"model: {NUMBER} GMACs/image = {NUMBER} GFLOP forward; fp32 GEMM {NUMBER} GFLOP/s", out)
    assert model, out
    gmacs, gflop = positive(model.group(1)), positive(model.group(2))
    assert gflop == pytest.approx(2 * gmacs, abs=0.01)
    positive(model.group(3))
    rows = lines_matching(out, rf"^(fp32(?:-cl)?)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%$")
    assert [row.group(1) for row in rows] == ["fp32", "fp32-cl"], out
    for row in rows:
        positive(row.group(2))  # forward img/s
        positive(row.group(5))  # train img/s
        for column in (3, 4, 6, 7):  # GFLOP/s and "of GEMM" are rounded to integers: may print 0 for tiny
            assert math.isfinite(float(row.group(column))) and float(row.group(column)) >= 0


@pytest.mark.timeout(120)
def test_backbone_unknown_mode_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(backbone_bench, "gemm_gflops", lambda device, dtype, warmup: 100.0)  # skip the 2048^2 GEMMs
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["backbone", "--network", "tiny", "--batch", "2", "--device", "cpu", "--iters", "1",
                        "--warmup", "0", "--threads", "1", "--forward-only", "--modes", "fp32,fp33"])
    assert str(exc.value.code).startswith("unknown mode 'fp33'; use fp32, fp32-cl")
    out = capsys.readouterr().out
    forward_only = re.search(rf"^fp32\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%$", out, re.MULTILINE)  # no train columns
    assert forward_only, out
    positive(forward_only.group(1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("what", ["backbone", "eval"])
def test_an_unavailable_device_is_a_one_line_error(what):
    message = one_line_error([what, "--network", "tiny", "--device", "cuda"])
    why = "a CPU build of torch" if torch.version.cuda is None else "no CUDA GPU visible (CUDA_VISIBLE_DEVICES, nvidia-smi)"
    assert message == f"error: device='cuda' requested but torch.cuda.is_available() is False ({why})"


# ---------------------------------------------------------------------------- head

HEAD_TINY = ["head", "--num-classes", "64", "--sample-rate", "0.5", "--batch", "4", "--embedding-size", "16",
             "--steps", "1", "--warmup", "1", "--threads", "1", "--timeout", "120"]
HEAD_LINE = (rf"C=\s*64 r=0.5\s+(sparse|dense|reference)\s+w=floa state=floa \| step\s+{NUMBER} s \(min {NUMBER}\) "
             rf"\| peak RSS\s+{NUMBER} GiB \(\s*{NUMBER} above start\) \| loss {NUMBER}$")


@pytest.mark.timeout(240)
def test_head_two_rounds_sparse_vs_reference(capsys):
    benchmark.main(HEAD_TINY + ["--modes", "sparse", "reference", "--rounds", "2"])
    out = capsys.readouterr().out
    assert out.startswith("head benchmark: batch 4, D=16, sgd, 1 threads"), out
    per_round = [line for line in out.splitlines() if line.startswith("C=")]
    assert [re.search(HEAD_LINE, line).group(1) for line in per_round] == ["sparse", "reference"] * 2, out
    parsed = {}
    for line in per_round:
        match = re.search(HEAD_LINE, line)
        step, min_step, peak = positive(match.group(2)), positive(match.group(3)), positive(match.group(4))
        assert peak < 18.0
        positive(match.group(6))  # cross-entropy of a random head: positive and finite
        parsed.setdefault(match.group(1), []).append((line, step, peak))

    medians = lines_matching(out, r"^  median of 2 rounds: (.*)$")
    assert len(medians) == 2, out
    median_of = {}
    for median in medians:
        match = re.search(HEAD_LINE, median.group(1))
        mode = match.group(1)
        assert float(match.group(4)) in {entry[2] for entry in parsed[mode]}  # one real round's memory figure
        median_of[mode] = median.group(1)
    assert set(median_of) == {"sparse", "reference"}

    ratio = re.search(rf"^  sparse / reference: time {NUMBER}x, peak RSS {NUMBER}x$", out, re.MULTILINE)
    assert ratio, out
    positive(ratio.group(1))
    positive(ratio.group(2))
    assert "sparse / dense" not in out


@pytest.mark.timeout(60)
def test_head_skips_configurations_over_the_memory_cap(capsys):
    benchmark.main(HEAD_TINY + ["--rounds", "2", "--max-gib", "0.01"])
    out = capsys.readouterr().out
    skipped = lines_matching(out, r"^C=\s*64 r=0.5\s+(\w+)\s+.*\| skipped: needs ~[\d.]+ GiB > 0.01 GiB$")
    assert [match.group(1) for match in skipped] == ["sparse", "dense", "reference"], out  # once, not per round
    assert "median of" not in out and "sparse / " not in out


def fake_head_rounds(monkeypatch, rounds: dict) -> None:
    """``run_one`` answers from ``rounds`` (mode -> list of (step s, peak GiB)) in call order: no subprocess."""
    from tools.benchmarks import head as head_bench

    pending = {mode: list(values) for mode, values in rounds.items()}

    def run_one(spec, max_gib, timeout):
        step, peak = pending[spec["mode"]].pop(0)
        return {"step_s": step, "min_step_s": step / 2, "peak_rss_gib": peak, "peak_above_start_gib": peak / 2,
                "loss": 1.0}

    monkeypatch.setattr(head_bench, "run_one", run_one)


def test_head_median_and_ratios_from_known_rounds(monkeypatch, capsys):
    # Four rounds. sparse steps 0.4 0.1 0.3 0.2 -> middle two 0.2, 0.3: step 0.25 s with the upper one's
    # peak (3 GiB); reference steps 1.0 0.5 0.7 0.9 -> 0.7, 0.9: step 0.8 s, peak 9 GiB.
    fake_head_rounds(monkeypatch, {"sparse": [(0.4, 4.0), (0.1, 1.0), (0.3, 3.0), (0.2, 2.0)],
                                   "reference": [(1.0, 10.0), (0.5, 5.0), (0.7, 7.0), (0.9, 9.0)]})
    benchmark.main(HEAD_TINY + ["--modes", "sparse", "reference", "--rounds", "4", "--max-gib", "100"])
    out = capsys.readouterr().out
    medians = {match.group(1): (float(match.group(2)), float(match.group(4)))
               for match in lines_matching(out, r"^  median of 4 rounds: " + HEAD_LINE[:-1] + "$")}
    assert medians == {"sparse": (0.25, 3.0), "reference": (0.8, 9.0)}, out
    # 0.25 / 0.8 = 0.3125 and 3 / 9 = 0.333...
    assert "  sparse / reference: time 0.31x, peak RSS 0.33x" in out.splitlines(), out


def test_head_find_max_reports_the_last_size_that_fit(monkeypatch, capsys):
    fake_head_rounds(monkeypatch, {"sparse": [(0.1, 1.0), (0.2, 2.0)]})
    from tools.benchmarks import head as head_bench
    real = head_bench.run_one
    monkeypatch.setattr(head_bench, "run_one", lambda spec, max_gib, timeout: (
        {"error": "killed: RSS 9.0 GiB > 4 GiB"} if spec["num_classes"] == 256 else real(spec, max_gib, timeout)))
    benchmark.main(HEAD_TINY + ["--find-max", "256", "64", "128", "512", "--max-gib", "4"])
    out = capsys.readouterr().out
    assert "C=      512" not in out  # sizes are tried in increasing order and stop at the first failure
    assert "largest class count within 4.0 GiB at r=0.5 (float32 weight, float32 state): 128" in out, out


@pytest.mark.timeout(60)
def test_head_find_max_watchdog_kills_over_the_cap(monkeypatch, capsys):
    from tools.benchmarks import head as head_bench

    # The child's resident size is read as 1 GiB from the first poll on: the kill does not depend on how
    # fast the child grows or how often the watchdog polls.
    monkeypatch.setattr(head_bench, "_rss_gib", lambda pid: 1.0)
    benchmark.main(HEAD_TINY + ["--find-max", "64", "128", "--max-gib", "0.05"])
    out = capsys.readouterr().out
    assert re.search(r"^C=\s*64 r=0.5\s+sparse .*\| killed: RSS 1.0 GiB > 0.05 GiB$", out, re.MULTILINE), out
    assert "C=      128" not in out  # stops at the first failure
    assert "largest class count within 0.05 GiB at r=0.5 (float32 weight, float32 state): none of those tried" in out


# ---------------------------------------------------------------------------- train


@pytest.mark.timeout(240)
def test_train_tiny_single_process(capsys):
    # --threads 1: by default the child gets OMP_NUM_THREADS=cpu_count//nproc, and 2 OpenMP threads on a
    # 2-core runner with anything else busy are ~20x slower (spin-waits).
    # train.py logs at steps 3 and 4 (every 3 steps and the last); the first interval is warm-up: 4 is the fewest.
    benchmark.main(["train", "--networks", "tiny", "--nprocs", "1", "--steps", str(train_bench.MIN_STEPS),
                    "--batch", "2", "--num-classes", "10", "--workers", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert "device=cpu precision=fp32 batch/process=2 steps=4 classes=10 workers=0" in out
    row = re.search(rf"^tiny\s+1\s+1\s+{NUMBER}\s+{NUMBER}%$", out, re.MULTILINE)  # network procs threads ...
    assert row, out
    positive(row.group(1))
    assert 0 <= float(row.group(2)) <= 100


def fake_train(monkeypatch, returncode: int, stdout: str, stderr: str = "") -> list:
    calls = []

    def run(command, **kwargs):
        calls.append((command, kwargs))
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)

    monkeypatch.setattr(train_bench.subprocess, "run", run)
    return calls


def test_train_failed_case_is_reported_with_its_output(monkeypatch):
    calls = fake_train(monkeypatch, 1, "", "Traceback ...\nBackboneError: unknown network 'r9'\n")
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["train", "--networks", "r9", "--nprocs", "1", "--steps", "6"])
    assert str(exc.value.code).startswith("r9 x1 failed:\n")
    assert "BackboneError: unknown network 'r9'" in str(exc.value.code)
    command = calls[0][0]
    assert command[:3] == [sys.executable, "train.py", "configs/base.py"]
    assert "network='r9'" in command and "max_steps=6" in command and "rec='random'" in command


def status_line(step: int, rate: float, wait: int) -> str:
    return f"step {step}/6 epoch 0 | loss 9.0 | lr 0.1 | {rate} samples/s | data wait {wait}% | scale 1\n"


def test_train_too_few_status_lines_asks_for_more(monkeypatch):
    # Only the warm-up interval was logged (e.g. train.py stopped early): nothing left to average.
    fake_train(monkeypatch, 0, status_line(3, 12.0, 5))
    assert one_line_error(["train", "--networks", "tiny", "--nprocs", "1", "--steps", "6"]) == (
        "tiny x1: too few steps to measure; raise --steps")


def test_train_threads_flag_and_free_master_port(monkeypatch, capsys):
    monkeypatch.setattr(train_bench.os, "cpu_count", lambda: 8)
    ports = []

    def run(command, **kwargs):
        port = int(next(arg for arg in command if arg.startswith("--master_port=")).split("=")[1])
        with socket.socket() as sock:  # free when chosen, and nothing has taken it since
            sock.bind(("127.0.0.1", port))
        ports.append((port, kwargs["env"]["OMP_NUM_THREADS"]))
        assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        stdout = status_line(3, 10.0, 50) + status_line(6, 20.0, 10) + status_line(9, 40.0, 30)
        return subprocess.CompletedProcess(command, 0, stdout, "")

    monkeypatch.setattr(train_bench.subprocess, "run", run)
    benchmark.main(["train", "--networks", "tiny", "--nprocs", "2", "--steps", "9", "--threads", "3"])
    benchmark.main(["train", "--networks", "tiny", "--nprocs", "2", "--steps", "9"])  # default: 8 cpus // 2 procs
    assert [threads for _, threads in ports] == ["3", "4"]
    assert all(0 < port < 65536 and port != 29611 for port, _ in ports)
    rows = lines_matching(capsys.readouterr().out, rf"^tiny\s+2\s+(\d+)\s+{NUMBER}\s+{NUMBER}%$")
    assert [(row.group(1), float(row.group(2)), float(row.group(3))) for row in rows] == [("3", 30.0, 20.0),
                                                                                          ("4", 30.0, 20.0)]


@pytest.mark.parametrize("argv, message", [
    (["train", "--networks", "tiny", "--steps", "3"], "--steps 3 is too few to measure: need at least 4 (train.py "
                                                      "logs every 3 steps and the first interval is dropped as warm-up)"),
    (["train", "--networks", "tiny", "--threads", "0"], "--threads 0: expected a positive integer"),
    (["train", "--networks", "tiny", "--nprocs", "1,x"], "--nprocs '1,x': expected comma-separated positive integers, "
                                                         "e.g. 1,2"),
    (["train", "--networks", "tiny", "--nprocs", "0"], "--nprocs '0': expected comma-separated positive integers, "
                                                       "e.g. 1,2"),
    (["train", "--networks", "tiny", "--batch", "0"], "--batch 0: expected a positive integer"),
    (["doctor", "--steps", "0"], "--steps 0: expected a positive integer"),
    (["doctor", "--batch-size", "-1"], "--batch-size -1: expected a positive integer"),
    (["doctor", "--workers", "-1"], "--workers -1: expected 0 or more"),
    (["doctor", "--network", "r5O"], "error: --set: config key 'network': unknown network 'r5O'; did you mean 'r50'? "
                                     "(expected one of {names})"),
    (["doctor", "--config", "no_such.py"], "error: config file not found: no_such.py"),
])
def test_train_and_doctor_bad_arguments_are_rejected_before_any_run(monkeypatch, argv, message):
    from backbones import MODEL_NAMES

    calls = fake_train(monkeypatch, 0, "")
    assert one_line_error(argv) == message.format(names=", ".join(MODEL_NAMES))
    assert calls == []


# ---------------------------------------------------------------------------- doctor


@pytest.mark.timeout(240)
def test_doctor_on_cpu_prints_the_environment_and_trains(capsys):
    from utils.devices import device as devices

    # The CPU path end to end: the ms1mv3_r50 config's head and precision with the tiny network, 4 steps.
    benchmark.main(["doctor", "--network", "tiny", "--steps", "4", "--batch-size", "4", "--num-classes", "20",
                    "--workers", "0", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "doctor: software"
    assert lines[2] == f"  torch       {torch.__version__} (git {torch.version.git_version[:7]})"
    assert "  gloo  yes (CPU)" in lines and "  cpu  fp32 native, " + (
        "bf16 native (AVX512-BF16/AMX)" if devices.cpu_has_native_bf16() else "bf16 emulated (slower than fp32)") + \
        ", fp16 emulated (train.py uses bf16 or fp32 instead)" in lines
    used = "bf16" if devices.cpu_has_native_bf16() else "fp32"
    assert (f"doctor: training tiny + Partial FC (combined margins, sample_rate 1) on random tensors: 1 process(es) on "
            f"cpu (gloo), {used} (the config says fp16; cpu runs {used} instead), batch 4 per process, 20 classes, "
            f"4 steps (configs/ms1mv3_r50.py)") in lines
    start = lines.index("doctor: training")
    rate = re.fullmatch(rf"  samples/s    {NUMBER} \(steps 2-4, global batch 4\)", lines[start + 1])
    memory = re.fullmatch(rf"  peak memory  {NUMBER} GiB \(rank 0's peak RSS\)", lines[start + 2])
    loss = re.fullmatch(rf"  loss         {NUMBER} -> {NUMBER} over 4 steps: moved \((up|down)\)", lines[start + 3])
    assert rate and memory and loss, lines[start:]
    positive(rate.group(1))
    positive(memory.group(1))
    first, last = float(loss.group(1)), float(loss.group(2))
    assert math.isfinite(first) and math.isfinite(last) and first != last
    assert (loss.group(3) == "down") == (last < first)
    assert lines[-1] == "doctor: OK: cpu x1 trained 4 steps"


def doctor_status(step: int, loss: str, mem: float = 1.5) -> str:
    return (f"[rank 0] INFO step {step}/20 epoch 0 | loss {loss} | lr 0.1 | 100.0 samples/s | data wait 1% | "
            f"scale 65536 | mem {mem} GiB | ETA 0h00m01s\n")


def test_doctor_runs_ddp_over_every_local_device_at_the_config_precision(monkeypatch, capsys):
    from tools.benchmarks import doctor
    from utils.devices import device as devices
    from utils.devices import report

    # Two CUDA devices (faked: none here): one process per device under torchrun, the config's fp16 untouched.
    monkeypatch.setattr(devices, "resolve_kind", lambda requested: "cuda")
    monkeypatch.setattr(report, "local_device_count", lambda kind: 2 if kind == "cuda" else 1)
    monkeypatch.setattr(doctor, "print_environment", lambda: None)
    stdout = "".join(doctor_status(step, f"{40 - step * 0.5:.4f}", mem=10.0 + step) for step in range(1, 21))
    calls = fake_train(monkeypatch, 0, stdout)
    benchmark.main(["doctor"])
    command, kwargs = calls[0]
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert command[5:7] == ["train.py", "configs/ms1mv3_r50.py"]
    sets = dict(item.split("=", 1) for item in command[8::2])
    assert sets["device"] == "'cuda'" and sets["network"] == "'r50'" and sets["rec"] == "'random'"
    assert sets["batch_size"] == "128" and sets["num_classes"] == "93431" and sets["max_steps"] == "20"
    assert sets["num_image"] == str(128 * 2 * 20) and "fp16" not in sets and "bf16" not in sets
    assert kwargs["env"]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "doctor: training r50 + Partial FC (combined margins, sample_rate 1) on random tensors: 2 process(es) on cuda "
        "(nccl), fp16, batch 128 per process, 93431 classes, 20 steps (configs/ms1mv3_r50.py)",
        "doctor: training",
        "  samples/s    100.0 (steps 6-20, global batch 256)",
        "  peak memory  30.00 GiB (rank 0's peak allocated)",
        "  loss         39.5000 -> 30.0000 over 20 steps: moved (down)",
        "doctor: OK: cuda x2 trained 20 steps"]


@pytest.mark.parametrize("returncode, stdout, stderr, message", [
    (0, "".join(doctor_status(step, "41.0000") for step in range(1, 21)), "",
     "doctor: problem: the loss did not move (41.0000 -> 41.0000 over 20 steps)"),
    (0, "".join(doctor_status(step, "nan" if step > 3 else "41.0") for step in range(1, 21)), "",
     "doctor: problem: the loss not finite (41.0000 -> nan over 20 steps)"),
    (0, doctor_status(1, "41.0"), "", "doctor: problem: train.py logged 1 of 20 steps"),
    (2, "", "error: config key 'rec': ...\n", "doctor: the training run failed (exit 2): error: config key 'rec': ..."),
    (1, "", "Traceback (most recent call last):\nRuntimeError: NCCL error: unhandled system error\n",
     "doctor: the training run failed (exit 1): RuntimeError: NCCL error: unhandled system error"),
])
def test_doctor_exits_non_zero_when_the_run_fails_or_the_loss_stays(monkeypatch, capsys, returncode, stdout, stderr,
                                                                    message):
    from tools.benchmarks import doctor

    monkeypatch.setattr(doctor, "print_environment", lambda: None)
    fake_train(monkeypatch, returncode, stdout, stderr)
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["doctor", "--network", "tiny", "--device", "cpu"])
    assert exc.value.code == message
    if returncode:
        assert stderr.strip().splitlines()[-1] in capsys.readouterr().err  # the run's own last lines are shown


# ---------------------------------------------------------------------------- eval


@pytest.mark.timeout(120)
def test_eval_bin_extrapolated_and_ijb(capsys):
    # 20 images = 10 pairs: the fewest the 10-fold verification metrics accept.
    benchmark.main(["eval", "--network", "tiny", "--num-images", "20", "--batch-size", "4", "--embed-images", "4",
                    "--ijb-pairs", "200", "--ijb-templates", "10", "--embedding-size", "16"])
    out = capsys.readouterr().out
    assert "verification .bin: 20 images, tiny, batch 4, device cpu, torch threads 1" in out
    decode = re.search(rf"decode \(load_bin, measured\):\s+{NUMBER} s\s+\({NUMBER} img/s\)", out)
    embed = re.search(rf"embed image\+flip \(extrapolated from 4 images\):\s+{NUMBER} s\s+\({NUMBER} forward img/s; "
                      rf"measured {NUMBER} s for 4 images x 2\)", out)
    metrics = re.search(rf"metrics \(Accuracy \+ Accuracy-Flip \+ VAL, measured\):\s+{NUMBER} s", out)
    total = re.search(rf"total:\s+{NUMBER} s", out)
    assert decode and embed and metrics and total, out
    positive(decode.group(2))
    positive(embed.group(2))
    parts = [float(decode.group(1)), float(embed.group(1)), float(metrics.group(1)), float(total.group(1))]
    assert all(math.isfinite(part) and part >= 0 for part in parts)  # printed to 2-3 decimals: may be 0.00
    check_ijb(out, pairs=200, templates=10, dim=16)


class FakeClock:
    """Stands in for the ``time`` module of a benchmark: the clock moves only when a stage says it took time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def took(self, seconds: float, function):
        """``function`` wrapped so that each call also advances the clock by ``seconds(*args, **kwargs)``."""
        def wrapped(*args, **kwargs):
            self.now += seconds(*args, **kwargs)
            return function(*args, **kwargs)
        return wrapped


@pytest.mark.timeout(120)
def test_eval_figures_follow_known_stage_times(monkeypatch, capsys):
    # Each stage takes a known time on a fake clock, so every printed figure has an exact expected value:
    # decode 3 s, 0.25 s per embedded view, metrics 0.5 s, pair scores 0.2 s, ROC 0.1 s.
    import eval.embed
    import eval.ijb_scores
    import eval.metrics
    import eval.verification

    clock = FakeClock()
    monkeypatch.setattr(eval_bench, "time", clock)
    monkeypatch.setattr(eval.verification, "load_bin", clock.took(lambda *a, **k: 3.0, eval.verification.load_bin))
    monkeypatch.setattr(eval.embed, "embed_images", clock.took(
        lambda model, images, *a, flip=True, **k: 0.25 * images.shape[0] * (2 if flip else 1), eval.embed.embed_images))
    monkeypatch.setattr(eval.metrics, "verification_metrics",
                        clock.took(lambda *a, **k: 0.5, eval.metrics.verification_metrics))
    monkeypatch.setattr(eval.ijb_scores, "pair_scores", clock.took(lambda *a, **k: 0.2, eval.ijb_scores.pair_scores))
    monkeypatch.setattr(eval.ijb_scores, "tar_at_far", clock.took(lambda *a, **k: 0.1, eval.ijb_scores.tar_at_far))
    benchmark.main(["eval", "--network", "tiny", "--num-images", "20", "--batch-size", "4", "--embed-images", "4",
                    "--ijb-pairs", "200", "--ijb-templates", "10", "--embedding-size", "16"])
    out = capsys.readouterr().out
    expected = [
        r"decode \(load_bin, measured\):\s+3\.00 s\s+\(7 img/s\)",  # 20 images / 3 s
        # 4 images x 2 views x 0.25 s = 2 s measured; 20 images -> 10 s; 8 forwards / 2 s = 4 img/s
        r"embed image\+flip \(extrapolated from 4 images\):\s+10\.00 s\s+\(4\.0 forward img/s; "
        r"measured 2\.00 s for 4 images x 2\)",
        r"metrics \(Accuracy \+ Accuracy-Flip \+ VAL, measured\):\s+0\.500 s",
        r"total:\s+13\.50 s",  # 3 + 10 + 0.5
        r"cosine scores \(chunks of 8192\): 0\.200 s  = 1000\.000 s per million pairs",  # 200 pairs
        r"ROC \+ TAR@FAR table:\s+0\.100 s  = 500\.000 s per million pairs",
    ]
    for pattern in expected:
        assert re.search(pattern, out), f"{pattern}\n{out}"


@pytest.mark.timeout(60)
def test_eval_skip_bin_only_scores_ijb(capsys):
    benchmark.main(["eval", "--skip-bin", "--ijb-pairs", "1000", "--ijb-templates", "30", "--embedding-size", "8"])
    out = capsys.readouterr().out
    assert "verification .bin" not in out
    check_ijb(out, pairs=1000, templates=30, dim=8)


def test_eval_fewest_ijb_pairs_have_both_labels(capsys):
    # 1% genuine at random gave two pairs no genuine one (IJBError from the ROC); the first two are fixed to 1, 0.
    benchmark.main(["eval", "--skip-bin", "--ijb-pairs", "2", "--ijb-templates", "1", "--embedding-size", "4"])
    check_ijb(capsys.readouterr().out, pairs=2, templates=1, dim=4)


@pytest.mark.parametrize("argv, message", [
    (["--num-images", "8"], "--num-images 8: expected an even number >= 20 (10-fold verification needs at least "
                            "10 pairs of 2 images)"),  # was ValueError: cannot split 4 pairs into 10 folds
    (["--num-images", "21"], "--num-images 21: expected an even number >= 20 (10-fold verification needs at least "
                             "10 pairs of 2 images)"),  # was VerificationError: 10 pairs need 20 images
    (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    (["--skip-bin", "--num-images", "8", "--ijb-pairs", "1"], "--ijb-pairs 1: expected at least 2 (one genuine "
                                                              "and one impostor pair)"),
    (["--skip-bin", "--ijb-templates", "0"], "--ijb-templates 0: expected a positive integer"),
])
def test_eval_bad_sizes_are_rejected_up_front(monkeypatch, argv, message):
    monkeypatch.setattr(eval_bench, "bench_bin", lambda args: pytest.fail("ran the .bin benchmark"))
    monkeypatch.setattr(eval_bench, "bench_ijb", lambda args: pytest.fail("ran the IJB benchmark"))
    assert one_line_error(["eval"] + argv) == message


def check_ijb(out: str, pairs: int, templates: int, dim: int) -> None:
    assert f"IJB scoring: {pairs} pairs over {templates} templates, dim {dim}" in out
    for label in ("cosine scores \\(chunks of 8192\\):", "ROC \\+ TAR@FAR table:"):
        match = re.search(rf"{label}\s+{NUMBER} s\s+= {NUMBER} s per million pairs", out)
        assert match, out
        seconds, per_million = float(match.group(1)), float(match.group(2))
        assert math.isfinite(seconds) and seconds >= 0 and math.isfinite(per_million) and per_million >= 0


# ---------------------------------------------------------------------------- detect


@pytest.mark.timeout(120)
def test_detect_onnx_times_the_onnxruntime_detector_beside_torch(facenet_fixtures, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tools import mtcnn2onnx

    mtcnn2onnx.export_mtcnn(str(tmp_path / "onnx"))
    photo = f"{facenet_fixtures}/images/paul_rudd.png"
    benchmark.main(["detect", "--images", photo, "--rounds", "2", "--warmup", "0", "--onnx", str(tmp_path / "onnx")])
    out = capsys.readouterr().out
    assert re.match(r"detect benchmark: 1 photos, 2 rounds \(\+0 warm-up\), 1 torch threads, torch \S+, reference "
                    r"onnxruntime \S+, load [\d.]+ [\d.]+ [\d.]+\n", out), out
    row = re.search(rf"^paul_rudd.png\s+512x640\s+1\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+"
                    rf"{NUMBER}\s+(\S+)$", out, re.MULTILINE)
    assert row, out
    assert all(positive(row.group(i)) for i in range(1, 5))
    assert float(row.group(7)) < 0.5  # torch and onnxruntime find the same box
    assert re.search(r"^load average at the end: [\d.]+ [\d.]+ [\d.]+$", out, re.MULTILINE), out
    with pytest.raises(SystemExit, match=r"^error: .*pnet\.onnx: ONNX file not found"):
        benchmark.main(["detect", "--images", photo, "--onnx", str(tmp_path / "missing")])


@pytest.mark.timeout(120)
def test_detect_breakdown_splits_the_time_between_the_three_networks_and_the_rest(facenet_fixtures, capsys):
    from tools.benchmarks import detect as detect_bench
    from utils.faces.mtcnn import MTCNN

    detector = MTCNN()
    nets = detector.pnet, detector.rnet, detector.onet
    photo = cv2.cvtColor(cv2.imread(f"{facenet_fixtures}/images/paul_rudd.png"), cv2.COLOR_BGR2RGB)
    before = detector.detect(photo)
    calls = []
    pnet_heads = nets[0].heads
    nets[0].heads = lambda *args: calls.append("pnet") or pnet_heads(*args)  # the wrapped runner does the work
    try:
        (row,) = detect_bench.breakdown(detector, [photo], rounds=2)
    finally:
        del nets[0].heads
    assert calls and (detector.pnet, detector.rnet, detector.onet) == nets  # the networks are put back
    np.testing.assert_array_equal(detector.detect(photo)[0], before[0])
    assert row["pnet"] > 0 and row["rnet"] > 0 and row["onet"] > 0 and row["other"] > 0  # a face: all three ran
    assert row["pnet"] + row["rnet"] + row["onet"] + row["other"] == pytest.approx(row["total"], rel=0.3)
    benchmark.main(["detect", "--images", f"{facenet_fixtures}/images/blank.png", "--rounds", "1", "--warmup", "0",
                    "--no-reference", "--breakdown"])
    out = capsys.readouterr().out
    line = re.search(rf"^blank.png\s+{NUMBER}\s+{NUMBER} \(\s*\d+%\)\s+{NUMBER} \(\s*\d+%\)\s+{NUMBER} "
                     rf"\(\s*\d+%\)\s+{NUMBER} \(\s*\d+%\)\s+{NUMBER}$", out, re.MULTILINE)
    assert line, out
    total, pnet, rnet, onet, other = (float(line.group(i)) for i in range(1, 6))
    assert pnet > 0 and rnet == onet == 0  # no PNet candidate on the blank photo: RNet and ONet never run
    assert pnet + other == pytest.approx(total, abs=0.11)


@pytest.mark.timeout(120)
def test_detect_with_a_stand_in_reference(facenet_fixtures, monkeypatch, capsys):
    from tools.benchmarks import detect as detect_bench
    from utils.faces.mtcnn import MTCNN

    # facenet-pytorch is not installed here: a second MTCNN stands in, so the comparison columns are exercised
    other = MTCNN()
    monkeypatch.setattr(detect_bench, "_reference_detector", lambda: (lambda image: other.detect(image)[0]))
    photo = f"{facenet_fixtures}/images/shea_whigham.png"
    benchmark.main(["detect", "--images", photo, "--rounds", "2", "--warmup", "0"])
    out = capsys.readouterr().out
    assert out.startswith("detect benchmark: 1 photos, 2 rounds (+0 warm-up), 1 torch threads"), out
    row = re.search(rf"^shea_whigham.png\s+527x512\s+1\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+"
                    rf"{NUMBER}\s+(\S+)$", out, re.MULTILINE)
    assert row, out
    wall, cpu, ref_wall, ref_cpu = (positive(row.group(i)) for i in range(1, 5))
    assert float(row.group(5)) == pytest.approx(wall / ref_wall, abs=0.01)
    assert float(row.group(6)) == pytest.approx(cpu / ref_cpu, abs=0.01)
    assert float(row.group(7)) == 0  # the same detector: identical boxes
    total = re.search(rf"^total \(sum of medians\)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", out, re.MULTILINE)
    assert [float(total.group(i)) for i in range(1, 5)] == pytest.approx([wall, cpu, ref_wall, ref_cpu], abs=0.11)


def test_detect_torchvision_stand_ins_are_exact_and_removed_afterwards(monkeypatch):
    import importlib.util
    import sys

    import numpy as np

    from tools.benchmarks import detect as detect_bench
    from utils.faces.mtcnn import nms

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision"
                        else real_find_spec(name, *a))

    def load():
        from torchvision.ops.boxes import batched_nms
        from torchvision.transforms.functional import to_tensor
        return batched_nms, to_tensor

    batched_nms, to_tensor = detect_bench._with_torchvision_stand_ins(load)
    assert "torchvision" not in sys.modules
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores, groups = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 0, 1, 0])
    assert batched_nms(boxes, scores, groups, 0.5).tolist() == [0, 2, 3] == nms(boxes, scores, 0.5, groups).tolist()
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert torch.equal(to_tensor(image), torch.from_numpy(image).permute(2, 0, 1).float() / 255)


@pytest.mark.timeout(120)
def test_detect_sized_photo_set_is_cut_around_the_faces_of_the_real_photos(facenet_fixtures, tmp_path):
    from tools.benchmarks import detect_photos
    from utils.faces.mtcnn import MTCNN

    paths = detect_photos.make_photo_set(f"{facenet_fixtures}/images", str(tmp_path / "set"))
    assert len(paths) == 18 and sorted(os.listdir(tmp_path / "set")) == [os.path.basename(p) for p in paths]
    assert paths[0].endswith("00_angelina_jolie_320x240.png") and paths[-1].endswith("17_multiface_800x800.png")
    detector = MTCNN()
    for path, (width, height) in zip(paths, detect_photos.SIZES):
        image = cv2.imread(path)
        assert image.shape == (height, width, 3), path
        assert len(detector.detect(image[:, :, ::-1].copy())[0]) >= 1, path  # every crop kept a face
    # photo 0: angelina_jolie (512x630) cut to 4:3 = 512x384 rows 15..399 (centred on her face, rows 69-345),
    # then shrunk to 320x240 with INTER_AREA
    source = cv2.imread(f"{facenet_fixtures}/images/angelina_jolie.png")
    expected = cv2.resize(source[15:399, 0:512], (320, 240), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(cv2.imread(paths[0]), expected)


@pytest.mark.timeout(120)
def test_detect_batch_times_detect_batch_against_the_reference_loop_and_breakdown_rates(facenet_fixtures,
                                                                                        monkeypatch, capsys):
    from tools.benchmarks import detect as detect_bench
    from utils.faces.mtcnn import MTCNN

    other, calls, threads = MTCNN(), [], set()

    def reference(image):
        calls.append(image.shape)
        threads.add(torch.get_num_threads())
        return other.detect(image)[0]

    def batch_mode(images):  # like facenet-pytorch's: it stacks the photos, so mixed sizes fail
        return np.stack(images)

    reference.detect_many = batch_mode
    monkeypatch.setattr(detect_bench, "_reference_detector", lambda: reference)
    photos = [f"{facenet_fixtures}/images/{name}.png" for name in ("shea_whigham", "blank")]
    benchmark.main(["detect", "--images", *photos, "--rounds", "1", "--warmup", "0", "--batch", "--breakdown",
                    "--workers", "2"])
    out = capsys.readouterr().out
    ours = re.search(rf"^  arcscale\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}/s  MTCNN.detect_batch$", out, re.MULTILINE)
    theirs = re.search(rf"^  facenet-pytorch\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}/s  per-photo loop \(its batch mode "
                       rf"failed: ValueError\)$", out, re.MULTILINE)
    assert ours and theirs, out
    assert float(ours.group(3)) == pytest.approx(2 / (positive(ours.group(1)) / 1000), rel=0.05)
    ratio = re.search(rf"throughput ArcScale / facenet-pytorch \(CPU\): {NUMBER}x", out)
    assert float(ratio.group(1)) == pytest.approx(positive(theirs.group(1)) / positive(ours.group(1)), rel=0.02)
    assert calls.count((512, 527, 3)) >= 5  # the table's rounds, then the loops of two folder timings (warm-up + 1)
    # the whole machine: detect_batch on 2 threads against the reference's loop on 2 torch threads, wall-clock
    ours = re.search(rf"^  arcscale\s+{NUMBER}\s+{NUMBER}/s  MTCNN.detect_batch\(workers=2\)$", out, re.MULTILINE)
    theirs = re.search(rf"^  facenet-pytorch\s+{NUMBER}\s+{NUMBER}/s  2 torch threads$", out, re.MULTILINE)
    assert ours and theirs, out
    assert float(ours.group(2)) == pytest.approx(2 / (positive(ours.group(1)) / 1000), rel=0.05)
    ratio = re.search(rf"throughput ArcScale / facenet-pytorch \(wall, 2 cores each\): {NUMBER}x", out)
    assert float(ratio.group(1)) == pytest.approx(positive(theirs.group(1)) / positive(ours.group(1)), rel=0.02)
    assert threads == {1, 2} and torch.get_num_threads() == 1  # the reference got 2 threads there, then 1 again
    rates = re.search(rf"fp32 GEMM {NUMBER} GFLOP/s, 3x3 convolution {NUMBER} GFLOP/s", out)
    assert positive(rates.group(1)) and positive(rates.group(2))
    rnet = re.search(rf"^  rnet:\s+{NUMBER} GFLOP in\s+{NUMBER} ms =\s+{NUMBER} GFLOP/s", out, re.MULTILINE)
    assert float(rnet.group(3)) == pytest.approx(float(rnet.group(1)) / float(rnet.group(2)) * 1000, rel=0.05)


def test_detect_network_flops_are_the_layers_multiply_adds(facenet_fixtures):
    from tools.benchmarks.detect_rates import network_flops
    from utils.faces.mtcnn import MTCNN

    detector = MTCNN()
    seen = []
    rnet = detector.rnet.forward
    detector.rnet.forward = lambda x: seen.append(len(x)) or rnet(x)
    photo = cv2.imread(f"{facenet_fixtures}/images/paul_rudd.png")[:, :, ::-1].copy()
    flops = network_flops(detector, photo)
    # RNet per 24x24 crop: three convolutions and the three dense layers
    per_crop = 2 * (22 * 22 * 28 * 27 + 9 * 9 * 48 * 252 + 3 * 3 * 64 * 192 + 576 * 128 + 128 * 2 + 128 * 4)
    assert flops["rnet"] == per_crop * sum(seen) and sum(seen) > 0
    assert flops["pnet"] > 0 and flops["onet"] > 0
    assert not any(module._forward_hooks for module in detector.rnet.modules())  # the hooks are removed


def test_detect_missing_images_is_a_one_line_error(tmp_path):
    assert one_line_error(["detect", "--images", str(tmp_path / "nowhere")]) == (
        f"--images {tmp_path / 'nowhere'}: no such file or folder")
    assert one_line_error(["detect", "--images", str(tmp_path)]) == (
        f"--images {tmp_path}: no .jpg/.jpeg/.png/.bmp/.webp photos in this folder")


def test_detect_bad_worker_count_is_a_one_line_error():
    assert one_line_error(["detect", "--batch", "--workers", "0"]) == "--workers 0: expected at least 1"


# ---------------------------------------------------------------------------- snapshot


@pytest.mark.timeout(120)
def test_snapshot_prints_step_and_copy_times_and_shares(capsys):
    benchmark.main(["snapshot", "--network", "tiny", "--batch", "4", "--classes", "16", "--embedding", "32",
                    "--device", "cpu", "--iters", "1", "--intervals", "10,25"])
    out = capsys.readouterr().out
    step = positive(re.search(rf"training step\s+{NUMBER} ms", out).group(1))
    copy = re.search(rf"snapshot \(host copy\)\s+{NUMBER} ms\s+{NUMBER} MiB", out)
    snapshot, mib = positive(copy.group(1)), positive(copy.group(2))
    shares = [float(m.group(2)) for m in lines_matching(out, rf"every\s+(\d+) steps\s+{NUMBER} %")]
    # the copy once per interval, over the interval's steps (times printed to 0.1 ms: a loose check there)
    assert len(shares) == 2 and shares[0] == pytest.approx(100 * snapshot / (10 * step), rel=0.5, abs=2e-3)
    assert shares[0] == pytest.approx(2.5 * shares[1], rel=0.05, abs=2e-3)
    assert mib > 0.01  # the tiny backbone, 16 rows x 32 and their momentum
