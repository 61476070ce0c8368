"""The built-in mlp's own synthetic dataset, each sample `delay_s` late: the same numbers in
the same order (a run on it ends bitwise equal to one on the plain dataset), and steps that
take at least `micro batch x delay_s`, so a time-limit test meets its limit however fast the
machine is."""

import time

from torch.utils.data import Dataset

from launcher.runtime.models import SyntheticClassification


class SlowSamples(Dataset):
    def __init__(self, delay_s: float) -> None:
        self.data = SyntheticClassification()
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        time.sleep(self.delay_s)
        return self.data[i]


def build(delay_s: float = 0.001) -> SlowSamples:
    return SlowSamples(delay_s)
