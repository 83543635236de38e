"""utils/config.py: base + job config layering, --set overrides, unknown keys."""
import os

import pytest

from utils.config import ConfigError, load_config, parse_override, to_plain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp_path, body: str, name: str = "job.py") -> str:
    path = tmp_path / name
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\n" + body)
    return str(path)


def test_job_config_layers_over_base_and_output_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path, "config.network = 'r18'\nconfig.synthetic = dict(num_identities=7)\n", "my_exp.py"))
    assert cfg.network == "r18"
    assert cfg.lr == 0.1  # from base.py
    assert cfg.synthetic.num_identities == 7 and cfg.synthetic.images_per_identity == 0  # nested merge keeps siblings
    assert cfg.output == os.path.join("work_dirs", "my_exp")
    assert cfg.config_name == "my_exp"


def test_overrides_use_literal_syntax_and_bare_words(tmp_path):
    cfg = load_config(write_config(tmp_path, ""), ["lr=0.2", "fp16=True", "val_targets=['lfw']", "network=r100",
                                                   "synthetic.num_val_pairs=30", "output=/tmp/x y"])
    assert cfg.lr == 0.2 and cfg.fp16 is True and cfg.val_targets == ["lfw"]
    assert cfg.network == "r100" and cfg.synthetic.num_val_pairs == 30 and cfg.output == "/tmp/x y"


@pytest.mark.parametrize("body, overrides, message", [
    ("config.lerning_rate = 0.1\n", [], r"job.py: unknown config key 'lerning_rate'"),
    ("config.netwrok = 'r50'\n", [], r"unknown config key 'netwrok'; did you mean 'network'\?"),
    ("config.synthetic = dict(num_identity=3)\n", [], r"unknown config key 'synthetic.num_identity'; did you mean 'synthetic.num_identities'\?"),
    ("", ["sample_rat=0.1"], r"--set: unknown config key 'sample_rat'; did you mean 'sample_rate'\?"),
    ("", ["lr"], r"--set 'lr': expected key=value"),
])
def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path, body, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, body), overrides)


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.py"):
        load_config(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match="cannot execute config: SyntaxError"):
        load_config(write_config(tmp_path, "config.lr = (\n"))
    bad = tmp_path / "noconfig.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="expected a module-level `config`"):
        load_config(str(bad))


def test_every_shipped_config_loads():
    configs = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py") and f != "base.py")
    assert "demo_cpu.py" in configs and "glint360k_r100_32p.py" in configs
    for name in configs:
        cfg = load_config(os.path.join(REPO, "configs", name))
        assert cfg.network and cfg.output.endswith(name[:-3])


def test_parse_override_and_to_plain():
    assert parse_override("margin_list=(1.0, 0.0, 0.4)") == ("margin_list", (1.0, 0.0, 0.4))
    assert to_plain({"a": (1, 2), "b": {"c": [3]}}) == {"a": [1, 2], "b": {"c": [3]}}
