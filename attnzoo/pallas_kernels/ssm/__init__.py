"""State-space ops: Mamba-2's ``ssd`` (on the chunked linear-RNN engine) and Mamba-1's ``selective_scan``."""

from attnzoo.pallas_kernels.ssm.scan import ScanBlockSizes, selective_scan, selective_scan_step
from attnzoo.pallas_kernels.ssm.ssd import ssd, ssd_step

__all__ = ["ssd", "ssd_step", "selective_scan", "selective_scan_step", "ScanBlockSizes"]
