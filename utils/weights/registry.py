"""Released weights users start from, by name (``facenet:vggface2``, ``insightface:ms1mv3_r50``): the
network each file loads into, its input convention, the classifier it carries, its licence, where it is
published and what accuracy its authors report. Fetching and the cache live in ``utils.weights.fetch``.

facenet-pytorch's two files have direct release URLs. insightface's model zoo (arcface_torch) is
published behind OneDrive / Baidu share links a script cannot follow: those entries name the page and
the file, and the user places the file at the cache path ``python tools/weights.py info NAME`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass

FACENET_RELEASE = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
FACENET_README = "timesler/facenet-pytorch README, 'Pretrained models' table (LFW accuracy)"
INSIGHTFACE_ZOO = ("https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch#model-zoo "
                   "(OneDrive https://1drv.ms/u/s!AswpsDO2toNKq0lWY69vN58GR6mw?e=p9Ov5d, "
                   "Baidu https://pan.baidu.com/s/1CL-l4zWqsI1oDuEEYVhj-g code e8pw)")
INSIGHTFACE_README = "deepinsight/insightface recognition/arcface_torch README, 'Model Zoo' tables"
ARCFACE_CONVENTION = "112x112 RGB aligned on the ArcFace 5-point template, (x - 127.5) / 127.5"
FACENET_CONVENTION = "160x160 RGB MTCNN box crop (margin 0 to 32 px), (x - 127.5) / 128"
INSIGHTFACE_LICENCE = "non-commercial research purposes only (insightface model zoo)"
FACENET_LICENCE = ("MIT (facenet-pytorch, weights converted from davidsandberg/facenet); the training set's "
                   "own terms apply to the weights")


@dataclass(frozen=True)
class Released:
    """One released weights file."""

    name: str                    # registry name, "<source>:<model>"
    network: str                 # backbones.get_model name it loads into
    embedding_size: int
    input: str                   # the input convention, in words
    classes: str                 # identities of its training set, and whether the file carries their classifier
    licence: str
    file_name: str               # the file's name as published
    url: str | None              # direct download; None: only by hand from ``page``
    page: str                    # where it is published
    accuracy: str                # what its authors report, with where
    size: int | None = None      # bytes, when known
    sha256: str | None = None    # when published; otherwise printed and recorded at the first download

    @property
    def downloadable(self) -> bool:
        """True when a script can fetch it (a direct URL)."""
        return self.url is not None


def _facenet(model: str, file_name: str, classes: int, dataset: str, lfw: str) -> Released:
    return Released(name=f"facenet:{model}", network="inception_resnet_v1", embedding_size=512,
                    input=FACENET_CONVENTION, licence=FACENET_LICENCE, file_name=file_name,
                    classes=f"{dataset}, {classes} identities: the file carries their classifier (logits.*)",
                    url=FACENET_RELEASE + file_name, page="https://github.com/timesler/facenet-pytorch/releases",
                    accuracy=f"LFW {lfw} ({FACENET_README})")


# (model name, network, training set and its identities, the README's numbers or None when it has none)
_ZOO = (
    ("ms1mv2_mbf", "mbf", "MS1MV2, 85742", "IJB-C TAR@FAR=1e-4 93.61, MFR-ALL 62.07"),
    ("ms1mv2_r50", "r50", "MS1MV2, 85742", "IJB-C TAR@FAR=1e-4 95.97, MFR-ALL 75.13"),
    ("ms1mv2_r100", "r100", "MS1MV2, 85742", "IJB-C TAR@FAR=1e-4 96.37, MFR-ALL 78.12"),
    ("ms1mv3_r18", "r18", "MS1MV3, 93431", None),
    ("ms1mv3_r34", "r34", "MS1MV3, 93431", None),
    ("ms1mv3_mbf", "mbf", "MS1MV3, 93431", "IJB-C TAR@FAR=1e-4 94.23, MFR-ALL 63.78"),
    ("ms1mv3_r50", "r50", "MS1MV3, 93431", "IJB-C TAR@FAR=1e-4 96.37, MFR-ALL 79.14"),
    ("ms1mv3_r100", "r100", "MS1MV3, 93431", "IJB-C TAR@FAR=1e-4 96.85, MFR-ALL 81.97"),
    ("glint360k_r18", "r18", "Glint360K, 360232", None),
    ("glint360k_r34", "r34", "Glint360K, 360232", None),
    ("glint360k_mbf", "mbf", "Glint360K, 360232", "IJB-C TAR@FAR=1e-4 95.04, MFR-ALL 70.18"),
    ("glint360k_r50", "r50", "Glint360K, 360232", "IJB-C TAR@FAR=1e-4 97.16, MFR-ALL 86.34"),
    ("glint360k_r100", "r100", "Glint360K, 360232", "IJB-C TAR@FAR=1e-4 97.55, MFR-ALL 89.52"),
    ("wf42m_pfc02_r100", "r100", "WebFace42M, 2059906", "IJB-C TAR@FAR=1e-4 97.70, MFR-ALL 96.27"),
    ("wf42m_pfc02_vit_t", "vit_t_dp005_mask0", "WebFace42M, 2059906", "IJB-C TAR@FAR=1e-4 97.27, MFR-ALL 92.04"),
    ("wf42m_pfc03_vit_b", "vit_b_dp005_mask_005", "WebFace42M, 2059906", "IJB-C TAR@FAR=1e-4 97.91, MFR-ALL 97.16"),
)


def _insightface(model: str, network: str, classes: str, accuracy: str | None) -> Released:
    return Released(name=f"insightface:{model}", network=network, embedding_size=512, input=ARCFACE_CONVENTION,
                    classes=f"{classes} identities: backbone only (the Partial FC head is not published)",
                    licence=INSIGHTFACE_LICENCE, file_name="backbone.pth", url=None,
                    page=f"{INSIGHTFACE_ZOO}: the share's folder for {model} (folders are named like "
                         f"ms1mv3_arcface_r50_fp16, glint360k_cosface_r50_fp16_0.1), its backbone.pth",
                    accuracy=f"{accuracy} ({INSIGHTFACE_README})" if accuracy else
                    f"no number published for this file ({INSIGHTFACE_README} list none)")


REGISTRY: dict[str, Released] = {entry.name: entry for entry in (
    _facenet("vggface2", "20180402-114759-vggface2.pt", 8631, "VGGFace2", "0.9965"),
    _facenet("casia-webface", "20180408-102900-casia-webface.pt", 10575, "CASIA-WebFace", "0.9905"),
    *(_insightface(*row) for row in _ZOO),
)}


def is_registry_name(value: str) -> bool:
    """True when ``value`` is spelled as a registry name (``source:model``, a known source), registered or not."""
    source, sep, _ = str(value).partition(":")
    return bool(sep) and source in {name.split(":", 1)[0] for name in REGISTRY}


def lookup(name: str) -> Released | None:
    """The registry's entry for ``name``, or None."""
    return REGISTRY.get(str(name))
