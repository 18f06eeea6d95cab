"""The nine Inception configurations of GoogLeNet (arXiv 1409.4842, Table 1)."""

from __future__ import annotations

from typing import NamedTuple


class InceptionConfig(NamedTuple):
    in_channels: int
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    spatial: int  # feature-map side at a 224x224 network input

    @property
    def channels(self) -> tuple[int, int, int, int, int, int, int]:
        """The seven constructor arguments, in order."""
        return self[:7]

    @property
    def out_channels(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


GOOGLENET_CONFIGS: dict[str, InceptionConfig] = {
    "3a": InceptionConfig(192, 64, 96, 128, 16, 32, 32, 28),
    "3b": InceptionConfig(256, 128, 128, 192, 32, 96, 64, 28),
    "4a": InceptionConfig(480, 192, 96, 208, 16, 48, 64, 14),
    "4b": InceptionConfig(512, 160, 112, 224, 24, 64, 64, 14),
    "4c": InceptionConfig(512, 128, 128, 256, 24, 64, 64, 14),
    "4d": InceptionConfig(512, 112, 144, 288, 32, 64, 64, 14),
    "4e": InceptionConfig(528, 256, 160, 320, 32, 128, 128, 14),
    "5a": InceptionConfig(832, 256, 160, 320, 32, 128, 128, 7),
    "5b": InceptionConfig(832, 384, 192, 384, 48, 128, 128, 7),
}
