"""utils/config.py: base + job config layering, --set overrides, unknown keys."""
import os

import pytest

from utils.config.load import load_config, parse_override, to_plain
from utils.config.rules import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


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
    ("config.synthetic = dict(num_identity=3)\n", [], r"unknown config key 'synthetic.num_identity'; did you mean "
                                                       r"'synthetic.num_identities' or 'synthetic.num_val_identities'\?"),
    ("", ["sample_rat=0.1"], r"--set: unknown config key 'sample_rat'; did you mean 'sample_rate'( or '\w+')?\?$"),
    ("", ["lr_rate=0.1"], r"--set: unknown config key 'lr_rate'; did you mean 'lr_\w+' or 'lr'\?$"),
    ("", ["lrr=0.1"], r"--set: unknown config key 'lrr'; did you mean 'lr'\?$"),
    ("", ["lr"], r"--set 'lr': expected key=value"),
])
def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path, body, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, body), overrides)


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.py"):
        load_config(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match=r"job.py:3: cannot execute config: SyntaxError: '\(' was never closed$"):
        load_config(write_config(tmp_path, "config.lr = (\n"))
    with pytest.raises(ConfigError, match=r"job.py:4: cannot execute config: ZeroDivisionError: division by zero$"):
        load_config(write_config(tmp_path, "x = 1\nconfig.lr = x / 0\n"))
    with pytest.raises(ConfigError, match=r"job.py:3: cannot execute config: ModuleNotFoundError: "
                                          r"No module named 'no_such_module_xyz'$"):
        load_config(write_config(tmp_path, "import no_such_module_xyz\n"))
    (tmp_path / "helper_mod_xyz.py").write_text("x = (\n")
    with pytest.raises(ConfigError, match=r"job.py: cannot execute config: SyntaxError in .*helper_mod_xyz.py:1: "):
        load_config(write_config(tmp_path, "import sys\nsys.path.insert(0, %r)\nimport helper_mod_xyz\n"
                                 % str(tmp_path)))
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


@pytest.mark.parametrize("body, overrides, message", [
    ("config.lr = '0.1'\n", [], r"job.py: config key 'lr': expected a number > 0, got '0.1' \(str\)$"),
    ("", ["batch_size='16'"], r"^--set: config key 'batch_size': expected an integer >= 1, got '16' \(str\)$"),
    ("", ["batch_size=0"], r"^--set: config key 'batch_size': expected an integer >= 1, got 0 \(int\)$"),
    ("", ["batch_size=16.0"], r"'batch_size': expected an integer >= 1, got 16.0 \(float\)$"),
    ("", ["lr=-1"], r"'lr': expected a number > 0, got -1 \(int\)$"),
    ("", ["num_workers=-1"], r"'num_workers': expected an integer >= 0, got -1 \(int\)$"),
    ("", ["num_epoch=0"], r"'num_epoch': expected an integer >= 1, got 0"),
    ("", ["sample_rate=1.5"], r"'sample_rate': expected a number in \(0, 1\], got 1.5 \(float\)$"),
    ("", ["sample_rate=0"], r"'sample_rate': expected a number in \(0, 1\], got 0 \(int\)$"),
    ("", ["keep_checkpoints=-1"], r"'keep_checkpoints': expected an integer >= 0"),
    ("", ["fp16=1"], r"'fp16': expected True or False, got 1 \(int\)$"),
    ("", ["optimizer=sgdd"], r"'optimizer': expected one of 'sgd', 'adamw'.*, got 'sgdd' \(str\)$"),
    ("", ["device=gpu"], r"'device': expected one of 'auto', 'cuda', 'npu', 'cpu', got 'gpu'"),
    ("", ["pfc_update=full"], r"'pfc_update': expected one of 'sparse', 'dense', got 'full'"),
    ("", ["head=arcface"], r"'head': expected one of 'combined', 'adaface', 'curricularface'.*, got 'arcface'"),
    ("", ["margin_list=(1.0, 0.5)"], r"'margin_list': expected a list or tuple of 3 numbers, got \(1.0, 0.5\)"),
    ("", ["val_targets=lfw"], r"'val_targets': expected a list or tuple of strings, got 'lfw' \(str\)$"),
    ("", ["image_size=(112, 0)"], r"'image_size': expected an integer >= 1 or a \(height, width\) pair"),
    ("", ["num_classes=0"], r"'num_classes': expected an integer >= 1 or None, got 0"),
    ("", ["output=5"], r"'output': expected a string or None, got 5 \(int\)$"),
    ("", ["synthetic.num_val_pairs=-3"], r"'synthetic.num_val_pairs': expected an integer >= 0, got -3"),
    ("config.synthetic = 3\n", [], r"job.py: config key 'synthetic': expected a dict of num_identities, "),
    ("", ["max_bad_records=2.5"], r"'max_bad_records': expected a fraction of the data below 1 \(e.g. 0.001\) or a "
                                  r"whole number of records \(e.g. 10\), got 2.5 \(float\)$"),
    ("", ["max_bad_records=-0.1"], r"'max_bad_records': expected a fraction of the data below 1 .*, got -0.1"),
    ("", ["max_bad_records=True"], r"'max_bad_records': expected a fraction .*, got True \(bool\)$"),
    ("config.fp16 = True\n", ["bf16=True"], r"config keys 'fp16' and 'bf16': both True"),
    ("config.bf16 = True\n", ["fp16_grad_compression=True"],
     r"^config keys 'fp16_grad_compression' and 'bf16': both True; fp16 buckets would flush"),
    ("", ["cudnn_benchmark=1"], r"'cudnn_benchmark': expected True or False, got 1 \(int\)$"),
    ("", ["allow_tf32='yes'"], r"'allow_tf32': expected True or False, got 'yes' \(str\)$"),
])
def test_wrong_types_and_ranges_are_one_line_errors(tmp_path, body, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write_config(tmp_path, body), overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["0", "0.001", "0.5", "1", "1.0", "3", "250"])
def test_max_bad_records_takes_a_fraction_or_a_count(tmp_path, value):
    assert load_config(write_config(tmp_path, ""), [f"max_bad_records={value}"]).max_bad_records == float(value)


NETWORKS = ("r18", "r34", "r50", "r100", "mbf", "mbf_large", "tiny")


@pytest.mark.parametrize("body, overrides, message", [
    ("", ["network=r5O"], "--set: config key 'network': unknown network 'r5O'; did you mean 'r50'? (expected one of "
                          "r18, r34, r50, r100, mbf, mbf_large, tiny)"),
    ("config.network = 'mbf_larg'\n", [], "{job}: config key 'network': unknown network 'mbf_larg'; did you mean "
                                          "'mbf_large'? (expected one of r18, r34, r50, r100, mbf, mbf_large, tiny)"),
    ("", ["network=R34"], "--set: config key 'network': unknown network 'R34'; did you mean 'r34'? (expected one of "
                          "r18, r34, r50, r100, mbf, mbf_large, tiny)"),
    ("", ["network=resnet"], "--set: config key 'network': unknown network 'resnet' (expected one of r18, r34, r50, "
                             "r100, mbf, mbf_large, tiny)"),
    ("", ["network=None"], "--set: config key 'network': expected a string, got None (NoneType)"),
])
def test_a_value_outside_a_registry_is_refused_with_a_suggestion(tmp_path, body, overrides, message):
    job = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(job, overrides, known_values={"network": NETWORKS})
    assert str(info.value) == message.format(job=job)
    assert load_config(job, ["network=r50"], known_values={"network": NETWORKS}).network == "r50"


def test_valid_values_of_other_types_are_accepted(tmp_path):
    cfg = load_config(write_config(tmp_path, "config.lr = 1\n"), [
        "image_size=96", "num_classes=10", "lr_per_512=0.2", "log_level=debug", "val_targets=('lfw', 'cfp_fp')",
        "warmup_epoch=0.5", "output=None", "sample_rate=1"])
    assert cfg.lr == 1 and cfg.image_size == 96 and cfg.num_classes == 10 and cfg.lr_per_512 == 0.2
    assert cfg.warmup_epoch == 0.5 and cfg.output == os.path.join("work_dirs", "job")


def test_a_later_override_can_fix_a_job_value(tmp_path):
    cfg = load_config(write_config(tmp_path, "config.batch_size = 0\n"), ["batch_size=8"])
    assert cfg.batch_size == 8  # validated once, after every layer


def test_new_keys_take_their_type_from_the_default(tmp_path):
    base = tmp_path / "base.py"
    base.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.output = None\n"
                    "config.fancy_count = 3\nconfig.fancy_ratio = 0.5\nconfig.fancy_mode = 'a'\n"
                    "config.fancy_anything = None\nconfig.fancy_flag = False\n")
    job = write_config(tmp_path, "config.fancy_ratio = 2\nconfig.fancy_anything = [1, 'x']\n")
    cfg = load_config(job, base_path=str(base))
    assert cfg.fancy_ratio == 2 and cfg.fancy_anything == [1, "x"]  # int for a float; None default: no check
    for override, message in [("fancy_count=1.5", r"'fancy_count': expected an integer, got 1.5 \(float\)"),
                              ("fancy_ratio='x'", r"'fancy_ratio': expected a number, got 'x'"),
                              ("fancy_mode=3", r"'fancy_mode': expected a string, got 3"),
                              ("fancy_flag=None", r"'fancy_flag': expected True or False, got None")]:
        with pytest.raises(ConfigError, match=message):
            load_config(job, [override], base_path=str(base))


def test_set_values_are_literals_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    key, value = parse_override(f"network={payload}")
    assert (key, value) == ("network", payload) and not marker.exists()  # kept as the plain string
    with pytest.raises(ConfigError, match=r"'lr': expected a number > 0, got \"__import__"):
        load_config(write_config(tmp_path, ""), [f"lr={payload}"])
    assert parse_override("lr=(lambda: 1)()") == ("lr", "(lambda: 1)()")
    assert not marker.exists()


def test_suggestions_rank_shared_prefix_first():
    from utils.config.load import suggest_keys
    keys = ["lr", "lr_power", "lr_steps", "sample_rate", "network", "batch_size"]
    assert suggest_keys("lr_rate", keys) == ["lr_power", "lr"]
    assert suggest_keys("lr_step", keys) == ["lr_steps", "lr"]
    assert suggest_keys("batchsize", keys) == ["batch_size"]
    assert suggest_keys("completely_different", keys) == []


def test_output_under_a_file_is_refused_at_load(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"^--set: config key 'output': cannot create {blocker}/run: {blocker} is "
                                          r"a file, not a folder$"):
        load_config(write_config(tmp_path, ""), [f"output={str(blocker / 'run')!r}"])
    assert not (blocker.parent / "run").exists()
    cfg = load_config(write_config(tmp_path, f"config.output = {str(tmp_path / 'new' / 'run')!r}\n"))
    assert cfg.output == str(tmp_path / "new" / "run") and not (tmp_path / "new").exists()  # checked, not created


def test_string_choices_documented_in_base_are_accepted(tmp_path):
    from utils.config.rules import documented_choices
    base = tmp_path / "base.py"
    base.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.output = None\n"
                    "config.optimizer = 'sgd'        # sgd | adamw | lion (a new one, documented here)\n"
                    "config.mode = 'a'  # a | b\n"
                    "config.rec = 'synthetic'  # \"synthetic\" | folder with files\n"
                    "config.note = 'x'  # free text, x | y is not an option list when the default is absent\n")
    assert documented_choices(str(base)) == {"optimizer": ("sgd", "adamw", "lion"), "mode": ("a", "b")}
    job = write_config(tmp_path, "config.optimizer = 'lion'\nconfig.rec = '/data/x'\nconfig.note = 'free'\n")
    assert load_config(job, base_path=str(base)).optimizer == "lion"
    with pytest.raises(ConfigError, match=r"'mode': expected one of 'a', 'b', got 'c' \(str\)$"):
        load_config(job, ["mode=c"], base_path=str(base))
    with pytest.raises(ConfigError, match=r"'optimizer': expected one of 'sgd', 'adamw', 'adam', 'lion', got 'x'"):
        load_config(job, ["optimizer=x"], base_path=str(base))


def test_every_unknown_key_is_named_in_one_message(tmp_path):
    body = "config.netwrok = 'r50'\nconfig.lerning_rate = 0.1\nconfig.batchsize = 8\nconfig.num_identities = 3\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, body), ["sample_rat=0.1", "lr=0.2"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'job.py'}: 4 unknown config keys: 'netwrok' (did you mean 'network'?), "
                              "'lerning_rate', 'batchsize' (did you mean 'batch_size'?), 'num_identities' (did you "
                              "mean 'synthetic.num_identities'?)")  # a nested key whose name is close
    assert message.endswith("; --set: unknown config key 'sample_rat'; did you mean 'sample_rate' or 'sampler'?")


# Every key of arcface_torch's configs/base.py (insightface master), each set to a value of its type.
ARCFACE_TORCH_BASE = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": "ms1mv3_arcface_r50", "embedding_size": 512, "sample_rate": 1, "interclass_filtering_threshold": 0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "dali": False, "gradient_acc": 1, "seed": 2048, "num_workers": 2,
    "wandb_key": "0" * 40, "suffix_run_name": None, "using_wandb": False, "wandb_entity": "entity",
    "wandb_project": "project", "wandb_log_all": True, "save_artifacts": False, "wandb_resume": False,
}


def test_an_arcface_torch_base_config_loads_with_one_warning_for_its_w_and_b_keys(tmp_path):
    from utils.config.rules import ignored_keys_warning

    body = "".join(f"config.{key} = {value!r}\n" for key, value in ARCFACE_TORCH_BASE.items())
    body += "config.output = %r\n" % str(tmp_path / "out")
    cfg = load_config(write_config(tmp_path, body), ["suffix_run_name='x'"])
    ignored = ["wandb_key", "suffix_run_name", "wandb_log_all", "save_artifacts", "wandb_resume"]
    assert cfg.ignored_keys == ignored
    assert all(key not in cfg for key in ignored)
    assert cfg.wandb_entity == "entity" and cfg.batch_size == 128 and cfg.sample_rate == 1
    warning = ignored_keys_warning(cfg.ignored_keys, "base.py")
    assert warning.startswith("base.py: ignored arcface_torch config keys 'wandb_key', 'suffix_run_name', "
                              "'wandb_log_all', 'save_artifacts', 'wandb_resume': no meaning in ArcScale")
    assert ignored_keys_warning([], "x") is None
    # A typo of one of them is still a typo.
    with pytest.raises(ConfigError, match=r"unknown config key 'wandb_kee'"):
        load_config(write_config(tmp_path, "config.wandb_kee = 'x'\n"))


def test_rec_takes_a_folder_or_a_list_and_rec_weights_positive_numbers(tmp_path):
    cfg = load_config(write_config(tmp_path, "config.rec = ['/a', '/b/train_*.rec']\n"),
                      ["rec_weights=[1, 2.5]", "rec_identity_map='/m.csv'"])
    assert list(cfg.rec) == ["/a", "/b/train_*.rec"] and list(cfg.rec_weights) == [1, 2.5]
    for overrides, message in ((["rec=[]"], "config key 'rec': expected a string or a non-empty list of strings"),
                               (["rec=['/a', 3]"], "config key 'rec'"),
                               (["rec_weights=[1, 0]"], "config key 'rec_weights': expected a list or tuple of "
                                                        "numbers > 0 or None")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_config(write_config(tmp_path, ""), overrides)
