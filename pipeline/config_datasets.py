"""The data sections of ``params.yaml``: where prepared data goes, what `dvc repro` prepares,
and the datasets, each of a ``kind`` (CIFAR-10, fixed split lists, a user's own images)."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from dpfah.settings import at_least
from dpfah.settings import checked as _check

from .config_binder import Invalid, matches, section

__all__ = [
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_PROTOCOLS",
    "NAME_RE",
    "DataConfig",
    "PrepareConfig",
    "Cifar10Dataset",
    "ListsDataset",
    "CustomDataset",
    "DatasetConfig",
    "TaggedDataset",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# name -> (query per class, train per class, database includes the training images)
CIFAR10_PROTOCOLS = {"cifar10-59k": (100, 500, True), "cifar10-54k": (100, 500, False)}
#: Names that become file and stage names (datasets, variants, profiles).
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@section
class DataConfig:
    root: str = field(default="data", metadata=_check(matches(r".+", "a path")))


@section
class PrepareConfig:
    # The datasets `dvc repro` prepares (dvc.yaml's foreach reads this list).
    datasets: tuple[str, ...] = ("cifar10",)
    # Read caps (issue 28): one image file or archive member, and an archive's members in all
    # (archives are read into memory); a list line naming a path outside the images root
    # (absolute, or climbing out with ..) is a bad item unless allow_outside_root.
    max_image_mb: int = field(default=64, metadata=_check(at_least(1)))
    max_archive_mb: int = field(default=4096, metadata=_check(at_least(1)))
    allow_outside_root: bool = False


OnBadImage = Literal["skip", "fail"]


@section
class _DatasetBase:
    kind: str = ""
    validation: int = field(default=0, metadata=_check(at_least(0)))
    shard_size: int = field(default=1000, metadata=_check(at_least(1)))
    on_bad_image: OnBadImage = "fail"


@section
class Cifar10Dataset(_DatasetBase):
    """CIFAR-10 from the official python archive (URL or file) or an image folder/.tar.gz."""

    kind: Literal["cifar10"] = "cifar10"
    source: str = field(default=CIFAR10_URL, metadata=_check(matches(r".+", "a path or URL")))
    md5: str | None = field(default=CIFAR10_MD5, metadata=_check(matches(r"^[0-9a-f]{32}$", "an md5 (32 hex digits)")))
    protocol: Literal["cifar10-59k", "cifar10-54k"] = field(default="cifar10-59k", metadata={"noun": "protocol"})
    validation: int = field(default=500, metadata=_check(at_least(0)))
    shard_size: int = field(default=5000, metadata=_check(at_least(1)))


@section
class ListsDataset(_DatasetBase):
    """Fixed split lists (`<path> <0/1 vector>` per line, plain or .gz) over an image root."""

    kind: Literal["lists"] = "lists"
    protocol: str = field(default="lists", metadata=_check(matches(r".+", "a name")))
    images: str | None = None
    num_classes: int | None = field(default=None, metadata=_check(at_least(1)))
    class_names: tuple[str, ...] | None = None
    train_list: str | None = None
    query_list: str | None = None
    database_list: str | None = None
    all_list: str | None = None

    def validate(self) -> None:
        if self.num_classes is None:
            raise Invalid("num_classes", "missing (the length of the label vectors)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise Invalid("class_names", f"{len(self.class_names)} names for num_classes {self.num_classes}")
        if self.database_list is not None and self.all_list is not None:
            raise Invalid("all_list", "give database_list or all_list, not both")


@section
class CustomDataset(_DatasetBase):
    """A user's labelled images; splits drawn per class: one folder per class, or a list file."""

    kind: Literal["custom"] = "custom"
    protocol: str = field(default="custom", metadata=_check(matches(r".+", "a name")))
    images: str | None = None
    labels_list: str | None = None
    num_classes: int | None = field(default=None, metadata=_check(at_least(1)))
    class_names: tuple[str, ...] | None = None
    query_per_class: int = field(default=100, metadata=_check(at_least(1)))
    train_per_class: int = field(default=500, metadata=_check(at_least(1)))
    database_includes_train: bool = True

    def validate(self) -> None:
        if self.labels_list is None:
            for key in ("num_classes", "class_names"):
                if getattr(self, key) is not None:
                    raise Invalid(key, "only with labels_list (otherwise the class folders name the classes)")
            return
        if self.num_classes is None:
            raise Invalid("num_classes", "missing (the length of the label vectors in labels_list)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise Invalid("class_names", f"{len(self.class_names)} names for num_classes {self.num_classes}")


DatasetConfig = Cifar10Dataset | ListsDataset | CustomDataset
#: A dataset entry, its class chosen by its ``kind``.
TaggedDataset = Annotated[DatasetConfig, Field(discriminator="kind")]
