"""utils/logging_utils.py: what rank 0 logs before training.log exists still reaches it."""
import logging

import pytest

from utils.run.log import attach_log_file, setup_logging


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_records_before_the_log_file_is_attached_are_written_to_it_first(tmp_path, restore_root_logger):
    setup_logging(0)
    logging.getLogger("startup").warning("skipping unusable checkpoint: checkpoint_step000000011.pt")
    logging.getLogger("startup").info("resumed from checkpoint_step000000010.pt")
    attach_log_file(0, str(tmp_path))
    logging.getLogger("train").info("step 11/40")
    lines = (tmp_path / "training.log").read_text().splitlines()
    assert [line.split(" ", 5)[-1] for line in lines] == [
        "skipping unusable checkpoint: checkpoint_step000000011.pt", "resumed from checkpoint_step000000010.pt",
        "step 11/40"]
    assert "WARNING" in lines[0]
    attach_log_file(0, str(tmp_path / "again"))  # a second file does not get the early records again
    logging.getLogger("train").info("step 12/40")
    assert (tmp_path / "again" / "training.log").read_text().splitlines()[0].endswith("step 12/40")


def test_other_ranks_keep_no_startup_records_and_write_no_file(tmp_path, restore_root_logger):
    setup_logging(1)
    logging.getLogger("startup").warning("a rank-1 warning")
    attach_log_file(1, str(tmp_path))
    assert not (tmp_path / "training.log").exists()


def test_a_training_log_on_a_full_disk_is_said_once_without_tracebacks(tmp_path, restore_root_logger, capsys):
    (tmp_path / "training.log").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    setup_logging(0)
    attach_log_file(0, str(tmp_path))
    for step in range(1, 4):
        logging.getLogger("train").info("step %d/40", step)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Logging error" not in captured.err, captured.err
    said = [line for line in captured.err.splitlines() if "cannot write" in line]
    assert len(said) == 1 and "training.log" in said[0] and "No space left on device" in said[0], captured.err
    assert [line.rsplit(" ", 1)[-1] for line in captured.out.splitlines()] == ["1/40", "2/40", "3/40"]
