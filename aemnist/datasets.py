"""The datasets a study can run on: MNIST, Fashion-MNIST and KMNIST, each with its pinned files.

All three are four IDX files of the same shapes (60000 + 10000 images of 28 x 28, labels 0-9),
so a study runs on any of them unchanged; what differs is their pins, their class names and
whether the seed's reference numbers apply (MNIST only).

Pins: MNIST's are the SHA-256 of the decompressed payloads (../shared/data/mnist/README.md:
the local copy's gzip wrappers differ from the public ones); Fashion-MNIST's and KMNIST's
are the published MD5s of their ``.gz`` files, as torchvision's dataset classes list them
(``torchvision.datasets.FashionMNIST.resources``, ``KMNIST.resources``). Without their files
here (no internet) their payloads' SHA-256 cannot be computed, so a mirror must serve their
``.gz`` files as published. torchvision's MD5s of MNIST's public ``.gz`` files are kept too,
to recognise them in another dataset's mirror.

Light on purpose (no numpy, pyarrow or torch): aemnist.config reads the names from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# The names a config's data.dataset takes; MNIST first: the default, the seed's dataset.
DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "kmnist")
DEFAULT_DATASET = "mnist"

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES: tuple[str, ...] = tuple(name for pair in SPLITS.values() for name in pair)


@dataclass(frozen=True)
class IdxFile:
    """One pinned file: its decompressed size and the SHA-256 of its payload and/or the MD5
    of its published ``.gz`` (at least one of the two)."""

    name: str
    n_bytes: int
    sha256: str | None = None
    gz_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # as data.dataset names it
    title: str  # as the report and the messages name it
    torchvision_class: str  # its class in torchvision.datasets (the downloader, no mirror)
    classes: tuple[str, ...]  # label i's name, from torchvision's classes lists
    files: dict[str, IdxFile]
    rows: dict[str, int]  # rows of each split

    @property
    def checked_by_payload(self) -> bool:
        """Whether every file is pinned by its payload's SHA-256 (a raw file can be
        verified too), rather than by its ``.gz`` file's MD5 only."""
        return all(f.sha256 for f in self.files.values())

    def table_metadata(self, split: str) -> dict[str, str]:
        """The pins a split's table records in its footer: a table built from other files
        (another dataset's, a damaged copy) is then told from a good one without reading
        its pixels."""
        out = {}
        for name in SPLITS[split]:
            pin = self.files[name]
            if pin.sha256:
                out[f"sha256.{name}"] = pin.sha256
            else:
                out[f"md5.{name}.gz"] = str(pin.gz_md5)
        return out


# The IDX files' sizes follow from their shapes (a 16-byte header and 60000 x 28 x 28 bytes,
# an 8-byte header and 60000 labels, ...): the same for the three datasets.
_SIZES = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}
_ROWS = {"train": 60000, "test": 10000}


def _files(sha256: dict[str, str] | None, gz_md5: dict[str, str]) -> dict[str, IdxFile]:
    return {
        name: IdxFile(name, _SIZES[name], (sha256 or {}).get(name), gz_md5[name])
        for name in FILE_NAMES
    }


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "mnist",
            "MNIST",
            "MNIST",
            tuple(str(digit) for digit in range(10)),
            _files(
                {
                    "train-images-idx3-ubyte": (
                        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
                    ),
                    "train-labels-idx1-ubyte": (
                        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
                    ),
                    "t10k-images-idx3-ubyte": (
                        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
                    ),
                    "t10k-labels-idx1-ubyte": (
                        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
                    ),
                },
                {
                    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
                },
            ),
            dict(_ROWS),
        ),
        DatasetSpec(
            "fashion-mnist",
            "Fashion-MNIST",
            "FashionMNIST",
            (
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),  # fmt: skip
            _files(
                None,
                {
                    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
                },
            ),
            dict(_ROWS),
        ),
        DatasetSpec(
            "kmnist",
            "KMNIST",
            "KMNIST",
            # Kuzushiji: the ten hiragana, romanised as torchvision lists them.
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            _files(
                None,
                {
                    "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
                    "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
                    "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
                    "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
                },
            ),
            dict(_ROWS),
        ),
    )
}


def dataset_spec(name: str) -> DatasetSpec:
    """The dataset ``name``; an unknown one is refused naming the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"data.dataset: unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} "
            f"(--dataset or data.dataset)"
        ) from None


def has_reference(name: str) -> bool:
    """Whether the seed's reference numbers (aemnist.reference) apply: it studied MNIST only."""
    return name == "mnist"


def identify(*, gz_md5: str | None = None, sha256: str | None = None) -> tuple[str, str] | None:
    """(dataset, file name) of the pinned file with this ``.gz`` MD5 or payload SHA-256:
    which dataset a mirror's file really is, when it is not the one asked for."""
    for spec in DATASETS.values():
        for pin in spec.files.values():
            if (gz_md5 and pin.gz_md5 == gz_md5) or (sha256 and pin.sha256 == sha256):
                return spec.name, pin.name
    return None
