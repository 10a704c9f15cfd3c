"""The exercises, chapter by chapter: importing this package registers every one of them in ``core.REGISTRY``."""
from . import ch1_ch2, ch3_ch4, ch5_ch7  # noqa: F401
